"""What a model predicts, as one object per task: `classify`, `regress`, `tag`, `lm`.

A `Task` owns everything that differs between tasks, so the rest of the code asks it instead of
comparing task names: the size of the output layer, where the labels are and how they are checked,
how a batch's targets are built from the decoded samples, what the loss is averaged over (the item
count), the loss and its summed metrics, and the evaluation summary.

Nothing here imports torch.distributed; the loader's workers call the numpy half (targets, label
checks), the trainer the torch half (loss, metrics, summary).
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # a data type; tasks.py sits below the data package and imports none of it
    Batch = Any

IGNORE_INDEX = -100  # target value for positions that carry no loss (batch contract)


class Task:
    """Base class; see the module docstring. Instances are stateless singletons (`get_task`)."""

    name: ClassVar[str]
    per_step: ClassVar[bool] = False
    """Targets per step (tag, lm) rather than one per sample; the head runs on every step."""
    label_column: ClassVar[str | None] = "label"
    """Parquet label column when neither the config nor the manifest names one (None: no labels)."""
    tar_label: ClassVar[str | None] = None
    """Tar member suffix holding each sample's label."""
    needs_classes: ClassVar[bool] = False
    """The output size comes from the class count (`model.num_classes`)."""
    min_length: ClassVar[int] = 1
    """Shortest usable sequence."""
    metric: ClassVar[str]
    """The evaluation summary's headline metric (besides the loss)."""
    metric_sum: ClassVar[str | None] = None
    """Name of the summed metric `loss_and_metrics` returns besides the loss, if any."""
    higher_is_better: ClassVar[bool] = False
    predicts_tokens: ClassVar[bool] = False
    """The output layer scores the vocabulary (lm), so it may share the embedding's weight."""
    no_target: ClassVar[float] = IGNORE_INDEX
    """Target of a row that carries no loss (a bounded-shape dummy row, docs/design.md)."""
    streams: ClassVar[bool] = False
    """Can train on one contiguous token stream, the LSTM state carried across chunks (data.lm_mode)."""
    named_labels: ClassVar[bool] = False
    """Labels may be names (strings) that prep maps to class ids (labels.json)."""
    config_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    """Config values this task's runs start from instead of the generic defaults, {section: {key:
    value}}, for the keys the user leaves unset (`distlstm.config.load_config`; setting optim.name or
    optim.lr brings one's own optimizer recipe and keeps the generic [optim] defaults)."""

    @property
    def has_labels(self) -> bool:
        """The samples carry a label besides their sequence (lm: the targets are the tokens)."""
        return self.label_column is not None

    def __repr__(self) -> str:
        return f"Task({self.name!r})"

    # ---- model
    output_size_key: ClassVar[str] = "model.num_classes"
    """The config key that sets `output_size` (for messages)."""

    def output_size(self, *, vocab_size: int, num_classes: int, num_targets: int) -> int:
        raise NotImplementedError

    def check_model(self, *, input: str, bidirectional: bool, num_classes: int, num_targets: int) -> None:
        """Raise ValueError naming the config key for a model this task cannot use."""

    def pooled_output(self, out: Tensor) -> Tensor:
        """The head's output for one summary per sequence (classify, regress)."""
        return out

    # ---- data (numpy, in the loader's workers)
    def check_labels(self, labels: np.ndarray | None, offsets: np.ndarray, num_classes: int) -> list[tuple[np.ndarray, str]]:
        """(per-sample mask, problem) pairs for labels that cannot be used; `offsets` delimit samples."""
        if labels is None:
            return [(np.ones(len(offsets) - 1, bool), "missing label")]
        return []

    def batch_arrays(self, inputs: np.ndarray, lengths: np.ndarray, labels: np.ndarray | None, *,
                     pos: np.ndarray, starts: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, lengths, targets) of a batch from its padded `inputs` (zero beyond `lengths`) and
        the window's joined `labels`: `pos` are the samples' window positions, `starts` their first
        step in the flat buffers, `mask` (B, T) their real steps."""
        return inputs, lengths, self.targets(labels, pos, starts, mask)

    def targets(self, labels: np.ndarray | None, pos: np.ndarray, starts: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def empty_targets(self, num_targets: int) -> torch.Tensor:
        """Targets of the one-sample, zero-weight stand-in batch (every sample of a batch was bad)."""
        return torch.zeros(1, dtype=torch.int64)

    # ---- preparing data (distlstm.prep)
    def label_values(self, label: Any) -> list:
        """The label values of one record (a tag list's tags), for prep's survey of names and ids."""
        return [label]

    def parse_label(self, label: Any, *, length: int, names: dict[str, int] | None) -> Any:
        """A record's label as prep writes it; ValueError (or TypeError, KeyError) says what is wrong."""
        raise NotImplementedError

    def label_array(self, labels: list) -> pa.Array:
        """The Parquet label column of a row group's parsed labels."""
        raise NotImplementedError

    def tar_label_bytes(self, label: Any) -> bytes:
        """The tar member (suffix `tar_label`) holding a sample's parsed label."""
        raise NotImplementedError

    # ---- predictions (distlstm.predict)
    def predictions(self, outputs: Tensor, lengths: Tensor) -> dict[str, list]:
        """Per-sample prediction columns from a batch's outputs: the most likely class per step."""
        best = outputs.float().cpu().argmax(-1)
        return {"prediction": [row[:n].tolist() for row, n in zip(best, lengths.tolist())]}

    def prediction_types(self, num_targets: int) -> dict[str, pa.DataType]:
        return {"prediction": pa.list_(pa.int64())}

    def unlabelled(self) -> "Task":
        """This task for data without labels (predict): no label checks, placeholder targets, and
        for lm the whole sequence as input (training drops the last token, which has no next token
        to predict)."""
        return _UNLABELLED[self.name]

    # ---- training (torch)
    def item_count(self, batch: "Batch") -> int:
        """What the loss is averaged over: samples, or real tokens with a target. Host-side: the
        loader worker counts it (`batch.items`), so the training thread does no tensor work for it."""
        if batch.weight == 0:
            return 0
        if batch.items >= 0:
            return batch.items
        return int(batch.lengths.shape[0])

    def loss_and_metrics(self, outputs: Tensor, targets: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Loss SUMMED over real items, the item count (float32 tensor) and summed float32 metrics.

        The trainer divides the sum by the global item count of the whole optimizer step, so short
        and long micro-batches weigh each item equally. Computed in float32 whatever the output dtype
        (bf16 log-softmax over a large vocab loses too much; float64 stays float64). No host syncs.
        """
        raise NotImplementedError

    def summary(self, loss_sum: float, count: float, metric_sum: float, *, num_targets: int = 1) -> dict[str, float]:
        """Evaluation values from sums over a whole split (all ranks)."""
        raise NotImplementedError


def _float(outputs: Tensor) -> Tensor:
    return outputs.to(torch.promote_types(outputs.dtype, torch.float32))


def per_sample_any(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-sample OR of per-step `flags` (samples may be empty)."""
    lens = np.diff(offsets)
    out = np.zeros(len(lens), bool)
    nonempty = lens > 0
    if nonempty.any():
        out[nonempty] = np.logical_or.reduceat(flags, offsets[:-1][nonempty])
    return out


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file (no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _class_id(value: Any, names: dict[str, int] | None) -> int:
    """A class id: a name through `names` (labels.json), else an integer."""
    return names[value] if isinstance(value, str) and names is not None else int(value)


class Classify(Task):
    name = "classify"
    tar_label = "cls"
    needs_classes = True
    named_labels = True
    metric = "accuracy"
    metric_sum = "correct"
    higher_is_better = True

    def output_size(self, *, vocab_size, num_classes, num_targets):
        return num_classes

    def check_model(self, *, input, bidirectional, num_classes, num_targets):
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} from the dataset must be >= 2 for model.task={self.name!r}")

    def check_labels(self, labels, offsets, num_classes):
        found = super().check_labels(labels, offsets, num_classes)
        if labels is not None and num_classes:
            found.append(((labels < 0) | (labels >= num_classes), f"label outside [0, {num_classes}) (model.num_classes)"))
        return found

    def targets(self, labels, pos, starts, mask):
        return labels[pos].astype(np.int64)

    def loss_and_metrics(self, outputs, targets, lengths):
        outputs = _float(outputs)
        # cross_entropy skips targets equal to ignore_index: a dummy row adds nothing.
        loss = F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        correct = (outputs.argmax(-1) == targets).sum(dtype=torch.float32)
        return loss, (targets != IGNORE_INDEX).sum(dtype=torch.float32), {"correct": correct}

    def summary(self, loss_sum, count, metric_sum, *, num_targets=1):
        n = max(count, 1.0)
        return {"loss": loss_sum / n, "accuracy": metric_sum / n}

    def parse_label(self, label, *, length, names):
        value = _class_id(label, names)
        if value < 0:
            raise ValueError("class ids must be >= 0")
        return value

    def label_array(self, labels):
        return pa.array(np.asarray(labels, np.int64))

    def tar_label_bytes(self, label):
        return str(int(label)).encode()

    def predictions(self, outputs, lengths):
        probs = torch.softmax(outputs.float().cpu(), dim=-1)
        return {"prediction": probs.argmax(-1).tolist(), "probabilities": probs.tolist()}

    def prediction_types(self, num_targets):
        return {"prediction": pa.int64(), "probabilities": pa.list_(pa.float32())}


class Regress(Task):
    name = "regress"
    tar_label = "target.npy"
    metric = "mse"
    metric_sum = "sq_err"
    no_target = math.nan

    def label_values(self, label):
        return []  # numbers, not names or class ids

    def parse_label(self, label, *, length, names):
        value = np.asarray(float(label) if isinstance(label, str) else label, np.float32)
        if value.ndim > 1 or not np.isfinite(value).all():
            raise ValueError("expected a finite float or list of floats")
        return value

    def label_array(self, labels):
        values = np.stack([np.asarray(v, np.float32) for v in labels])
        if values.ndim == 1:
            return pa.array(values)
        return pa.ListArray.from_arrays(pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)),
                                        pa.array(values.reshape(-1)))

    def tar_label_bytes(self, label):
        return npy_bytes(np.asarray(label, np.float32))

    def predictions(self, outputs, lengths):
        return {"prediction": outputs.float().cpu().tolist()}

    def prediction_types(self, num_targets):
        return {"prediction": pa.float32() if num_targets == 1 else pa.list_(pa.float32())}

    output_size_key = "model.num_targets"

    def output_size(self, *, vocab_size, num_classes, num_targets):
        return num_targets

    def check_model(self, *, input, bidirectional, num_classes, num_targets):
        if num_targets < 1:
            raise ValueError(f"model.num_targets={num_targets} must be >= 1 for model.task='regress'")

    def check_labels(self, labels, offsets, num_classes):
        found = super().check_labels(labels, offsets, num_classes)
        if labels is not None:
            n = len(offsets) - 1
            found.append((~np.isfinite(np.asarray(labels, np.float64).reshape(n, -1)).all(axis=1),
                          "NaN or infinite target"))
        return found

    def targets(self, labels, pos, starts, mask):
        return labels[pos].astype(np.float32)

    def pooled_output(self, out):
        return out.squeeze(-1) if out.shape[-1] == 1 else out  # one target: (B,), as the targets are

    def empty_targets(self, num_targets):
        return torch.zeros((1, num_targets) if num_targets > 1 else (1,))

    def loss_and_metrics(self, outputs, targets, lengths):
        outputs = _float(outputs)
        if targets.shape != outputs.shape:
            if targets.numel() != outputs.numel():
                raise ValueError(f"regress targets have shape {tuple(targets.shape)}, outputs "
                                 f"{tuple(outputs.shape)}; set model.num_targets to the number of target columns")
            targets = targets.reshape(outputs.shape)
        real = ~torch.isnan(targets)
        # where() routes no gradient to the masked entries, so a NaN target (no target) adds exactly 0.
        residual = torch.where(real, outputs - targets.to(outputs.dtype), 0.0)
        sq_err = residual.square().sum()
        rows = real if real.dim() == 1 else real.all(-1)
        return sq_err, rows.sum(dtype=torch.float32), {"sq_err": sq_err.detach()}

    def summary(self, loss_sum, count, metric_sum, *, num_targets=1):
        n = max(count, 1.0)
        return {"loss": loss_sum / n, "mse": loss_sum / n / max(1, num_targets)}


class _PerStep(Task):
    """tag and lm: one target per step, -100 at padding; the items are the real targets."""

    per_step = True

    def item_count(self, batch):
        if batch.weight == 0:
            return 0
        if batch.items >= 0:
            return batch.items
        return int((batch.targets != IGNORE_INDEX).sum())

    def empty_targets(self, num_targets):
        return torch.full((1, 2), IGNORE_INDEX)

    def _masked(self, outputs: Tensor, targets: Tensor, lengths: Tensor):
        batch, steps = targets.shape
        in_length = torch.arange(steps, device=targets.device) < lengths.to(targets.device)[:, None]
        real = in_length & (targets != IGNORE_INDEX)
        # Mask by length as well as by -100, so a loader that leaves junk targets in the padding
        # still cannot leak it into the loss.
        masked_targets = targets.masked_fill(~real, IGNORE_INDEX)
        logits = _float(outputs).reshape(batch * steps, -1)
        loss = F.cross_entropy(logits, masked_targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, real.sum(dtype=torch.float32), logits, masked_targets, real


class Tag(_PerStep):
    name = "tag"
    label_column = "tags"
    tar_label = "tags.npy"
    needs_classes = True
    named_labels = True
    metric = "accuracy"
    metric_sum = "correct"
    higher_is_better = True

    def output_size(self, *, vocab_size, num_classes, num_targets):
        return num_classes

    check_model = Classify.check_model

    def check_labels(self, labels, offsets, num_classes):
        found = super().check_labels(labels, offsets, num_classes)
        if labels is not None and num_classes and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            found.append((per_sample_any((labels < 0) | (labels >= num_classes), offsets),
                          f"tag outside [0, {num_classes}) (model.num_classes)"))
        return found

    def targets(self, labels, pos, starts, mask):
        T = mask.shape[1]
        return np.where(mask, labels[starts[:, None] + np.arange(T)], IGNORE_INDEX).astype(np.int64)

    def label_values(self, label):
        return label if isinstance(label, list) else [label]

    def parse_label(self, label, *, length, names):
        tags = np.asarray([_class_id(v, names) for v in label], np.int32)[:length]
        if len(tags) != length or (tags < 0).any():
            raise ValueError(f"expected {length} non-negative tags, one per step")
        return tags

    def label_array(self, labels):
        offsets = np.zeros(len(labels) + 1, np.int32)
        np.cumsum([len(t) for t in labels], out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(labels).astype(np.int32)))

    def tar_label_bytes(self, label):
        return npy_bytes(np.asarray(label, np.int32))

    def loss_and_metrics(self, outputs, targets, lengths):
        loss, count, logits, masked_targets, real = self._masked(outputs, targets, lengths)
        correct = ((logits.argmax(-1) == masked_targets.reshape(-1)) & real.reshape(-1)).sum(dtype=torch.float32)
        return loss, count, {"correct": correct}

    summary = Classify.summary


class LanguageModel(_PerStep):
    name = "lm"
    label_column = None
    min_length = 2
    metric = "perplexity"
    predicts_tokens = True
    streams = True
    output_size_key = "model.vocab_size"
    # The classic LSTM LM recipe (Zaremba et al. 2014; pytorch/examples word_language_model) with a
    # cosine decay, which needs no validation split (plateau does). On tiny Shakespeare words it is
    # within 10% of the plateau recipe at equal tokens, where the generic AdamW defaults are 2.4x
    # worse (docs/benchmarks.md, bench/lm_quality.py run "e").
    config_defaults = {
        "optim": {"name": "sgd", "lr": 20.0, "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 0.25,
                  "schedule": "cosine"},
        "model": {"dropout": 0.2, "embed_dropout": 0.2},
    }

    def output_size(self, *, vocab_size, num_classes, num_targets):
        return vocab_size

    def check_model(self, *, input, bidirectional, num_classes, num_targets):
        if input != "tokens":
            raise ValueError(f"model.task='lm' predicts the next token, so it needs model.input='tokens' "
                             f"(got model.input={input!r})")
        if bidirectional:
            raise ValueError("model.bidirectional=true is not allowed with model.task='lm': the backward "
                             "direction reads the tokens being predicted; set model.bidirectional=false")

    def check_labels(self, labels, offsets, num_classes):
        return []

    def batch_arrays(self, inputs, lengths, labels, *, pos, starts, mask):
        # The targets are the inputs shifted by one: a sample of n tokens trains n - 1 predictions.
        T = inputs.shape[1]
        y = inputs[:, 1:].astype(np.int64)
        y[np.arange(T - 1)[None, :] >= (lengths[:, None] - 1)] = IGNORE_INDEX
        return np.ascontiguousarray(inputs[:, :-1]), lengths - 1, y

    def loss_and_metrics(self, outputs, targets, lengths):
        loss, count, _, _, _ = self._masked(outputs, targets, lengths)
        return loss, count, {}  # perplexity = exp(loss / count), in `summary`

    def summary(self, loss_sum, count, metric_sum, *, num_targets=1):
        n = max(count, 1.0)
        return {"loss": loss_sum / n, "perplexity": math.exp(min(loss_sum / n, 50.0))}


TASKS: dict[str, Task] = {t.name: t() for t in (Classify, Regress, Tag, LanguageModel)}


class _Unlabelled:
    """Mixed in before a task's class by `Task.unlabelled` (see there). No labels are read: the
    index of an unlabelled split has no label column (Parquet column and tar member)."""

    min_length = 1

    def check_labels(self, labels, offsets, num_classes):
        return []

    def batch_arrays(self, inputs, lengths, labels, *, pos, starts, mask):
        if self.per_step:
            return inputs, lengths, np.full(mask.shape, IGNORE_INDEX, np.int64)
        # The dtype the loader's dummy rows (bounded shapes) append to: float (NaN) for regression.
        dtype = np.float32 if isinstance(self.no_target, float) else np.int64
        return inputs, lengths, np.full(len(pos), self.no_target, dtype)


_UNLABELLED: dict[str, Task] = {name: type(f"Unlabelled{type(t).__name__}", (_Unlabelled, type(t)), {})()
                                for name, t in TASKS.items()}


def get_task(task: "str | Task") -> Task:
    """The Task for a `model.task` value (a Task passes through)."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"model.task={task!r} is not one of {', '.join(TASKS)}") from None

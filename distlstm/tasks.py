"""What a model predicts, as one object per task: `classify`, `regress`, `tag`, `lm`.

A `Task` owns everything that differs between tasks, so the rest of the code asks it instead of
comparing task names: the size of the output layer, where the labels are and how they are checked,
how a batch's targets are built from the decoded samples, what the loss is averaged over (the item
count), the loss and its summed metrics, and the evaluation summary.

Nothing here imports torch.distributed; the loader's workers call the numpy half (targets, label
checks), the trainer the torch half (loss, metrics, summary).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from distlstm.data.batch import Batch

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

    def __repr__(self) -> str:
        return f"Task({self.name!r})"

    # ---- model
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


def _per_sample_any(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-sample OR of per-step `flags` (samples may be empty)."""
    lens = np.diff(offsets)
    out = np.zeros(len(lens), bool)
    nonempty = lens > 0
    if nonempty.any():
        out[nonempty] = np.logical_or.reduceat(flags, offsets[:-1][nonempty])
    return out


class Classify(Task):
    name = "classify"
    tar_label = "cls"
    needs_classes = True
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


class Regress(Task):
    name = "regress"
    tar_label = "target.npy"
    metric = "mse"
    metric_sum = "sq_err"
    no_target = math.nan

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
    metric = "accuracy"
    metric_sum = "correct"
    higher_is_better = True

    def output_size(self, *, vocab_size, num_classes, num_targets):
        return num_classes

    check_model = Classify.check_model

    def check_labels(self, labels, offsets, num_classes):
        found = super().check_labels(labels, offsets, num_classes)
        if labels is not None and num_classes and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            found.append((_per_sample_any((labels < 0) | (labels >= num_classes), offsets),
                          f"tag outside [0, {num_classes}) (model.num_classes)"))
        return found

    def targets(self, labels, pos, starts, mask):
        T = mask.shape[1]
        return np.where(mask, labels[starts[:, None] + np.arange(T)], IGNORE_INDEX).astype(np.int64)

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


def get_task(task: "str | Task") -> Task:
    """The Task for a `model.task` value (a Task passes through)."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"model.task={task!r} is not one of {', '.join(TASKS)}") from None

"""LSTM encoder with classify / regress / tag / lm heads, and the masked loss.

Inputs follow the batch contract in docs/design.md: right-padded `(B, T)` token ids or `(B, T, F)`
float features plus `(B,)` int64 `lengths`. Padding is defined by `lengths` alone (token id 0 is an
ordinary token), and padding never changes a sample's outputs, loss or gradients.

This file never imports torch.distributed: DDP, AMP policy and compile live in distlstm/distributed/parallel.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import os
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from distlstm.tasks import IGNORE_INDEX, TASKS, Task, get_task  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from distlstm.config import ModelConfig

INPUTS = ("tokens", "features")

class HostLengths:
    """Sequence lengths kept on the host, passed to `forward` as an object DDP leaves where it is:
    DDP with `device_ids` moves every tensor argument (also keyword, also inside lists and
    dataclasses) to the GPU, and `pack_padded_sequence` refuses CUDA lengths."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


LstmState = tuple[Tensor, Tensor]  # (h, c), each (num_layers * num_directions, B, size)
Resets = Sequence[tuple[int, Tensor]]  # (column, (B,) bool rows whose state is zeroed before it)


class SequenceModel(nn.Module):
    """LSTM over token ids or feature vectors, followed by one task head.

    Keyword arguments mirror the `model.*` config keys (see `build_model`); errors name those keys.
    `embed_size` sizes the token embedding and is ignored for `input="features"`: features go into
    the LSTM directly, since a linear projection in front of the LSTM's own input matmul adds
    parameters but no expressiveness.
    """

    def __init__(
        self,
        *,
        task: str,
        input: str,
        hidden_size: int,
        num_layers: int = 1,
        embed_size: int = 0,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        tie_weights: bool = False,
        embed_dropout: float = 0.0,
        num_targets: int = 1,
        vocab_size: int = 0,
        input_size: int = 0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        _validate(**locals())
        self.task = task
        self.spec: Task = get_task(task)
        self.input = input
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.embed_size = embed_size
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.tie_weights = tie_weights
        self.num_targets = num_targets
        self.num_directions = 2 if bidirectional else 1
        # Output size of one direction of the top layer (nn.LSTM's proj_size replaces h's size).
        self.direction_size = proj_size or hidden_size

        if input == "tokens":
            # No padding_idx: padding is defined by lengths, and id 0 may be a real token.
            self.embedding: nn.Embedding | None = nn.Embedding(vocab_size, embed_size)
            lstm_input_size = embed_size
        else:
            self.embedding = None
            lstm_input_size = input_size
        self.lstm = nn.LSTM(
            lstm_input_size,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            # nn.LSTM warns when dropout is set with one layer (it only acts between layers).
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
            proj_size=proj_size,
        )
        self.dropout = nn.Dropout(dropout)
        # On the LSTM's input (Zaremba et al. 2014 drop the embeddings too); dropout between layers is
        # nn.LSTM's, and self.dropout acts before the head.
        self.embed_dropout = nn.Dropout(embed_dropout)
        features = self.direction_size * self.num_directions
        num_outputs = self.spec.output_size(vocab_size=vocab_size, num_classes=num_classes, num_targets=num_targets)
        self.head = nn.Linear(features, num_outputs)
        if tie_weights:
            # Same Parameter object: one tensor, counted once, updated once.
            self.head.weight = self.embedding.weight
        _init_forget_gate_bias(self.lstm, hidden_size)

    def forward(self, inputs: Tensor, lengths: Tensor, lengths_cpu: "HostLengths | Tensor | None" = None,
                state: LstmState | None = None, resets: Resets = (), with_state: bool = False):
        """classify `(B, C)`, regress `(B,)` or `(B, K)`, tag `(B, T, C)`, lm `(B, T, V)` logits.
        `lengths_cpu`: the same lengths on the host, if the caller has them (saves the packing path,
        bidirectional models, a device->host copy and its sync); under DDP wrap them in `HostLengths`.

        `with_state=True` (truncated BPTT, unidirectional only; see `encode_carried`): start from
        `state`, zero it per row at `resets`, and return `(logits, state after the last column)`.
        It goes through `forward` so that DDP sees the call. (Not keyword-only: the TorchScript-based
        ONNX exporter passes every argument by position.)"""
        if with_state:
            steps, final_state = self.encode_carried(inputs, state, resets)
            return self.apply_head(steps, lengths), final_state
        if isinstance(lengths_cpu, HostLengths):
            lengths_cpu = lengths_cpu.tensor
        steps, _ = self.encode(inputs, lengths, lengths_cpu=lengths_cpu)
        return self.apply_head(steps, lengths)

    def encode_carried(self, inputs: Tensor, state: LstmState | None, resets: Resets = ()) -> tuple[Tensor, LstmState]:
        """Top-layer outputs of full-length rows from `state` (None: zeros), and the state after the
        last column. `resets` lists `(column, rows)` pairs, ascending by column: before `column`, the
        state of the rows where the `(B,)` bool mask `rows` is set goes back to zero (a document starts
        there, so it must not see the previous one).

        Cost: the LSTM runs once per distinct reset column plus once, each call over the columns up to
        the next reset, instead of once over all T columns; every call is one more cuDNN launch per
        layer and a shorter input matmul, so a chunk of 35 columns with 2 reset columns costs about 3
        launches instead of 1 (the recurrence itself is sequential either way). No per-step Python
        loop and no host sync (the columns are host integers from the loader)."""
        if self.bidirectional:
            raise ValueError("carrying the LSTM state needs a unidirectional model (the backward direction has "
                             "no state to carry); set model.bidirectional=false")
        x = self.embed_dropout(self.embedding(inputs) if self.embedding is not None else inputs)
        bounds = [0] + [c for c, _ in resets if 0 < c < x.shape[1]] + [x.shape[1]]
        rows_at = dict(resets)
        outs = []
        for a, b in zip(bounds, bounds[1:]):
            if a == b:
                continue
            if state is not None and a in rows_at:
                # masked_fill keeps the state's dtype (a multiply by a float mask would promote bf16).
                rows = rows_at[a].view(1, -1, 1)
                state = (state[0].masked_fill(rows, 0.0), state[1].masked_fill(rows, 0.0))
            out, state = self.run_lstm(x[:, a:b], state)
            outs.append(out)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), state

    def forward_with_state(
        self, inputs: Tensor, lengths: Tensor, state: LstmState | None = None
    ) -> tuple[Tensor, LstmState]:
        """Like `forward`, but starts from `state` and also returns the state at each true end.

        For truncated BPTT (unidirectional only): feed chunk k+1 with the state returned for chunk
        k. The returned state is NOT detached; the caller detaches it to cut the graph. This path
        packs the batch (slower than `forward`) so that the state is taken at `lengths - 1`, not
        after the padding.
        """
        if self.bidirectional:
            raise ValueError(
                "forward_with_state needs a unidirectional LSTM: the backward direction has no "
                "state to carry into the next chunk; set model.bidirectional=false"
            )
        steps, final_state = self.encode(inputs, lengths, state=state, pack=True)
        return self.apply_head(steps, lengths), final_state

    def encode(
        self,
        inputs: Tensor,
        lengths: Tensor,
        *,
        state: LstmState | None = None,
        pack: bool | None = None,
        lengths_cpu: Tensor | None = None,
    ) -> tuple[Tensor, LstmState]:
        """Top-layer outputs `(B, T, D * directions)` (zero or junk beyond each length) and (h, c)."""
        x = self.embed_dropout(self.embedding(inputs) if self.embedding is not None else inputs)
        if pack is None:
            # Unidirectional: step t only sees steps <= t, so trailing padding cannot reach any
            # real output, and pad + mask is ~1.8x faster than packing on cuDNN. Bidirectional:
            # the backward direction would start in the padding, so pack it out.
            pack = self.bidirectional
        if not pack:
            return self.run_lstm(x, state)
        total_length = x.shape[1]
        # pack_padded_sequence needs lengths on the CPU: the caller's host copy, else one
        # device->host copy (a sync), packing only.
        host = lengths_cpu if lengths_cpu is not None else lengths.cpu()
        # Sorted here, not by torch: pack_padded_sequence(enforce_sorted=False) moves its sort order
        # to the device with a blocking copy and pad_packed_sequence reads the inverse back with
        # .cpu(), two host syncs per step. Both orders are computed on the host and reach the device
        # in one non-blocking copy from pinned memory.
        order = torch.argsort(host, descending=True, stable=True)
        orders = torch.stack([order, torch.argsort(order)])
        if x.device.type == "cuda":
            orders = orders.pin_memory().to(x.device, non_blocking=True)
        to_sorted, to_original = orders[0], orders[1]
        packed = pack_padded_sequence(x.index_select(0, to_sorted), host[order], batch_first=True)
        if state is not None:
            state = (state[0].index_select(1, to_sorted), state[1].index_select(1, to_sorted))
        packed_out, (h, c) = self.run_lstm(packed, state)
        steps, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=total_length)
        return steps.index_select(0, to_original), (h.index_select(1, to_original), c.index_select(1, to_original))

    def run_lstm(self, x: Tensor | PackedSequence, state: LstmState | None) -> tuple[Tensor | PackedSequence, LstmState]:
        """`self.lstm(x, state)`; under bf16 autocast, in bf16.

        Autocast's cuDNN RNN wrapper casts an LSTM's input and weights to fp16 whatever the autocast
        dtype (PyTorch's aten/src/ATen/native/cudnn/AutocastRNN.cpp), so under bf16 autocast the LSTM
        would run in fp16 with no loss scale: a step's LSTM gradients, ~1e-7 at 64k-token batches
        (the loss is divided by the step's item count), are fp16 subnormals, quantised or zero.
        So under bf16 autocast the LSTM runs with autocast off, on bf16 input and state and on a bf16
        copy of its weights made in this forward (one cast of one buffer, holding the weights in
        nn.LSTM's order: the cast autocast makes for a Linear). The parameters stay fp32: they are the
        optimizer's master weights, and their gradients come back through the cast in fp32. This
        design needs nothing of the optimizer, DDP, checkpoints or CUDA graphs (the cast is captured
        like any kernel). fp16 autocast keeps autocast's own path (fp16, with the GradScaler), fp32 none.
        """
        device_type = (x.data if isinstance(x, PackedSequence) else x).device.type
        if not (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16):
            return self.lstm(x, state)
        dtype = torch.bfloat16
        with torch.autocast(device_type, enabled=False):
            weights = dict(self.lstm.named_parameters())
            flat = torch.cat([w.reshape(-1) for w in weights.values()]).to(dtype)
            views = flat.split([w.numel() for w in weights.values()])
            low = {name: v.view_as(w) for (name, w), v in zip(weights.items(), views)}
            state = None if state is None else (state[0].to(dtype), state[1].to(dtype))
            return torch.func.functional_call(self.lstm, low, (x.to(dtype), state))

    def apply_head(self, steps: Tensor, lengths: Tensor) -> Tensor:
        if self.spec.per_step:
            return self.head(self.dropout(steps))
        pooled = self.dropout(self.pool_last(steps, lengths))
        return self.spec.pooled_output(self.head(pooled))

    def pool_last(self, steps: Tensor, lengths: Tensor) -> Tensor:
        """Per-sequence summary: forward state at the TRUE last step (+ backward state at step 0).

        `steps[:, -1]` would read the padding for every sequence shorter than the batch.
        A gather on device keeps this free of host syncs.
        """
        batch, _, _ = steps.shape
        d = self.direction_size
        last = (lengths.to(steps.device) - 1).clamp(min=0).view(batch, 1, 1).expand(batch, 1, d)
        forward_last = steps[:, :, :d].gather(1, last).squeeze(1)
        if not self.bidirectional:
            return forward_last
        # The backward direction reads the sequence right to left, so it ends at step 0.
        return torch.cat([forward_last, steps[:, 0, d:]], dim=-1)


def loss_and_metrics(
    task: str | Task, outputs: Tensor, targets: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Loss SUMMED over real items, the item count and summed metrics: `Task.loss_and_metrics`.

    Items: samples with a target for classify/regress; tokens with target != -100 and position <
    length for tag/lm; a row without a target (a bounded-shape dummy row) carries nothing. The
    trainer divides the sum by the global item count of the whole optimizer step.
    """
    return get_task(task).loss_and_metrics(outputs, targets, lengths)


_TRAIN_BYTES_PER_PARAM = 16   # fp32 weight + gradient + two Adam moments
_ACTIVATION_FLOATS_PER_UNIT = 10  # per token and LSTM unit kept for backward: 4 gates, c, h, tanh(c), slack


def memory_estimate(cfg: ModelConfig, *, tokens_per_batch: int = 0, training: bool = False) -> dict[str, int]:
    """Bytes the model described by `cfg` needs, by the config key that decides each part, from the
    config alone (nothing is allocated): parameters (x4 bytes, x16 when training with Adam) and, when
    `tokens_per_batch` is given, the activations a batch of that many tokens keeps for backward."""
    cfg = SimpleNamespace(**{"num_targets": 1, "proj_size": 0, "tie_weights": False, "bidirectional": False,
                             "vocab_size": 0, "input_size": 0, "num_classes": 0, **vars(cfg)})
    e = cfg.embed_size if cfg.input == "tokens" else cfg.input_size
    h, layers, dirs = cfg.hidden_size, cfg.num_layers, 2 if cfg.bidirectional else 1
    out = cfg.proj_size or h
    per_param = _TRAIN_BYTES_PER_PARAM if training else 4
    # Closed form (the first layer reads e, the others out * dirs): no loop over a hostile layer count.
    per_layer = lambda inp: dirs * (4 * h * (inp + out) + 8 * h + (h * out if cfg.proj_size else 0))  # noqa: E731
    lstm = per_layer(e) + (layers - 1) * per_layer(out * dirs) if layers > 0 else 0
    features = out * dirs
    task = get_task(cfg.task)
    outputs = task.output_size(vocab_size=cfg.vocab_size, num_classes=cfg.num_classes, num_targets=cfg.num_targets)
    head = (0 if cfg.tie_weights else features * max(outputs, 1)) + max(outputs, 1)  # weight + bias
    parts = {"model.hidden_size": lstm * per_param,
             task.output_size_key: head * per_param}
    if cfg.input == "tokens":
        key = "model.vocab_size" if cfg.vocab_size >= cfg.embed_size else "model.embed_size"
        parts[key] = parts.get(key, 0) + cfg.vocab_size * cfg.embed_size * per_param
    if tokens_per_batch:
        per_token = e + layers * dirs * h * _ACTIVATION_FLOATS_PER_UNIT + (outputs if task.per_step else 0)
        parts["data.max_tokens"] = tokens_per_batch * per_token * 4
    return parts


def host_memory_bytes() -> int:
    """Physical memory of this machine (0 if the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(cfg: ModelConfig, *, budget_bytes: int, tokens_per_batch: int = 0, training: bool = False,
                 where: str = "model") -> None:
    """ValueError, before anything is allocated, when `memory_estimate` exceeds `budget_bytes`: one
    line with the estimate, the budget and the config key that takes the most."""
    parts = memory_estimate(cfg, tokens_per_batch=tokens_per_batch, training=training)
    total = sum(parts.values())
    if budget_bytes and total > budget_bytes:
        key = max(parts, key=parts.get)
        name = key.split(".", 1)[1]
        value = getattr(cfg, name, tokens_per_batch) if key.startswith("model.") else tokens_per_batch
        raise ValueError(f"{where}: needs about {total / 2**30:,.1f} GiB ({'training' if training else 'weights'}"
                         f"), more than the {budget_bytes / 2**30:,.1f} GiB available; most of it from "
                         f"{key}={value} ({parts[key] / 2**30:,.1f} GiB); lower {key}")


def build_model(
    cfg: ModelConfig, *, vocab_size: int | None = None, input_size: int | None = None,
    num_classes: int | None = None
) -> SequenceModel:
    """The model described by the `[model]` config. The sizes that come from the data are read from
    the config (a resolved config has them) unless given as arguments. Refused (ValueError) before
    any allocation when its weights would not fit in this machine's memory (`check_memory`)."""
    sizes = {k: v for k, v in (("vocab_size", vocab_size), ("input_size", input_size),
                               ("num_classes", num_classes)) if v is not None}
    check_memory(SimpleNamespace(**{**vars(cfg), **sizes}), budget_bytes=host_memory_bytes())
    return SequenceModel(
        task=cfg.task,
        input=cfg.input,
        embed_size=cfg.embed_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        dropout=cfg.dropout,
        bidirectional=cfg.bidirectional,
        proj_size=cfg.proj_size,
        tie_weights=cfg.tie_weights,
        embed_dropout=getattr(cfg, "embed_dropout", 0.0),
        num_targets=getattr(cfg, "num_targets", 1),
        vocab_size=cfg.vocab_size if vocab_size is None else vocab_size,
        input_size=cfg.input_size if input_size is None else input_size,
        num_classes=cfg.num_classes if num_classes is None else num_classes,
    )


def num_parameters(model: nn.Module) -> int:
    """Trainable parameter count; a tied embedding/head weight counts once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_token(model: SequenceModel) -> int:
    """Approximate forward + backward FLOPs per (real or padded) token, for MFU.

    Per layer and direction the LSTM does 4 gate matmuls of [x_t, h_{t-1}] -> H: 2*4*H*(in+H_out)
    FLOPs (a multiply-add counts 2), plus 2*H*proj for the projection. tag/lm add the per-token
    head; the classify/regress head runs once per sequence and is left out. Backward ~= 2x forward.
    """
    model = getattr(model, "module", model)  # accept a DDP-wrapped model
    hidden, out = model.hidden_size, model.direction_size
    layer_input = model.lstm.input_size
    forward = 0
    for _ in range(model.num_layers):
        per_direction = 2 * 4 * hidden * (layer_input + out)
        if model.proj_size:
            per_direction += 2 * hidden * out
        forward += per_direction * model.num_directions
        layer_input = out * model.num_directions
    if model.spec.per_step:
        forward += 2 * model.head.in_features * model.head.out_features
    return 3 * forward


def _init_forget_gate_bias(lstm: nn.LSTM, hidden_size: int) -> None:
    # Gate order is (input, forget, cell, output). A forget bias of 1 lets gradients flow through
    # long sequences early in training (Jozefowicz et al. 2015). nn.LSTM adds bias_ih + bias_hh,
    # so set one to 1 and the other to 0.
    with torch.no_grad():
        for name, param in lstm.named_parameters():
            if name.startswith("bias_ih"):
                param[hidden_size : 2 * hidden_size].fill_(1.0)
            elif name.startswith("bias_hh"):
                param[hidden_size : 2 * hidden_size].fill_(0.0)


def _validate(
    *,
    task: str,
    input: str,
    hidden_size: int,
    num_layers: int,
    embed_size: int,
    dropout: float,
    bidirectional: bool,
    proj_size: int,
    tie_weights: bool,
    embed_dropout: float,
    num_targets: int,
    vocab_size: int,
    input_size: int,
    num_classes: int,
    **_: object,
) -> None:
    """Reject impossible combinations, naming the config key (or the data-derived size) at fault."""
    get_task(task)  # raises naming model.task
    if input not in INPUTS:
        raise ValueError(f"model.input={input!r} is not one of {', '.join(INPUTS)}")
    if hidden_size < 1:
        raise ValueError(f"model.hidden_size={hidden_size} must be >= 1")
    if num_layers < 1:
        raise ValueError(f"model.num_layers={num_layers} must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
    if not 0.0 <= embed_dropout < 1.0:
        raise ValueError(f"model.embed_dropout={embed_dropout} must be in [0, 1)")
    if proj_size < 0 or proj_size >= hidden_size:
        raise ValueError(
            f"model.proj_size={proj_size} must be < model.hidden_size={hidden_size} "
            "(and >= 0; 0 disables the projection)"
        )
    if input == "tokens":
        if embed_size < 1:
            raise ValueError(f"model.embed_size={embed_size} must be >= 1 for model.input='tokens'")
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} from the dataset must be >= 1")
    elif input_size < 1:
        raise ValueError(
            f"input_size={input_size} from the dataset must be >= 1 for model.input='features'"
        )
    spec = get_task(task)
    spec.check_model(input=input, bidirectional=bidirectional, num_classes=num_classes, num_targets=num_targets)
    if tie_weights:
        if not spec.predicts_tokens:
            raise ValueError(
                f"model.tie_weights=true only applies to model.task='lm' (got model.task={task!r}); "
                "set model.tie_weights=false"
            )
        top = proj_size or hidden_size
        if top != embed_size:
            source = f"model.proj_size={proj_size}" if proj_size else f"model.hidden_size={hidden_size}"
            raise ValueError(
                f"model.tie_weights=true needs the top LSTM output size ({source}) to equal "
                f"model.embed_size={embed_size}; set model.embed_size={top}, "
                f"or model.proj_size={embed_size} (if < model.hidden_size), or model.tie_weights=false"
            )

"""LSTM encoder with classify / regress / tag / lm heads, and the masked loss.

Inputs follow the batch contract in docs/design.md: right-padded `(B, T)` token ids or `(B, T, F)`
float features plus `(B,)` int64 `lengths`. Padding is defined by `lengths` alone (token id 0 is an
ordinary token), and padding never changes a sample's outputs, loss or gradients.

This file never imports torch.distributed: DDP, AMP policy and compile live in distlstm/distributed/parallel.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from distlstm.tasks import IGNORE_INDEX, TASKS, Task, get_task  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from distlstm.config import ModelConfig

INPUTS = ("tokens", "features")

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

    def forward(self, inputs: Tensor, lengths: Tensor, lengths_cpu: Tensor | None = None,
                state: LstmState | None = None, resets: Resets = (), with_state: bool = False):
        """classify `(B, C)`, regress `(B,)` or `(B, K)`, tag `(B, T, C)`, lm `(B, T, V)` logits.
        `lengths_cpu`: the same lengths on the host, if the caller has them (saves the packing path,
        bidirectional models, a device->host copy and its sync).

        `with_state=True` (truncated BPTT, unidirectional only; see `encode_carried`): start from
        `state`, zero it per row at `resets`, and return `(logits, state after the last column)`.
        It goes through `forward` so that DDP sees the call. (Not keyword-only: the TorchScript-based
        ONNX exporter passes every argument by position.)"""
        if with_state:
            steps, final_state = self.encode_carried(inputs, state, resets)
            return self.apply_head(steps, lengths), final_state
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
            out, state = self.lstm(x[:, a:b], state)
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
            return self.lstm(x, state)
        total_length = x.shape[1]
        # pack_padded_sequence needs lengths on the CPU: the caller's host copy, else one
        # device->host copy (a sync), packing only.
        host = lengths_cpu if lengths_cpu is not None else lengths.cpu()
        packed = pack_padded_sequence(x, host, batch_first=True, enforce_sorted=False)
        packed_out, final_state = self.lstm(packed, state)
        steps, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=total_length)
        return steps, final_state

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


def build_model(
    cfg: ModelConfig, *, vocab_size: int | None = None, input_size: int | None = None,
    num_classes: int | None = None
) -> SequenceModel:
    """The model described by the `[model]` config. The sizes that come from the data are read from
    the config (a resolved config has them) unless given as arguments."""
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

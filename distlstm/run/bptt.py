"""Truncated BPTT: how a batch goes through the model when the LSTM state crosses a boundary.

Three cases, one object (`StateCarrier`) that the trainer and the evaluation loop ask for a batch's
*pieces* and then for each piece's outputs:

- plain (windows, every task): the batch is one piece, run as `model(inputs, lengths)`; nothing carried.
- lm stream mode (`data.lm_mode = stream`): the batch is the next chunk of this rank's rows, one piece
  that starts from the state the previous batch left (detached: the gradient stops at the chunk
  boundary), with the state zeroed per row where `batch.reset` says a document starts. The state is
  part of the rank's checkpoint (`RankState`), so a resumed run continues bit for bit.
- `data.too_long = chunk` (tag, lm windows): a batch longer than `data.max_length` is cut into pieces
  of `max_length` columns, the state carried (detached) from one piece to the next and started from
  zero for each batch; the caller runs backward per piece, so activation memory follows
  `max_length`, not the longest sample.

The loss stays exact under all three: every target is in exactly one piece, and the caller divides
the summed loss of every piece by the item count of the whole step (docs/design.md, "The step").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from distlstm.data.batch import Batch
from distlstm.models.lstm import HostLengths
from distlstm.data.loader.stream_loader import StreamLoader
from distlstm.tasks import get_task
from distlstm.config import ConfigError


@dataclass
class Piece:
    """The part of a batch one forward/backward covers (device tensors)."""

    inputs: Tensor
    lengths: Tensor
    targets: Tensor
    lengths_cpu: Tensor | None
    resets: Sequence[tuple[int, Tensor]] | None
    """None: a plain forward. Else the state is carried, zeroed for the `(column, rows)` listed."""
    last: bool
    """The batch's last piece (DDP all-reduces with the last backward of a step)."""


class StateCarrier:
    """See the module docstring. `for_loader` picks the case from the loader."""

    def __init__(self, *, stream: bool = False, piece_length: int = 0,
                 layout_key: Callable[[], str] | None = None, device: torch.device | None = None):
        self.stream, self.piece_length, self.layout_key, self.device = stream, piece_length, layout_key, device
        self.state: tuple[Tensor, Tensor] | None = None

    @classmethod
    def for_loader(cls, loader: Any, device: torch.device | None = None) -> "StateCarrier":
        if isinstance(loader, StreamLoader):
            return cls(stream=True, layout_key=loader.layout_key, device=device)
        params = getattr(loader, "params", None)
        if params is not None and getattr(params, "too_long", "") == "chunk":
            return cls(piece_length=params.max_length, device=device)
        return cls(device=device)

    def pieces(self, batch: Batch, host: Batch) -> Iterator[Piece]:
        """`batch` on the device, `host` the same batch on the host (its reset mask is read there,
        so choosing the columns needs no device sync)."""
        if self.stream:
            if host.reset is None:
                raise ValueError("a stream batch without a reset mask: the loader is not a stream loader")
            # On the host as the loader built it (a copy, with a sync, only if it reached the device first).
            columns = np.flatnonzero(host.reset.cpu().numpy().any(axis=0)).tolist()
            resets = [(c, batch.reset[:, c]) for c in columns]
            yield Piece(batch.inputs, batch.lengths, batch.targets, host.cpu_lengths, resets, True)
            return
        steps = batch.inputs.shape[1]
        if not self.piece_length or steps <= self.piece_length:
            yield Piece(batch.inputs, batch.lengths, batch.targets, host.cpu_lengths, None, True)
            return
        self.state = None  # every batch starts from zero; only its own pieces share a state
        for a in range(0, steps, self.piece_length):
            b = min(steps, a + self.piece_length)
            lengths = (batch.lengths - a).clamp(0, b - a)
            yield Piece(batch.inputs[:, a:b], lengths, batch.targets[:, a:b], None, (), b == steps)
        self.state = None

    def forward(self, model: nn.Module, piece: Piece) -> Tensor:
        """The piece's outputs; a carried state is stored detached for the next piece or batch."""
        if piece.resets is None:
            host = None if piece.lengths_cpu is None else HostLengths(piece.lengths_cpu)  # DDP moves tensors
            return model(piece.inputs, piece.lengths, lengths_cpu=host)
        outputs, state = model(piece.inputs, piece.lengths, state=self.state, resets=piece.resets, with_state=True)
        # Detached: the next chunk's backward stops here (truncated BPTT) and frees this chunk's graph.
        self.state = (state[0].detach(), state[1].detach())
        return outputs

    # ---- checkpoint (stream mode: the state belongs to the loader position it was left at)
    def state_dict(self) -> dict:
        key = self.layout_key() if self.layout_key is not None else None
        if self.state is None:
            return {"layout": key, "h": None, "c": None}
        return {"layout": key, "h": self.state[0].detach().cpu(), "c": self.state[1].detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state if the loader resumed at the position it was saved for; else zeros
        (the loader laid the stream out afresh and said so)."""
        mine = self.layout_key() if self.layout_key is not None else None
        if state.get("h") is None or state.get("layout") != mine:
            self.state = None
            return
        device = self.device or torch.device("cpu")
        self.state = (state["h"].to(device), state["c"].to(device))


class RankState:
    """One rank's checkpoint component made of several (`rng`, `carry`, ...)."""

    def __init__(self, **parts: Any):
        self.parts = parts

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])


def uses_stream(cfg: Any) -> bool:
    """Whether a run trains on the stream layout (an lm run with data.lm_mode=stream)."""
    return get_task(cfg.model.task).streams and cfg.data.lm_mode == "stream"


def check_config(cfg: Any) -> None:
    """Refuse combinations the state carrying cannot honour, naming the keys."""
    task = get_task(cfg.model.task)
    if cfg.data.too_long == "chunk":
        if not task.per_step:
            raise ConfigError(f"data.too_long=chunk needs a per-step task (tag, lm): model.task={task.name!r} "
                              f"predicts one value per sample from the end of the whole sequence; use "
                              f"data.too_long=truncate|drop|error")
        if cfg.model.bidirectional:
            raise ConfigError("data.too_long=chunk carries the LSTM state forward, which a bidirectional model "
                              "cannot do; set model.bidirectional=false or data.too_long=truncate")
        if isinstance(cfg.data.shape_buckets, int) and cfg.data.shape_buckets > 0:
            raise ConfigError(f"data.too_long=chunk keeps long samples whole, so their batches cannot keep to "
                              f"data.shape_buckets={cfg.data.shape_buckets} bounded shapes; set "
                              f"data.shape_buckets=0 (or auto)")
    if uses_stream(cfg) and cfg.data.on_bad_sample == "skip":
        raise ConfigError("data.on_bad_sample=skip is not available with data.lm_mode=stream (a skipped row "
                          "would cut the stream); use data.on_bad_sample=error, or data.lm_mode=windows")

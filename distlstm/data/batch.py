"""The two data types that cross module boundaries: a decoded `Chunk` of a shard and a padded `Batch`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Chunk:
    """Samples of one shard chunk (a Parquet row group or a whole tar shard), decoded into flat arrays.

    Sample ``i`` is ``values[offsets[i]:offsets[i+1]]``. ``labels`` is one value per sample, or, for
    per-step labels (tagging), a flat array aligned with ``values`` rows.
    """

    values: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None
    keys: list[str] = field(default_factory=list)
    first_row: int = 0
    """Row of sample 0 within its shard (for error messages)."""
    bad: dict[int, str] = field(default_factory=dict)
    """Samples found unusable while decoding: local index -> problem."""
    flags: np.ndarray | None = None
    """One bool per sample from an optional flag column read with the chunk (lm stream mode's
    doc_start); None when the shard has no such column."""

    def where(self, i: int) -> str:
        return f"key {self.keys[i]}" if self.keys else f"row {self.first_row + i}"

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Batch:
    """A padded batch; see docs/design.md, "The batch contract"."""

    inputs: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    sample_ids: torch.Tensor
    weight: float = 1.0
    epoch: int = 0
    """Epoch this batch belongs to."""
    consumed: int = 0
    """Global batches of `epoch` consumed once this batch is (the loader's resume position)."""
    num_skipped: int = 0
    """Bad samples left out of this batch (data.on_bad_sample=skip)."""
    tokens: int = -1
    """Real tokens (the real rows' lengths summed), counted by the loader worker so that the training
    thread does no per-step tensor work; -1 = count on demand."""
    items: int = -1
    """What the loss is averaged over (tokens with a target for tag/lm, rows with a target
    otherwise), counted by the loader worker; -1 = count on demand (trainer.item_count)."""
    lengths_host: torch.Tensor | None = None
    """`lengths` still on the host once `to()` moved the batch to a device (packing needs them)."""
    reset: torch.Tensor | None = None
    """lm stream mode: `(B, T)` bool, True where the LSTM state of that row must be zeroed before
    that column (a document, or a discontinuous stretch of the stream, starts there); None otherwise."""

    def _replace(self, fn) -> "Batch":
        return dataclasses.replace(self, inputs=fn(self.inputs), lengths=fn(self.lengths), targets=fn(self.targets),
                                   reset=None if self.reset is None else fn(self.reset))

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        moved = self._replace(lambda t: t.to(device, non_blocking=non_blocking))
        if moved.lengths_host is None and self.lengths.device.type == "cpu":
            moved.lengths_host = self.lengths
        return moved

    @property
    def cpu_lengths(self) -> torch.Tensor:
        """The lengths on the host (no device->host copy when the loader kept them)."""
        if self.lengths.device.type == "cpu":
            return self.lengths
        return self.lengths_host if self.lengths_host is not None else self.lengths.cpu()

    def as_tensors(self) -> "Batch":
        """Workers build batches as numpy arrays (cheap to send between processes); the main
        process wraps them as tensors without a copy."""
        if isinstance(self.inputs, torch.Tensor):
            return self
        return dataclasses.replace(self, inputs=torch.from_numpy(self.inputs), lengths=torch.from_numpy(self.lengths),
                                   targets=torch.from_numpy(self.targets), sample_ids=torch.from_numpy(self.sample_ids),
                                   reset=None if self.reset is None else torch.from_numpy(self.reset))

    def pin_memory(self) -> "Batch":
        return self.as_tensors()._replace(lambda t: t.pin_memory())

    @property
    def num_tokens(self) -> int:
        """Real tokens; dummy rows (bounded shapes) do not count."""
        return self.tokens if self.tokens >= 0 else int(self.lengths.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.inputs.shape[0] * self.inputs.shape[1])

"""The stream layout for language modelling (`data.lm_mode = stream`): pure functions, no I/O.

The training split is one token stream: its rows (Parquet rows or tar samples) concatenated in
index order. A row whose `doc_start` flag is set (every row, when the data has no flag) begins a
document. Position `p` of the stream is a *target* (the token predicted from the tokens before it)
for every `p >= 1`; its input is the token at `p - 1`. The target at a document's first position is
never trained (it would be predicted from another document), and the LSTM state is zeroed before a
document's first token is fed, so no document sees another's state.

A *layout* cuts a list of target *segments* (half-open ranges of positions; at an epoch start the
one segment `[1, num_tokens)`) into `rows = data.batch_size x world size` rows of nearly equal
length (they differ by at most one target), in order. Rank `r` owns rows `r*B .. r*B + B - 1`.
Every step consumes the next `bptt` targets of every row (`chunk_length`), so all ranks run the same
number of steps, and the whole stream is trained exactly once per epoch: every target in exactly
one row, at exactly one step. The state is carried across steps along each row and zeroed where a
row crosses a segment boundary (the stream is discontinuous there), and, in training, before a
chunk with probability `data.state_reset` per row (`state_resets`).

Resume state: `(epoch, segments, rows, offset)`, where `offset` is the number of targets of every row
already consumed. On the same number of rows the run continues exactly, carried state included. On
another number (another world size or batch size) the targets not yet consumed, each row's tail from
`offset`, become the segments of a new layout over the new rows (`StreamLayout.remaining`): nothing
is skipped or repeated, and the carried state starts from zero once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

DOC_START_COLUMN = "doc_start"
"""Parquet column (bool, one per row) / tar sidecar key marking the rows that begin a document."""


@dataclass(frozen=True)
class StreamParams:
    """What besides the data decides a stream layout's chunks."""

    batch_size: int
    """Rows per rank."""
    bptt: int
    """Targets per row per step."""
    jitter: bool = False
    """AWD-LSTM variable chunk lengths (see `chunk_length`)."""
    state_reset: float = 0.0
    """Probability that a row's carried state is zeroed before a chunk (see `state_resets`); 0 = only
    at document starts and seams."""

    def __post_init__(self) -> None:
        if min(self.batch_size, self.bptt) < 1:
            raise ValueError(f"stream parameters must be positive: {self}")
        if not 0.0 <= self.state_reset < 1.0:  # also rejects nan
            raise ValueError(f"state_reset={self.state_reset!r} must be in [0, 1): {self}")

    def fingerprint(self) -> str:
        fields = asdict(self)
        if not self.state_reset:
            del fields["state_reset"]  # off: the fingerprint of the parameters before the option existed
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def chunk_length(params: StreamParams, *, seed: int, epoch: int, relayouts: int, offset: int) -> int:
    """Targets per row of the chunk that starts at `offset`: `bptt`, or with `jitter` AWD-LSTM's draw
    (bptt, or bptt / 2 with probability 0.05, plus N(0, 5) noise; at least 5, at most bptt + 20),
    from a generator keyed by the chunk's position, so a resumed run draws the same lengths."""
    if not params.jitter:
        return params.bptt
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, relayouts, offset, 0x57])
    base = params.bptt if rng.random() < 0.95 else params.bptt / 2
    return int(min(params.bptt + 20, max(min(5, params.bptt), int(rng.normal(base, 5)))))


def state_resets(params: StreamParams, *, seed: int, epoch: int, relayouts: int, offset: int, rows: int,
                 mine: np.ndarray) -> np.ndarray:
    """Which of the rows `mine` (global row numbers, of the layout's `rows`) have their carried state
    zeroed before the chunk that starts at `offset`: each row with probability `params.state_reset`,
    independently, on top of document starts and seams. So that training also sees a zero state with
    ordinary context after it, which is where generation from a short prompt starts (a one-document
    text otherwise almost never resets). The draw comes from a generator keyed by the chunk (seed,
    epoch, relayouts, offset) and covers every row of the layout, each rank keeping its own: the same
    on every rank and worker, for any split of the rows over ranks, and again after a resume, like
    `chunk_length`. All False when `state_reset` is 0 (nothing drawn)."""
    mine = np.asarray(mine, dtype=np.int64)
    if not params.state_reset:
        return np.zeros(mine.shape, bool)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, relayouts, offset, 0x5E7])
    return rng.random(rows)[mine] < params.state_reset


def merge_segments(segments: np.ndarray) -> np.ndarray:
    """Drop empty segments and join segments that continue each other (end == next start)."""
    segments = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
    segments = segments[segments[:, 1] > segments[:, 0]]
    if len(segments) < 2:
        return segments
    joined = segments[1:, 0] == segments[:-1, 1]
    first = np.flatnonzero(np.r_[True, ~joined])
    last = np.r_[first[1:] - 1, len(segments) - 1]
    return np.stack([segments[first, 0], segments[last, 1]], axis=1)


class StreamLayout:
    """`rows` rows over the targets of `segments`; see the module docstring."""

    def __init__(self, segments: np.ndarray, rows: int):
        if rows < 1:
            raise ValueError(f"rows={rows} must be >= 1")
        self.segments = merge_segments(segments)
        self.rows = rows
        sizes = self.segments[:, 1] - self.segments[:, 0]
        self._seg_cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # virtual start of each segment
        self.num_targets = int(self._seg_cum[-1])
        base, extra = divmod(self.num_targets, rows)
        self.row_len = np.full(rows, base, np.int64)
        self.row_len[:extra] += 1
        self.row_start = np.concatenate([[0], np.cumsum(self.row_len)[:-1]]).astype(np.int64)

    @classmethod
    def initial(cls, num_tokens: int, rows: int) -> "StreamLayout":
        """An epoch's layout: every position but the first is a target."""
        return cls(np.array([[1, max(1, num_tokens)]]), rows)

    @property
    def row_length(self) -> int:
        """Targets of the longest row: the offset at which the layout is used up."""
        return int(self.row_len[0]) if self.rows else 0

    def key(self) -> str:
        """Identity of the layout (segments and rows), for checks across ranks and resumes."""
        h = hashlib.sha256(self.segments.tobytes())
        h.update(str(self.rows).encode())
        return h.hexdigest()[:16]

    def _virtual_to_position(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stream position, starts-a-segment) of virtual target indexes `v` (all < num_targets)."""
        s = np.searchsorted(self._seg_cum, v, side="right") - 1
        first = self._seg_cum[s]
        return self.segments[s, 0] + (v - first), v == first

    def positions(self, rows: np.ndarray, offset: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Targets `offset .. offset + length - 1` of each row in `rows`: `(positions, valid, seam)`,
        each `(len(rows), length)`. `valid` is False past a row's end (positions there are 0); `seam`
        is True where the stream is discontinuous before the target (a row or segment starts there),
        so the state must be zeroed before its input."""
        rows = np.asarray(rows, dtype=np.int64)
        steps = offset + np.arange(length, dtype=np.int64)
        valid = steps[None, :] < self.row_len[rows, None]
        v = np.where(valid, self.row_start[rows, None] + steps[None, :], 0)
        pos, seam = self._virtual_to_position(v)
        seam = (seam | (steps[None, :] == 0)) & valid
        return np.where(valid, pos, 0), valid, seam

    def remaining(self, offset: int) -> np.ndarray:
        """Segments of the targets not yet consumed when every row is `offset` targets in: each row's
        tail, in row order (the layout of a resume on another number of rows)."""
        starts = self.row_start + np.minimum(offset, self.row_len)
        ends = self.row_start + self.row_len
        cuts = [self._seg_cum[1:-1]]
        # Split each row's tail [start, end) at the segment boundaries inside it, in virtual indexes.
        bounds = np.unique(np.concatenate([starts, ends, *cuts]))
        pieces = np.stack([bounds[:-1], bounds[1:]], axis=1) if len(bounds) > 1 else np.zeros((0, 2), np.int64)
        row = np.searchsorted(self.row_start, pieces[:, 0], side="right") - 1 if len(pieces) else np.zeros(0, np.int64)
        keep = (pieces[:, 0] >= starts[row]) & (pieces[:, 1] <= ends[row]) & (pieces[:, 1] > pieces[:, 0])
        pieces = pieces[keep]
        if not len(pieces):
            return np.zeros((0, 2), np.int64)
        lo, _ = self._virtual_to_position(pieces[:, 0])
        return merge_segments(np.stack([lo, lo + (pieces[:, 1] - pieces[:, 0])], axis=1))

    def chunk_offsets(self, params: StreamParams, *, seed: int, epoch: int, relayouts: int,
                      offset: int = 0) -> list[tuple[int, int]]:
        """`(offset, length)` of every chunk from `offset` to the end of the layout, the same on every rank."""
        out, end = [], self.row_length
        while offset < end:
            n = min(chunk_length(params, seed=seed, epoch=epoch, relayouts=relayouts, offset=offset), end - offset)
            out.append((offset, n))
            offset += n
        return out

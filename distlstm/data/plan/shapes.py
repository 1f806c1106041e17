"""Bounded batch shapes (`data.shape_buckets = N`): every batch of a run has one of at most N
(rows, padded length) shapes, so that a CUDA graph captured once per shape can replay the whole
training step (distlstm/run/graphs.py). Pure functions of the dataset's lengths and the plan
parameters; the plan (distlstm/data/plan/epoch.py) calls them, so the shapes are the same on every rank
and for every world size.

- **Lengths.** N padded lengths chosen from the histogram of all sample lengths: a length class is
  about as wide as 1 / sqrt(samples of that length), the spacing that minimises rounding padding
  for a given number of classes (crowded lengths get narrow classes, the sparse tails wide ones).
  The last class ends at the longest (clipped) length, so every sample fits. Integer arithmetic
  after one correctly rounded square root, so every machine computes the same lengths.
- **Rows.** One batch size per length: `max(min_batch_size, max_tokens // length)`, capped by
  `max_batch_size`, exactly as the exact-shape plan sizes its buckets.
- **Cutting a window.** Samples sorted by length are cut into full batches class by class; the
  samples left over in a class (fewer than a batch) move up into the next class, where they are
  padded to its length. Only the window's last batch can be partial: the loader fills it up to
  the class's batch size with dummy rows that carry no loss (docs/design.md, the batch contract).
- **Padding.** Rounding to the class length costs about half a class width; the leftovers moving
  up cost about ln(longest / shortest) / 2 batches per window, which is why bounded windows hold
  at least `MIN_WINDOW_BATCHES` batches of tokens (`window_token_floor`).
"""

from __future__ import annotations

import numpy as np

MIN_WINDOW_BATCHES = 256
"""A bounded-shape window holds at least this many full batches' worth of tokens (more chunks than
data.window_chunks when needed): the leftovers that move up a class cost ~3 batches per window,
about 1% of padding at 256 batches (docs/design.md, "Bounded shapes")."""


def shape_lengths(lengths: np.ndarray, count: int) -> np.ndarray:
    """At most `count` padded lengths (sorted, unique, int64) covering `lengths` (already clipped
    to max_length, dropped samples removed)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return shape_lengths_of_histogram(np.bincount(lengths) if len(lengths) else np.zeros(1, np.int64), count)


def shape_lengths_of_histogram(hist: np.ndarray, count: int) -> np.ndarray:
    """`shape_lengths` from the histogram of the lengths (`hist[L]` samples of length L): what the
    plan has, one pass over the chunks' histograms instead of every sample's length."""
    hist = np.asarray(hist, dtype=np.int64)
    if not hist.any():
        return np.zeros(0, np.int64)
    # 256 * sqrt(samples of each length), as integers: the cumulative sum is exact, so the cut
    # points are identical on every rank (sqrt itself is correctly rounded by IEEE 754).
    weight = np.floor(np.sqrt(hist.astype(np.float64) * 65536.0)).astype(np.int64)
    cum = np.cumsum(weight)
    total = int(cum[-1])
    targets = (np.arange(1, count + 1, dtype=np.int64) * total + count - 1) // count
    return np.unique(np.searchsorted(cum, targets, side="left")).astype(np.int64)


def window_token_floor(max_tokens: int) -> int:
    """Fewest tokens a bounded-shape window holds (see MIN_WINDOW_BATCHES)."""
    return MIN_WINDOW_BATCHES * max_tokens


def cut_counts(per_class: np.ndarray, rows: np.ndarray) -> tuple[list[int], int, int]:
    """Full batches per length class, the class of the last (partial) batch, and its real rows (0 =
    no partial batch) for a window with `per_class` samples in each class."""
    present = np.flatnonzero(per_class)
    if len(present) == 0:
        return [0] * len(rows), -1, 0
    top = int(present[-1])
    full = [0] * len(rows)
    carry = 0
    for k, (n, b) in enumerate(zip(per_class[:top + 1].tolist(), rows[:top + 1].tolist())):
        full[k], carry = divmod(carry + n, b)
    return full, top, carry


def count_batches(per_class: np.ndarray, rows: np.ndarray) -> int:
    full, _, partial = cut_counts(per_class, rows)
    return sum(full) + (partial > 0)


def cut_sorted(per_class: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(real rows, class) of each batch, in the order of the length-sorted samples they take."""
    full, top, partial = cut_counts(per_class, rows)
    sizes = np.repeat(rows, full)
    classes = np.repeat(np.arange(len(rows), dtype=np.int64), full)
    if partial:
        sizes, classes = np.r_[sizes, partial], np.r_[classes, top]
    return sizes.astype(np.int64), classes.astype(np.int64)

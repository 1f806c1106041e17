"""The data plan: which samples form which batch, and which rank gets it. Pure functions of
(lengths, seed, epoch, streams, world size); no process group, no I/O, so every rank computes the
same plan and tests can simulate 64 ranks in one process.

One epoch, step by step:
1. a seeded permutation orders the chunks (Parquet row groups or tar shards);
2. the chunks are dealt to `streams` streams, in that order, each to the stream with the fewest
   tokens so far; each stream cuts its chunks into consecutive windows of `window_chunks`; only one
   window per stream is materialised at a time;
3. in a window, samples are sorted by length (random tie-break) and cut into batches within
   geometric length buckets, `max(min_batch_size, max_tokens // bucket_len)` samples each, so the
   padded size stays under the token budget while long buckets keep a batch-size floor;
4. batch order is shuffled within the window, and a stream's batches are its windows' batches in
   turn;
5. the global order takes one batch from each stream in turn: global batch `g` is batch `g // K`
   of stream `g % K` (K = streams). A stream that runs out before the longest one fills its slots
   with *fillers* (its own last batch again, weight 0), so `g % K` names the stream of every slot.
   The list of global batches does not depend on the world size.

With `shape_buckets = N > 0` (bounded shapes, distlstm/data/plan/shapes.py) step 3 pads every batch to
one of at most N (rows, length) shapes instead: full batches class by class, the leftovers of a
length class moving up to the next, one partial batch per window (the loader fills it with dummy
rows), and windows grown to at least `shapes.MIN_WINDOW_BATCHES` batches of tokens.

Rank `r` of `N`, resuming at global batch `start`, takes `start + r, start + r + N, ...`. When fewer
than `N` batches remain in the last round, the ranks without one get a filler (a batch of the same
stream as the slot, weight 0), so every rank runs `ceil((G - start) / N)` steps and DDP never waits
on a rank that ran out. Because the state is just (epoch, global batches consumed), a restart on a
different number of ranks continues the epoch with nothing repeated and nothing skipped.

Why streams: with `K = N x W` (ranks x DataLoader workers per rank), the worker that produces
global batch `g` is fixed by `g mod N W` (ranks take every N-th batch, workers every W-th of
those), so each stream, and with it each chunk, is read and decoded by exactly one worker of one
rank per epoch. With `K = 1` every worker touches every window: the dataset is decoded `N x W`
times per epoch (though each sample still goes into one batch on one rank).
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

from distlstm.data.plan import shapes as bounded
from distlstm.data.plan.chunks import ChunkLengths

# Geometric bucket edges: a bucket spans lengths (edge[k-1], edge[k]]. 5% steps keep the worst-case
# padding inside a bucket small, and sorting inside the window makes the typical case far smaller.
_BUCKET_GROWTH = 1.05
_MIN_BUCKET_LEN = 8


@dataclass(frozen=True)
class PlanParams:
    """Everything besides the data that decides the plan (hashed across ranks at each epoch start)."""

    max_tokens: int
    min_batch_size: int = 1
    max_batch_size: int = 0
    max_length: int = 1024
    too_long: str = "truncate"
    window_chunks: int = 16
    shuffle: bool = True
    streams: int = 1
    shape_buckets: int = 0
    """0: pad each batch to its longest sample; N: at most N distinct batch shapes (module docstring)."""

    def __post_init__(self) -> None:
        if self.too_long not in ("truncate", "drop", "error", "chunk"):
            raise ValueError(f"too_long={self.too_long!r}; choose truncate, drop, error or chunk")
        if min(self.max_tokens, self.min_batch_size, self.max_length, self.window_chunks, self.streams) < 1:
            raise ValueError(f"plan parameters must be positive: {self}")
        if self.shape_buckets < 0:
            raise ValueError(f"shape_buckets={self.shape_buckets} must be >= 0")

    def fingerprint(self) -> str:
        fields = asdict(self)
        if not fields["shape_buckets"]:  # exact shapes keep the fingerprint checkpoints were saved with
            del fields["shape_buckets"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def bucket_edges(max_length: int) -> np.ndarray:
    edges = [min(_MIN_BUCKET_LEN, max_length)]
    while edges[-1] < max_length:
        edges.append(min(max_length, max(edges[-1] + 1, math.ceil(edges[-1] * _BUCKET_GROWTH))))
    return np.asarray(edges, dtype=np.int64)


def bucket_batch_sizes(edges: np.ndarray, params: PlanParams) -> np.ndarray:
    sizes = np.maximum(params.min_batch_size, params.max_tokens // edges)
    if params.max_batch_size:
        sizes = np.minimum(sizes, params.max_batch_size)
    return sizes.astype(np.int64)


def _rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, *stream])


def segments(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenated aranges: starts[i] .. starts[i]+sizes[i]-1, vectorised."""
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_begin = np.cumsum(sizes) - sizes
    return np.repeat(starts - seg_begin, sizes) + np.arange(total, dtype=np.int64)


class EpochPlan:
    """One epoch's global batches. Counting takes one pass over the chunks' length histograms
    (distlstm/data/plan/chunks.py), never a per-sample array; a window's batches are materialised on
    demand from its samples' lengths, so memory follows the chunks and the window, not the dataset.

    `lengths` is a `ChunkLengths`, or every sample's length (tests and tools: its histograms are
    built here and it answers `lengths_of`). `lengths_of(chunks)` gives the lengths of the samples
    of `chunks`, chunk by chunk in that order (the loader: from the decoded window); they must agree
    with the histograms, or the window's batch count would differ from the one planned."""

    def __init__(self, chunk_offsets: np.ndarray | None, lengths, params: PlanParams, *,
                 seed: int, epoch: int, lengths_of: Callable[[np.ndarray], np.ndarray] | None = None):
        self.params, self.seed, self.epoch = params, seed, epoch
        if isinstance(lengths, ChunkLengths):
            stats = lengths
        else:
            array = np.asarray(lengths)
            stats = ChunkLengths.from_lengths(chunk_offsets, array)
            if lengths_of is None:
                lengths_of = lambda chunks: array[self._window_ids(chunks)]  # noqa: E731
        self.stats = stats
        self.lengths_of = lengths_of
        self._offsets = stats.chunk_offsets
        self.bounded = params.shape_buckets > 0
        drop = params.too_long == "drop"
        clipped, kept_tokens, kept_hist = stats.per_chunk(params.max_length, drop, with_histogram=self.bounded)
        if self.bounded:
            kept_hist = kept_hist.copy()
            kept_hist[0] = 0
            self._edges = bounded.shape_lengths_of_histogram(kept_hist, params.shape_buckets)
        else:
            self._edges = bucket_edges(params.max_length)
        self._sizes = bucket_batch_sizes(self._edges, params)
        # Bucket of every possible (clipped) length: a gather instead of a search per sample.
        self._bucket_of = np.searchsorted(self._edges, np.arange(params.max_length + 1)).astype(np.int64)
        n_chunks = stats.num_chunks
        order = _rng(seed, epoch, 0).permutation(n_chunks) if params.shuffle else np.arange(n_chunks)
        K, size = params.streams, params.window_chunks
        # Each stream owns a random share of the whole dataset (so its windows mix as well as with
        # one stream); windows are numbered stream by stream.
        self._windows, first_window = [], [0]
        for mine in self._deal(order, K, clipped):
            if self.bounded:
                self._windows += _token_windows(mine, kept_tokens, size, bounded.window_token_floor(params.max_tokens))
            else:
                self._windows += [mine[i:i + size] for i in range(0, len(mine), size)]
            first_window.append(len(self._windows))
        counts = self._count_batches()
        self._window_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._first_window = np.asarray(first_window, dtype=np.int64)
        self._stream_start = self._window_start[first_window]
        self._stream_len = np.diff(self._stream_start)
        longest = int(self._stream_len.max()) if K else 0
        self._num_batches = longest * K if K > 1 else int(self._stream_len[0])
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = OrderedDict()

    @classmethod
    def of(cls, stats: ChunkLengths, params: PlanParams, *, seed: int, epoch: int) -> "EpochPlan":
        """The plan of (stats, params, seed, epoch), built once per process and shared by whoever
        asks (the run's step count, the loader, its description); a few epochs are kept."""
        key = (params, seed, epoch)
        if key not in stats.plans:
            stats.plans[key] = cls(None, stats, params, seed=seed, epoch=epoch)
            while len(stats.plans) > 3:
                stats.plans.popitem(last=False)
        return stats.plans[key]

    def with_lengths(self, lengths_of: Callable[[np.ndarray], np.ndarray]) -> "EpochPlan":
        """This plan (its counts shared) materialising windows from `lengths_of`, with its own
        window cache."""
        twin = copy.copy(self)
        twin.lengths_of, twin._cache = lengths_of, OrderedDict()
        return twin

    def _deal(self, order: np.ndarray, K: int, tokens: np.ndarray) -> list[np.ndarray]:
        """Chunks of each stream, in `order`: each chunk goes to the stream with the fewest tokens
        so far (ties to the lower stream), so the streams end within about one chunk of each other
        and few fillers are needed when the shorter ones run out."""
        if K == 1:
            return [order]
        heap = [(0, s) for s in range(K)]
        owner = np.empty(len(order), np.int64)
        for p, t in enumerate(tokens[order].tolist()):
            load, s = heap[0]
            owner[p] = s
            heapq.heapreplace(heap, (load + t, s))
        return [order[owner == s] for s in range(K)]

    def _count_batches(self) -> np.ndarray:
        """Batches of every window, from the windows' samples per length bucket: one pass over the
        chunks' histograms, accumulated per window (O(chunks + windows x buckets) memory)."""
        W, B, M = len(self._windows), len(self._edges), self.params.max_length
        # Every chunk is in one window: (its window x B), the start of its row of bucket counts.
        row_of = np.zeros(self.stats.num_chunks, np.int64)
        for w, chunks in enumerate(self._windows):
            row_of[chunks] = w * B
        # Bucket of each length as batched (clipped to M), up to the longest sample; -1: dropped.
        top = max(int(self.stats.longest.max()) if self.stats.num_chunks else 0, M)
        bucket = self._bucket_of[np.minimum(np.arange(top + 1), M)]
        if self.params.too_long == "drop":
            bucket[M + 1:] = -1
        per_bucket = np.zeros(W * B, np.int64)
        for block in self.stats.blocks():
            b = bucket[block.lengths]
            key = np.repeat(row_of[block.first:block.first + block.num_chunks], np.diff(block.ptr)) + b
            n = block.counts
            if self.params.too_long == "drop":
                key, n = key[b >= 0], n[b >= 0]
            # A block's chunks lie in windows all over the epoch: a scatter-add, not a bincount
            # over the whole (windows x buckets) span per block.
            np.add.at(per_bucket, key, n)
        per_bucket = per_bucket.reshape(W, B)
        if self.bounded:
            return np.array([bounded.count_batches(row, self._sizes) for row in per_bucket], dtype=np.int64)
        return (-(-per_bucket // self._sizes)).sum(axis=1).astype(np.int64)

    def _window_ids(self, chunks: np.ndarray) -> np.ndarray:
        return segments(self._offsets[chunks], self._offsets[chunks + 1] - self._offsets[chunks])

    def _locate(self, g: int) -> tuple[int, int, bool]:
        """(window, batch within the window, is_filler) of global slot `g` (any g >= 0: past the end
        of the epoch, the slot of the same stream in the last round)."""
        K, G = self.params.streams, self._num_batches
        if g >= G:  # the last round's padding: a slot of the same stream, as a filler
            g -= K * -(-(g - G + 1) // K)
            filler = True
        else:
            filler = False
        s, j = g % K, g // K
        n = int(self._stream_len[s])
        if j >= n:  # this stream ran out before the longest one
            filler = True
            if n == 0:  # more streams than chunks: borrow the longest stream's last batch
                s = int(np.argmax(self._stream_len))
                n = int(self._stream_len[s])
            j = n - 1
        pos = int(self._stream_start[s]) + j
        w = int(np.searchsorted(self._window_start, pos, side="right") - 1)
        return w, pos - int(self._window_start[w]), filler

    @property
    def num_batches(self) -> int:
        """Global batches of the epoch, fillers of streams that ran out included."""
        return self._num_batches

    @property
    def num_real_batches(self) -> int:
        return int(self._window_start[-1])

    @property
    def stream_lengths(self) -> np.ndarray:
        """Batches of each stream (the longest one sets the epoch's length)."""
        return self._stream_len.copy()

    def _window_samples(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample ids, lengths as batched, true lengths) of window `w`'s kept samples."""
        chunks = self._windows[w]
        ids = self._window_ids(chunks)
        if self.lengths_of is None:
            raise RuntimeError("this plan counts batches only: give lengths_of to materialise a window")
        true = np.asarray(self.lengths_of(chunks)).astype(np.int64)
        if len(true) != len(ids):
            raise ValueError(f"window {w}: {len(true)} lengths for {len(ids)} samples")
        if self.params.too_long == "drop":
            keep = true <= self.params.max_length
            ids, true = ids[keep], true[keep]
        return ids, np.minimum(true, self.params.max_length), true

    @property
    def num_windows(self) -> int:
        return len(self._windows)

    def window_batches(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(batch_offsets, sample_ids) of window `w`; batch b is sample_ids[offsets[b]:offsets[b+1]]."""
        if w in self._cache:
            return self._cache[w][:2]
        ids, lens, true = self._window_samples(w)
        rng = _rng(self.seed, self.epoch, 1, w)
        if self.params.shuffle:  # random order, then a stable sort by length: random tie-break
            perm = rng.permutation(len(ids))
            ids, lens, true = ids[perm], lens[perm], true[perm]
        # Lengths fit 16 bits for any sane max_length, and numpy radix-sorts 16-bit keys.
        key = lens.astype(np.uint16) if self.params.max_length < 1 << 16 else lens
        if self.params.too_long == "chunk":  # longer samples stay whole: batch them by their true length
            key = true
        order = np.argsort(key, kind="stable")
        ids, buckets = ids[order], self._bucket_of[lens[order]]
        classes = None
        if self.bounded:
            sizes, classes = bounded.cut_sorted(np.bincount(buckets, minlength=len(self._edges)), self._sizes)
            starts = np.cumsum(sizes) - sizes
        else:
            starts, sizes = self._cut_buckets(ids, buckets)
        perm = rng.permutation(len(starts)) if self.params.shuffle else np.arange(len(starts))
        sample_ids = ids[segments(starts[perm], sizes[perm])]
        offsets = np.concatenate([[0], np.cumsum(sizes[perm])]).astype(np.int64)
        self._cache[w] = (offsets, sample_ids, None if classes is None else classes[perm])
        while len(self._cache) > self.params.streams:  # one window per stream in use
            self._cache.popitem(last=False)
        return offsets, sample_ids

    def _cut_buckets(self, ids: np.ndarray, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, size) of each batch over length-sorted samples: within each bucket, batches of
        the bucket's size (the last one of a bucket may be smaller)."""
        # Position of each sample within its bucket -> batch number within the bucket.
        per_bucket = np.bincount(buckets, minlength=len(self._edges))
        first = (np.cumsum(per_bucket) - per_bucket)[buckets]
        batch_key = buckets * (len(ids) + 1) + (np.arange(len(ids)) - first) // self._sizes[buckets]
        starts = np.flatnonzero(np.r_[True, batch_key[1:] != batch_key[:-1]]) if len(ids) else np.zeros(0, np.int64)
        return starts, np.diff(np.r_[starts, len(ids)])

    def batch(self, g: int) -> np.ndarray:
        """Sample ids of global batch `g` (for a filler, those of the batch it repeats)."""
        if not 0 <= g < self.num_batches:
            raise IndexError(f"global batch {g} outside epoch of {self.num_batches}")
        w, b, _ = self._locate(g)
        offsets, ids = self.window_batches(w)
        return ids[offsets[b]:offsets[b + 1]]

    def is_filler(self, g: int) -> bool:
        return self._locate(g)[2]

    def batch_shape(self, g: int) -> tuple[int, int] | None:
        """(rows, padded length) of global batch `g` with bounded shapes (a filler's is that of the
        batch it repeats); None with exact shapes (the loader pads to the longest sample)."""
        if not self.bounded:
            return None
        w, b, _ = self._locate(g)
        self.window_batches(w)
        k = int(self._cache[w][2][b])
        return int(self._sizes[k]), int(self._edges[k])

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, padded length) a batch of this plan can have (bounded shapes; else [])."""
        return [(int(b), int(t)) for b, t in zip(self._sizes, self._edges)] if self.bounded else []

    def window_chunks(self, g: int) -> np.ndarray:
        """Chunk ids of the window holding global batch `g` (a filler's: the batch it repeats)."""
        return self._windows[self._locate(g)[0]]

    def next_window_chunks(self, g: int) -> np.ndarray | None:
        """Chunk ids of the window that follows the one holding batch `g` in the same stream (what
        the worker reading that stream reads next), or None after the stream's last window."""
        w = self._locate(g)[0]
        s = int(np.searchsorted(self._first_window, w, side="right") - 1)
        return self._windows[w + 1] if w + 1 < self._first_window[s + 1] else None

    def batches_per_rank(self, dp_world_size: int, start: int = 0) -> int:
        return max(0, -(-(self.num_batches - start) // dp_world_size))

    def rank_batch(self, i: int, *, dp_rank: int, dp_world_size: int, start: int = 0) -> tuple[np.ndarray, bool]:
        """The i-th batch of rank `dp_rank`: (sample ids, is_filler)."""
        g = start + dp_rank + i * dp_world_size
        w, b, filler = self._locate(g)
        offsets, ids = self.window_batches(w)
        return ids[offsets[b]:offsets[b + 1]], filler

    def rank_batches(self, *, dp_rank: int, dp_world_size: int, start: int = 0) -> Iterator[tuple[np.ndarray, bool]]:
        for i in range(self.batches_per_rank(dp_world_size, start)):
            yield self.rank_batch(i, dp_rank=dp_rank, dp_world_size=dp_world_size, start=start)


def _token_windows(order: np.ndarray, chunk_tokens: np.ndarray, min_chunks: int, min_tokens: int) -> list[np.ndarray]:
    """Consecutive runs of `order` with at least `min_chunks` chunks and `min_tokens` tokens each; a
    tail with less than half of `min_tokens` joins the window before it."""
    cum = np.concatenate([[0], np.cumsum(chunk_tokens[order])])
    windows, start, n = [], 0, len(order)
    while start < n:
        end = min(n, max(start + min_chunks, int(np.searchsorted(cum, cum[start] + min_tokens, side="left"))))
        windows.append(order[start:end])
        start = end
    if len(windows) > 1 and cum[n] - cum[n - len(windows[-1])] < min_tokens // 2:
        windows[-2:] = [np.concatenate(windows[-2:])]
    return windows


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray], max_length: int,
                     shapes: list[tuple[int, int]] | None = None) -> float:
    """1 - real tokens / padded tokens over `batches` (lists of sample ids); with bounded shapes pass
    each batch's (rows, length) as `shapes` (dummy rows and padded lengths count as padding)."""
    real = padded = 0
    for i, ids in enumerate(batches):
        lens = np.minimum(lengths[ids], max_length)
        real += int(lens.sum())
        padded += shapes[i][0] * shapes[i][1] if shapes else int(lens.max()) * len(ids)
    return 1.0 - real / max(padded, 1)

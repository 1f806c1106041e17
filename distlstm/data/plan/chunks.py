"""What the plan knows of the samples: per chunk (Parquet row group, tar shard), the exact
histogram of its sample lengths, its token total and its longest sample. Never one value per
sample: memory and planning time follow the number of chunks and of distinct lengths in a chunk,
not the number of samples (a row group of 1,024 samples with lengths 4..64 holds ~60 pairs).

The histograms are read in *blocks* of consecutive chunks (`ChunkLengths.blocks()`): from memory
for a small dataset, or one shard at a time from wherever the index keeps them (its cache files,
or a virtual dataset's generator), so that a plan pass over a billion samples holds one block at
a time. Per-sample lengths appear only for the window being batched: the loader takes them from
the decoded data (`EpochPlan(..., lengths_of=...)`).

Pure: no I/O here; the index (distlstm/data/shards/index.py) decides where blocks come from.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np


@dataclass(frozen=True)
class Block:
    """Length histograms of chunks `first .. first + len(ptr) - 2`, in CSR form: chunk
    `first + i` has `counts[ptr[i]:ptr[i+1]]` samples of lengths `lengths[ptr[i]:ptr[i+1]]`."""

    first: int
    ptr: np.ndarray
    lengths: np.ndarray
    counts: np.ndarray

    @property
    def num_chunks(self) -> int:
        return len(self.ptr) - 1

    def lengths_of(self, local: int) -> np.ndarray:
        """Sample lengths of chunk `first + local` in ascending order (what the histogram knows)."""
        lo, hi = int(self.ptr[local]), int(self.ptr[local + 1])
        return np.repeat(self.lengths[lo:hi], self.counts[lo:hi])


def histogram_block(first: int, rows: Iterable[int], lengths: np.ndarray) -> Block:
    """The Block of consecutive chunks with `rows` samples each, whose samples have `lengths`."""
    rows = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(rows.sum()) != len(lengths):
        raise ValueError(f"{len(lengths)} lengths for {int(rows.sum())} rows")
    chunk = np.repeat(np.arange(len(rows), dtype=np.int64), rows)
    if len(lengths):
        key = chunk * (int(lengths.max()) + 1) + lengths
        uniq, counts = np.unique(key, return_counts=True)
        width = int(lengths.max()) + 1
        owner, values = uniq // width, uniq % width
    else:
        owner = values = counts = np.zeros(0, np.int64)
    ptr = np.searchsorted(owner, np.arange(len(rows) + 1), side="left").astype(np.int64)
    return Block(first, ptr, values.astype(np.int64), counts.astype(np.int64))


class ChunkLengths:
    """Per-chunk sample counts, token totals and longest samples (in memory, O(chunks)), and the
    per-chunk length histograms (`blocks()`, in memory or read block by block)."""

    def __init__(self, rows: np.ndarray, tokens: np.ndarray, longest: np.ndarray, blocks,
                 shortest: np.ndarray | None = None):
        """`blocks`: a list of Blocks, or a source with `blocks()` (iterate them) and `block_of(c)`
        (the one holding chunk c); picklable, since loader workers get a copy."""
        self.rows = np.asarray(rows, dtype=np.int64)
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.longest = np.asarray(longest, dtype=np.int64)
        self.shortest = np.zeros(len(self.rows), np.int64) if shortest is None else np.asarray(shortest, np.int64)
        """Shortest sample per chunk (0 where unknown: then passes assume empty samples may exist)."""
        self.chunk_offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        self._source = blocks
        self._memo: dict = {}
        self.plans: OrderedDict = OrderedDict()
        """Plans built over these chunks, by (params, seed, epoch): built once per process."""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "plans": OrderedDict()}  # a worker plans for itself

    @classmethod
    def from_lengths(cls, chunk_offsets: np.ndarray, lengths: np.ndarray) -> "ChunkLengths":
        """From every sample's length (tests, small tools): one block in memory."""
        offsets = np.asarray(chunk_offsets, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        rows = np.diff(offsets)
        block = histogram_block(0, rows, lengths[:int(offsets[-1])] if len(offsets) else lengths)
        tokens, longest, shortest = block_sums(block)
        return cls(rows, tokens, longest, [block], shortest)

    @classmethod
    def concat(cls, parts: list["ChunkLengths"]) -> "ChunkLengths":
        """One dataset from its shards' ChunkLengths, in order (blocks renumbered, read lazily)."""
        cat = (lambda arrays: np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
        return cls(cat([p.rows for p in parts]), cat([p.tokens for p in parts]), cat([p.longest for p in parts]),
                   _Parts(parts), cat([p.shortest for p in parts]))

    @property
    def num_chunks(self) -> int:
        return len(self.rows)

    @property
    def num_samples(self) -> int:
        return int(self.chunk_offsets[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.sum())

    def blocks(self) -> Iterator[Block]:
        """The histograms, block after block in chunk order, covering every chunk once."""
        return iter(self._source) if isinstance(self._source, list) else self._source.blocks()

    def block_of(self, c: int) -> Block:
        """The block holding chunk `c`."""
        if not 0 <= c < self.num_chunks:
            raise IndexError(f"chunk {c} outside {self.num_chunks} chunks")
        if not isinstance(self._source, list):
            return self._source.block_of(c)
        for b in self._source:
            if b.first <= c < b.first + b.num_chunks:
                return b
        raise IndexError(f"chunk {c}: no block holds it")

    def chunk_lengths(self, c: int) -> np.ndarray:
        """Sample lengths of chunk `c`, ascending (what the histogram knows)."""
        b = self.block_of(c)
        return b.lengths_of(c - b.first)

    def per_chunk(self, max_length: int, drop: bool, with_histogram: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(tokens clipped to max_length, tokens as batched, histogram of the batched lengths): per
        chunk `sum(min(L, M))` (how chunks are dealt to streams) and `sum(clip(L, 1, M))` without
        the samples too_long=drop drops (bounded windows' token floor), and the dataset's histogram
        of those batched lengths (bounded shapes' classes; None without `with_histogram` when no
        pass was needed). One pass over the blocks, remembered; none when no sample is clipped,
        dropped or empty and the histogram is not asked for."""
        key = (max_length, drop)
        if key not in self._memo and not with_histogram and (self.longest <= max_length).all() and \
                (self.shortest >= 1).all():
            return self.tokens, self.tokens, None  # nothing clipped, dropped or raised to 1: no pass
        if key not in self._memo:
            clipped, kept = [], []
            hist = np.zeros(max_length + 1, np.int64)
            for b in self.blocks():
                L, n = b.lengths, b.counts
                clipped.append(_per_chunk_sum(b, np.minimum(L, max_length) * n))
                keep = n * (L <= max_length) if drop else n
                k = np.clip(L, 1, max_length)
                kept.append(_per_chunk_sum(b, k * keep))
                hist += np.bincount(k, weights=keep, minlength=max_length + 1).astype(np.int64)
            cat = (lambda arrays: np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
            clipped, kept = cat(clipped), cat(kept)
            self._memo[key] = (clipped, kept, hist)
        return self._memo[key]

    def fingerprint(self) -> str:
        """Identity of the chunk layout and lengths, from per-chunk values (O(chunks))."""
        h = hashlib.sha256()
        for a in (self.rows, self.tokens, self.longest):
            h.update(a.tobytes())
        return h.hexdigest()[:16]


class _Parts:
    """The blocks of consecutive ChunkLengths (a dataset's shards), renumbered."""

    def __init__(self, parts: list[ChunkLengths]):
        self.parts = parts
        self.firsts = np.concatenate([[0], np.cumsum([p.num_chunks for p in parts])]).astype(np.int64)

    def blocks(self) -> Iterator[Block]:
        for base, part in zip(self.firsts.tolist(), self.parts):
            for b in part.blocks():
                yield Block(base + b.first, b.ptr, b.lengths, b.counts)

    def block_of(self, c: int) -> Block:
        p = int(np.searchsorted(self.firsts, c, side="right") - 1)
        b = self.parts[p].block_of(c - int(self.firsts[p]))
        return Block(int(self.firsts[p]) + b.first, b.ptr, b.lengths, b.counts)


def _per_chunk_sum(block: Block, values: np.ndarray) -> np.ndarray:
    """Sum of `values` (one per entry) over each chunk's entries (contiguous in CSR order)."""
    present = np.diff(block.ptr) > 0
    out = np.zeros(block.num_chunks, np.int64)
    if present.any():
        out[present] = np.add.reduceat(values, block.ptr[:-1][present])
    return out


def block_sums(block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, longest, shortest) of each chunk of one block (an empty chunk's shortest is 2^62;
    entries sorted by length within each chunk)."""
    n = block.num_chunks
    tokens = _per_chunk_sum(block, block.lengths * block.counts)
    # Entries are sorted by length within a chunk: the first is the shortest, the last the longest.
    present = np.diff(block.ptr) > 0
    if not len(block.lengths):
        return tokens, np.zeros(n, np.int64), np.full(n, 1 << 62, np.int64)
    longest = np.where(present, block.lengths[np.maximum(block.ptr[1:] - 1, 0)], 0).astype(np.int64)
    shortest = np.where(present, block.lengths[np.minimum(block.ptr[:-1], len(block.lengths) - 1)],
                        1 << 62).astype(np.int64)
    return tokens, longest, shortest


class VirtualLengths:
    """A dataset that exists only as chunk histograms: `num_chunks` chunks of `rows` samples with
    lengths drawn uniformly from [low, high], generated block by block from `seed` (the same blocks
    every pass). For planning benchmarks and tests at sizes whose files would not fit a machine."""

    BLOCK_CHUNKS = 4096

    def __init__(self, num_chunks: int, rows: int, low: int, high: int, seed: int = 0):
        self.num_chunks, self.rows, self.low, self.high, self.seed = num_chunks, rows, low, high, seed

    def _block(self, k: int) -> Block:
        first = k * self.BLOCK_CHUNKS
        n = min(self.BLOCK_CHUNKS, self.num_chunks - first)
        width = self.high - self.low + 1
        # Near-uniform counts, cheap to generate: rows // width of every length, the remainder on a
        # run of lengths starting at a random place per chunk.
        shift = np.random.default_rng([self.seed, k]).integers(0, width, size=n)
        base, extra = divmod(self.rows, width)
        counts = base + ((np.arange(width)[None, :] - shift[:, None]) % width < extra)
        if base:  # every length present in every chunk: the CSR is the dense matrix
            ptr = np.arange(n + 1, dtype=np.int64) * width
            return Block(first, ptr, np.tile(np.arange(self.low, self.high + 1, dtype=np.int64), n),
                         counts.reshape(-1).astype(np.int64))
        chunk, value = np.nonzero(counts)
        ptr = np.searchsorted(chunk, np.arange(n + 1), side="left").astype(np.int64)
        return Block(first, ptr, (value + self.low).astype(np.int64), counts[chunk, value].astype(np.int64))

    def blocks(self) -> Iterator[Block]:
        for k in range(-(-self.num_chunks // self.BLOCK_CHUNKS)):
            yield self._block(k)

    def block_of(self, c: int) -> Block:
        k = c // self.BLOCK_CHUNKS
        if getattr(self, "_last", (None,))[0] != k:
            self._last = (k, self._block(k))
        return self._last[1]

    def lengths_of(self, chunks: np.ndarray) -> np.ndarray:
        """Sample lengths of `chunks`, chunk by chunk (ascending within a chunk): a plan's `lengths_of`."""
        width = self.high - self.low + 1
        base, extra = divmod(self.rows, width)
        parts = []
        for c in np.asarray(chunks).tolist():  # one chunk's row of its block (as `_block` draws it)
            k = c // self.BLOCK_CHUNKS
            n = min(self.BLOCK_CHUNKS, self.num_chunks - k * self.BLOCK_CHUNKS)
            shift = np.random.default_rng([self.seed, k]).integers(0, width, size=n)[c - k * self.BLOCK_CHUNKS]
            counts = base + ((np.arange(width) - shift) % width < extra)
            parts.append(np.repeat(np.arange(self.low, self.high + 1, dtype=np.int64), counts))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def chunk_lengths(self) -> ChunkLengths:
        sums = [block_sums(b) for b in self.blocks()]
        cat = (lambda k: np.concatenate([x[k] for x in sums]) if sums else np.zeros(0, np.int64))
        return ChunkLengths(np.full(self.num_chunks, self.rows, np.int64), cat(0), cat(1), self, cat(2))


LENGTHS_KEY = "distlstm.lengths"
"""Parquet key-value metadata written by distlstm.prep: the row groups' length histograms of the
sequence column, so that indexing reads the footer only (covered by the shard's checksum)."""
_LENGTHS_VERSION = 1


def encode_block(block: Block, column: str) -> str:
    """`block` (a shard's row groups) as the LENGTHS_KEY value: JSON with little-endian base64 arrays."""
    import base64
    import json

    def pack(a: np.ndarray, dtype: str) -> str:
        return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode()

    return json.dumps({"version": _LENGTHS_VERSION, "column": column, "ptr": pack(block.ptr, "<i8"),
                       "lengths": pack(block.lengths, "<i8"), "counts": pack(block.counts, "<i8")})


def decode_block(text: str | bytes, *, column: str, rows: list[int]) -> Block | None:
    """The Block of a LENGTHS_KEY value, or None when it is for another column, another version, or
    does not fit `rows` (row group sizes from the footer): the caller then reads the lengths."""
    import base64
    import binascii
    import json
    try:
        meta = json.loads(text)
        if meta.get("version") != _LENGTHS_VERSION or meta.get("column") != column:
            return None
        ptr, lengths, counts = (np.frombuffer(base64.b64decode(meta[k]), "<i8").astype(np.int64)
                                for k in ("ptr", "lengths", "counts"))
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        return None
    block = Block(0, ptr, lengths, counts)
    if len(ptr) != len(rows) + 1 or ptr[0] != 0 or ptr[-1] != len(lengths) or len(counts) != len(lengths) \
            or (np.diff(ptr) < 0).any() or (lengths < 0).any() or (counts <= 0).any():
        return None
    if not np.array_equal(_per_chunk_sum(block, counts), np.asarray(rows, np.int64)):
        return None
    return block

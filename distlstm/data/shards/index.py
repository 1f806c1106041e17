"""The dataset index: shards, their chunks (Parquet row groups or whole tar shards) and, per chunk,
the histogram of its sample lengths (distlstm/data/plan/chunks.py), which is all the plan needs.
Built once per shard and cached by (URL, size, mtime); never an array with one value per sample in
memory: a large dataset's histograms stay in the cache files and are read one shard at a time."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distlstm.data.batch import Chunk
from distlstm.data.errors import BadSampleError
from distlstm.data.plan.chunks import Block, ChunkLengths, block_sums, histogram_block
from distlstm.data.shards.manifest import Manifest
from distlstm.data.shards.paths import expand_paths
from distlstm.data.sources import WHOLE_FILE_MAX_MB, basename, file_info, is_local, redact
from distlstm.tasks import get_task
from distlstm.data.shards.parquet import parquet_layout, read_parquet_chunk
from distlstm.data.shards.parquet_remote import Source
from distlstm.data.shards.tar import read_sidecar_flags, read_tar_chunk, tar_lengths
from distlstm.data.shards.dims import FooterFacts, parquet_column_names
from distlstm.data.shards.verify import verify_shards


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTLSTM_CACHE", Path.home() / ".cache" / "distlstm"))


def shard_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = path.split("?")[0].lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    raise ValueError(f"cannot tell the format of {redact(path)} from its name; set --data.format parquet|tar")


@dataclass
class DatasetIndex:
    """Shards, chunk boundaries and per-chunk length histograms of one split."""

    shards: list[str]
    formats: list[str]
    chunk_shard: np.ndarray      # shard number of each chunk
    chunk_local: np.ndarray      # row group within the shard (0 for tar)
    chunk_offsets: np.ndarray    # global sample id of each chunk's first sample (+ total at the end)
    chunk_lengths: ChunkLengths  # per chunk: length histogram, tokens, longest sample
    manifest: Manifest | None = None
    """The split's manifest.json, when the spec named a prepared folder or a manifest file."""
    sequence_column: str = "tokens"
    label_column: str | None = "label"
    storage_options: dict = field(default_factory=dict)
    retries: int = 3
    _fingerprint: str | None = field(default=None, repr=False, compare=False)
    shard_sizes: list = field(default_factory=list)       # bytes of each shard (None: unknown)
    footer_caches: list = field(default_factory=list)     # index cache entry holding a remote shard's footer
    whole_shard_max_mb: float = WHOLE_FILE_MAX_MB          # servers without byte ranges: see sources.read_ranges
    cache_entries: list = field(default_factory=list)     # each shard's index cache file (None: not cached)
    footer_facts: list = field(default_factory=list)      # a Parquet shard's FooterFacts (None: not known)

    @property
    def num_samples(self) -> int:
        return int(self.chunk_offsets[-1])

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_shard)

    @property
    def num_tokens(self) -> int:
        return self.chunk_lengths.num_tokens

    def fingerprint(self) -> str:
        """Identity of the data for resume checks: shard *names* (not full URLs, so moved data or
        rotated signed URLs still resume), chunk layout, and each chunk's tokens and longest sample
        (O(chunks)). Computed once per index."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"v2")
            h.update("\n".join(basename(s) for s in self.shards).encode())
            h.update(self.chunk_offsets.tobytes())
            h.update(self.chunk_lengths.fingerprint().encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def matches_fingerprint(self, recorded: str) -> bool:
        """Whether a checkpoint's dataset fingerprint is this data's: today's, or the one versions
        before 2026-12 recorded (a hash of every sample's length, recomputed from the index cache
        only when such a checkpoint is resumed)."""
        if recorded == self.fingerprint():
            return True
        lengths = self.sample_lengths(required=False)
        if lengths is None:
            return False
        h = hashlib.sha256()
        h.update("\n".join(basename(s) for s in self.shards).encode())
        h.update(self.chunk_offsets.tobytes())
        h.update(lengths.astype(np.int32).tobytes())
        return recorded == h.hexdigest()[:16]

    def sample_lengths(self, required: bool = True) -> np.ndarray | None:
        """Every sample's length, in sample order: O(samples), for tools and tests, never the training
        path. From the index cache, or (`required`) by decoding the shards whose lengths it does not
        keep (prepared Parquet, indexed from its footer); None for those without `required`."""
        parts = []
        for s, entry in enumerate(self.cache_entries):
            lengths = None
            if entry is not None:
                try:
                    with np.load(entry) as z:
                        lengths = z["lengths"] if "lengths" in z.files else None
                except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                    lengths = None
            if lengths is None:
                if not required:
                    return None
                lengths = np.concatenate([self.read_chunk(int(c), task="lm").lengths  # the sequences only
                                          for c in np.flatnonzero(self.chunk_shard == s)])
            parts.append(np.asarray(lengths).astype(np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def check_chunk_lengths(self, c: int, lengths: np.ndarray, bad: np.ndarray) -> np.ndarray:
        """The lengths of chunk `c`'s samples as the plan must see them: the decoded `lengths`, which
        must match the index's histogram (else the shard changed since it was indexed), with the
        samples marked `bad` (unreadable: their length unknown) given the lengths the histogram has
        left over, so that the window's batches are the ones the plan counted."""
        expected = self.chunk_lengths.chunk_lengths(c)
        good = np.sort(lengths[~bad]) if bad.any() else np.sort(lengths)
        if not bad.any() and np.array_equal(good, expected):
            return lengths
        # Multiset difference: the expected lengths the good samples do not account for.
        values, want = np.unique(expected, return_counts=True)
        have = np.zeros(len(values), np.int64)
        pos = np.searchsorted(values, good)
        known = (pos < len(values)) & (values[np.minimum(pos, len(values) - 1)] == good) if len(values) else \
            np.zeros(len(good), bool)
        np.add.at(have, pos[known], 1)
        if len(lengths) != len(expected) or not known.all() or (have > want).any():
            shard = self.shards[self.chunk_shard[c]]
            where = f"row group {int(self.chunk_local[c])}" if self.formats[self.chunk_shard[c]] == "parquet" else "shard"
            raise BadSampleError(redact(shard), where, f"sample lengths differ from the index ({len(lengths)} "
                                 f"samples, {int(lengths.sum())} tokens; the index says {len(expected)}, "
                                 f"{int(expected.sum())}): the file changed after it was indexed",
                                 fix="delete the index cache (data.cache_dir) or restore the file")
        out = lengths.copy()
        out[bad] = np.repeat(values, want - have)
        return out

    def locate(self, sample_id: int) -> tuple[str, str]:
        """(shard, 'row N') of a global sample id, for messages."""
        c = int(np.searchsorted(self.chunk_offsets, sample_id, side="right") - 1)
        shard = self.shards[self.chunk_shard[c]]
        first = int(self.chunk_offsets[np.searchsorted(self.chunk_shard, self.chunk_shard[c])])
        return redact(shard), f"row {sample_id - first}"

    @property
    def is_remote(self) -> bool:
        """Whether any shard is read over the network (URLs, or fsspec storage options)."""
        return not all(is_local(s, self.storage_options) for s in self.shards)

    def remote_source(self, s: int):
        """What the byte-range reader needs for remote shard `s` (None for a local file)."""
        if is_local(self.shards[s], self.storage_options):
            return None
        return Source(self.shards[s], size=self.shard_sizes[s] if self.shard_sizes else None,
                      footer_cache=self.footer_caches[s] if self.footer_caches else None,
                      storage_options=self.storage_options, retries=self.retries,
                      whole_max_mb=self.whole_shard_max_mb)

    def read_chunk(self, c: int, task: str | None = None, flags_column: str | None = None) -> Chunk:
        """Decode chunk `c`. `task` (classify/regress/tag/lm) says which tar label member every sample
        must have, so a sample missing it is flagged instead of the label type being guessed per shard;
        tar lengths are checked against the index, so a shard changed since indexing is an error.
        `flags_column` (lm: doc_start): per-sample flags read with the chunk (a Parquet column, in the
        same request as the tokens; a tar shard's sidecar) into `chunk.flags`, None where absent."""
        s = int(self.chunk_shard[c])
        shard = self.shards[s]
        label = self.label_column if task is None or get_task(task).has_labels else None  # lm reads none
        if self.formats[s] == "parquet":
            return read_parquet_chunk(shard, int(self.chunk_local[c]), sequence_column=self.sequence_column,
                                      label_column=label, storage_options=self.storage_options,
                                      retries=self.retries, task=task, source=self.remote_source(s),
                                      flags_column=flags_column)
        chunk = read_tar_chunk(shard, storage_options=self.storage_options, retries=self.retries, task=task,
                               labels=label is not None)
        if flags_column is not None:
            chunk.flags = read_sidecar_flags(shard, len(chunk), flags_column, storage_options=self.storage_options,
                                             retries=self.retries)
        return chunk


def _cache_key(url: str, column: str, info: dict) -> str:
    raw = json.dumps([url, column, info.get("size"), str(info.get("mtime_or_etag"))])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


CACHE_VERSION = 2
"""Index cache entries hold, per shard: rows per chunk, the chunks' length histograms (CSR), tokens
longest and shortest sample per chunk (so that a warm start reads the histograms only when it keeps
them in memory), every sample's length (only read to resume checkpoints of earlier versions, and by
tools), a remote shard's footer, and what a Parquet footer tells of the model's sizes (FooterFacts).
Version 1 entries (rows and lengths) are upgraded when read; version 2 entries without the per-chunk
sums or the footer facts work as before (histograms loaded, footers read for the sizes)."""


class _ShardLayout:
    """One shard's chunks: rows, histograms (in memory, or read again from the cache entry), size."""

    def __init__(self, rows, block: Block | None, size, footer, entry, indexed: bool = False,
                 facts: FooterFacts | None = None, sums: tuple | None = None, entries: int | None = None):
        """`block` None: the histograms stay in the cache entry `entry`, and `sums` (tokens, longest,
        shortest per chunk) and `entries` (the histogram's length) come from it instead."""
        self.rows, self.size, self.footer, self.entry, self.facts = list(rows), size, footer, entry, facts
        self.indexed = indexed
        """Whether the shard was read to build this (a cache miss), rather than taken from the cache."""
        tokens, longest, shortest = sums if sums is not None else block_sums(block)
        self.block: Block | None = block
        self.stats = ChunkLengths(np.asarray(self.rows, np.int64), tokens, longest, self, shortest)
        self.entries = len(block.lengths) if block is not None else int(entries)

    def blocks(self):
        yield self.block_of(0)

    def block_of(self, c: int) -> Block:
        if self.block is not None:
            return self.block
        with np.load(self.entry) as z:  # released: read from the cache entry (one shard's worth)
            return Block(0, z["hist_ptr"].astype(np.int64), z["hist_len"].astype(np.int64),
                         z["hist_count"].astype(np.int64))

    def hold(self) -> None:
        """Keep the histograms in memory (read from the cache entry once)."""
        if self.block is None:
            self.block = self.block_of(0)

    def release(self) -> None:
        """Keep only the per-chunk values in memory; histograms are read from the cache entry."""
        if self.entry is not None:
            self.block = None


def _shard_layout(url: str, fmt: str, column: str, cache: Path | None, storage_options, retries,
                  whole_max_mb: float = WHOLE_FILE_MAX_MB, info: dict | None = None) -> _ShardLayout:
    """One shard's layout, from the cache when the file is unchanged (`info`: its `file_info`, if
    already read). A remote Parquet shard's footer is kept in its cache entry, so that the loader's
    processes need not fetch it again."""
    info = info or file_info(url, storage_options=storage_options, retries=retries)
    path = None
    if cache is not None:
        path = cache / "index" / f"{_cache_key(url, column, info)}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    footer = str(path) if "footer" in z.files else None
                    # Entries written before the footer facts were kept lack them: read from the footer.
                    facts = FooterFacts(int(z["max_id"]), int(z["feature_width"])) if "max_id" in z.files else None
                    if "chunk_tokens" in z.files:
                        # Per-chunk sums kept in the entry: the histograms are read only if wanted
                        # (open_index keeps a small dataset's in memory), so a warm start is O(chunks).
                        ptr = z["hist_ptr"]
                        sums = tuple(z[k].astype(np.int64) for k in ("chunk_tokens", "chunk_longest", "chunk_shortest"))
                        return _ShardLayout(z["rows"].tolist(), None, info["size"], footer, str(path), facts=facts,
                                            sums=sums, entries=int(ptr[-1]) if len(ptr) else 0)
                    if "hist_ptr" in z.files:
                        block = Block(0, z["hist_ptr"].astype(np.int64), z["hist_len"].astype(np.int64),
                                      z["hist_count"].astype(np.int64))
                        return _ShardLayout(z["rows"].tolist(), block, info["size"], footer, str(path), facts=facts)
                    rows, lengths = z["rows"].tolist(), z["lengths"]
                    footer_bytes = z["footer"].tobytes() if footer else None
                return _store(path, rows, lengths, footer_bytes, info["size"], facts)  # version 1: upgrade
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                path.unlink(missing_ok=True)  # a damaged cache entry: rebuild it
    footer = facts = None
    if fmt == "parquet":
        source = None if is_local(url, storage_options) else Source(
            url, size=info["size"], storage_options=storage_options, retries=retries, whole_max_mb=whole_max_mb)
        rows, lengths, footer, facts = parquet_layout(url, column, storage_options=storage_options, retries=retries,
                                                      source=source)  # lengths: a Block when prep wrote them
    else:
        lengths = np.asarray(tar_lengths(url, storage_options=storage_options, retries=retries), dtype=np.int32)
        rows = [len(lengths)]
    layout = _store(path, rows, lengths, footer, info["size"], facts)
    layout.indexed = True
    return layout


def _store(path: Path | None, rows, lengths: np.ndarray | Block, footer: bytes | None, size,
           facts: FooterFacts | None = None) -> _ShardLayout:
    """The layout of a shard with `rows` per chunk and samples of `lengths` (every sample's, or
    the chunks' histograms), written to the cache entry `path` (if any) atomically."""
    block = lengths if isinstance(lengths, Block) else histogram_block(0, rows, lengths)
    per_sample = {} if isinstance(lengths, Block) else {"lengths": np.asarray(lengths, np.int32)}
    if path is None:
        return _ShardLayout(rows, block, size, None, None, facts=facts)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique across hosts (a shared cache folder, containers with equal pids): host, pid, random.
    tmp = path.with_suffix(f".{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
    extra = {"footer": np.frombuffer(footer, np.uint8)} if footer is not None else {}
    if facts is not None:
        extra.update(max_id=np.int64(facts.max_id), feature_width=np.int64(facts.feature_width))
    tokens, longest, shortest = block_sums(block)
    np.savez(tmp, version=CACHE_VERSION, rows=np.asarray(rows, dtype=np.int64), hist_ptr=block.ptr,
             hist_len=block.lengths.astype(np.int32), hist_count=block.counts.astype(np.int32),
             chunk_tokens=tokens, chunk_longest=longest, chunk_shortest=shortest, **per_sample, **extra)
    os.replace(tmp, path)
    return _ShardLayout(rows, block, size, str(path) if footer is not None else None, str(path), facts=facts)


IN_MEMORY_ENTRIES = 1 << 18
"""Histogram entries (length, count pairs) a dataset keeps in memory (~6 MB, about 4 M samples of
lengths spread over 60 values); a larger one reads them from its cache entries, one shard at a
time, at each plan pass, so that the resident index stays O(chunks)."""


def _default_column(first_shard: str, fmt: str, storage_options, retries) -> str:
    """'tokens', or 'features' for Parquet shards that have that column and no 'tokens'."""
    if fmt == "parquet":
        try:
            names = parquet_column_names(first_shard, storage_options=storage_options, retries=retries)
        except Exception:  # noqa: BLE001 -- unreadable: indexing reports it, naming the shard
            return "tokens"
        if "tokens" not in names and "features" in names:
            return "features"
    return "tokens"


def open_index(spec: str, *, fmt: str = "auto", sequence_column: str = "", label_column: str = "",
               cache_dir: str | Path | None = None, storage_options: dict | None = None,
               retries: int = 3, progress=None, task: str | None = None,
               whole_shard_max_mb: float = WHOLE_FILE_MAX_MB, verify: str = "size",
               share: tuple[int, int] | None = None) -> DatasetIndex | int:
    """Index a split: a prepared dataset folder (with manifest.json), files, globs, brace ranges or URLs.
    `task` (model.task) decides whether there is a label column at all: lm reads none, so a raw
    Parquet file with only a token column is a complete lm dataset. `verify` checks the shards
    against the manifest (distlstm.data.shards.verify). `progress(done, total)` is called after
    each shard.

    `share=(i, n)`: only fill the index cache with shards i, i+n, i+2n, ... (rank i of n, so that n
    ranks index a cold dataset in one pass between them) and return how many were not cached yet."""
    storage_options = dict(storage_options or {})
    manifest = Manifest.find(spec, storage_options=storage_options, retries=retries)
    shards = manifest.shard_urls() if manifest else expand_paths(spec, storage_options=storage_options,
                                                                 retries=retries)
    if not shards:
        raise ValueError(f"no shards found for {redact(spec)}")
    # Each shard's size and date, read once: for the manifest check and for the index cache's key.
    infos = [None] * len(shards)
    if manifest and verify != "none" and share is None:
        infos = [file_info(u, storage_options=storage_options, retries=retries) for u in shards]
        verify_shards(shards, manifest.shards, verify, infos=infos, storage_options=storage_options,
                      retries=retries)
    known = manifest.format if manifest and manifest.format else "auto"
    formats = [shard_format(s, known if fmt == "auto" else fmt) for s in shards]
    column = sequence_column or (manifest and manifest.sequence_column) or _default_column(
        shards[0], formats[0], storage_options, retries)
    label = label_column or (manifest and manifest.label_column) or "label"
    unlabelled = [t for t in (task, manifest and manifest.task) if t and get_task(t).label_column is None]
    if unlabelled and not label_column:
        label = None  # lm: the targets are the tokens themselves
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if share is not None:
        i, n = share
        mine = range(i, len(shards), n)
        missed = 0
        for k, s in enumerate(mine):
            missed += _shard_layout(shards[s], formats[s], column, cache, storage_options, retries,
                                    whole_shard_max_mb).indexed
            if progress is not None:
                progress(k + 1, len(mine))
        return missed
    chunk_shard, chunk_local, layouts, entries, large = [], [], [], 0, False
    for s, (url, f) in enumerate(zip(shards, formats)):
        layout = _shard_layout(url, f, column, cache, storage_options, retries, whole_shard_max_mb, info=infos[s])
        layouts.append(layout)
        entries += layout.entries
        if large:
            layout.release()
        elif entries > IN_MEMORY_ENTRIES:  # a large dataset: histograms stay in the cache files
            large = True
            for held in layouts:  # once: those held so far, then each new one as it comes
                held.release()
        else:
            layout.hold()
        chunk_shard += [s] * len(layout.rows)
        chunk_local += list(range(len(layout.rows)))
        if progress is not None:
            progress(s + 1, len(shards))
    stats = ChunkLengths.concat([layout.stats for layout in layouts])
    return DatasetIndex(shards=shards, formats=formats, chunk_shard=np.asarray(chunk_shard, np.int64),
                        chunk_local=np.asarray(chunk_local, np.int64), chunk_offsets=stats.chunk_offsets,
                        chunk_lengths=stats, manifest=manifest, sequence_column=column, label_column=label,
                        storage_options=storage_options, retries=retries,
                        shard_sizes=[layout.size for layout in layouts],
                        footer_caches=[layout.footer for layout in layouts], whole_shard_max_mb=whole_shard_max_mb,
                        cache_entries=[layout.entry for layout in layouts],
                        footer_facts=[layout.facts for layout in layouts])

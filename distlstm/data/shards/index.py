"""The dataset index: shards, their chunks (Parquet row groups or whole tar shards) and every
sample's length, which is all the plan needs. Built once per shard and cached by (URL, size, mtime)."""

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
from distlstm.data.shards.manifest import Manifest
from distlstm.data.sources import WHOLE_FILE_MAX_MB, expand_paths, file_info, redact
from distlstm.tasks import get_task


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
    """Shards, chunk boundaries and per-sample lengths of one split."""

    shards: list[str]
    formats: list[str]
    chunk_shard: np.ndarray      # shard number of each chunk
    chunk_local: np.ndarray      # row group within the shard (0 for tar)
    chunk_offsets: np.ndarray    # global sample id of each chunk's first sample (+ total at the end)
    lengths: np.ndarray          # int32 length of every sample
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

    @property
    def num_samples(self) -> int:
        return int(self.chunk_offsets[-1])

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_shard)

    def fingerprint(self) -> str:
        """Identity of the data for resume checks: shard *names* (not full URLs, so moved data or
        rotated signed URLs still resume), chunk layout and lengths. Computed once per index."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update("\n".join(s.split("?")[0].rstrip("/").rsplit("/", 1)[-1] for s in self.shards).encode())
            h.update(self.chunk_offsets.tobytes())
            h.update(self.lengths.tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def locate(self, sample_id: int) -> tuple[str, str]:
        """(shard, 'row N') of a global sample id, for messages."""
        c = int(np.searchsorted(self.chunk_offsets, sample_id, side="right") - 1)
        shard = self.shards[self.chunk_shard[c]]
        first = int(self.chunk_offsets[np.searchsorted(self.chunk_shard, self.chunk_shard[c])])
        return redact(shard), f"row {sample_id - first}"

    @property
    def is_remote(self) -> bool:
        """Whether any shard is read over the network (URLs, or fsspec storage options)."""
        from distlstm.data.shards.parquet import is_local
        return not all(is_local(s, self.storage_options) for s in self.shards)

    def remote_source(self, s: int):
        """What the byte-range reader needs for remote shard `s` (None for a local file)."""
        from distlstm.data.shards.parquet import is_local
        from distlstm.data.shards.parquet_remote import Source
        if is_local(self.shards[s], self.storage_options):
            return None
        return Source(self.shards[s], size=self.shard_sizes[s] if self.shard_sizes else None,
                      footer_cache=self.footer_caches[s] if self.footer_caches else None,
                      storage_options=self.storage_options, retries=self.retries,
                      whole_max_mb=self.whole_shard_max_mb)

    def read_chunk(self, c: int, task: str | None = None) -> Chunk:
        """Decode chunk `c`. `task` (classify/regress/tag/lm) says which tar label member every sample
        must have, so a sample missing it is flagged instead of the label type being guessed per shard;
        tar lengths are checked against the index, so a shard changed since indexing is an error."""
        s = int(self.chunk_shard[c])
        shard = self.shards[s]
        if self.formats[s] == "parquet":
            from distlstm.data.shards.parquet import read_parquet_chunk
            return read_parquet_chunk(shard, int(self.chunk_local[c]), sequence_column=self.sequence_column,
                                      label_column=self.label_column, storage_options=self.storage_options,
                                      retries=self.retries, task=task, source=self.remote_source(s))
        from distlstm.data.shards.tar import read_tar_chunk
        lo, hi = int(self.chunk_offsets[c]), int(self.chunk_offsets[c + 1])
        return read_tar_chunk(shard, storage_options=self.storage_options, retries=self.retries, task=task,
                              labels=self.label_column is not None, expected_lengths=self.lengths[lo:hi])


def _cache_key(url: str, column: str, info: dict) -> str:
    raw = json.dumps([url, column, info.get("size"), str(info.get("mtime_or_etag"))])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _shard_layout(url: str, fmt: str, column: str, cache: Path | None, storage_options, retries,
                  whole_max_mb: float = WHOLE_FILE_MAX_MB, info: dict | None = None):
    """(rows per chunk, lengths, size, cache entry holding the footer) of one shard, from the cache
    when the file is unchanged (`info`: its `file_info`, if already read). A remote Parquet shard's
    footer is kept in its cache entry, so that the loader's processes need not fetch it again."""
    info = info or file_info(url, storage_options=storage_options, retries=retries)
    path = None
    if cache is not None:
        path = cache / "index" / f"{_cache_key(url, column, info)}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    footer = str(path) if "footer" in z.files else None
                    return z["rows"].tolist(), z["lengths"], info["size"], footer
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                path.unlink(missing_ok=True)  # a damaged cache entry: rebuild it
    footer = None
    if fmt == "parquet":
        from distlstm.data.shards.parquet import is_local, parquet_layout
        from distlstm.data.shards.parquet_remote import Source
        source = None if is_local(url, storage_options) else Source(
            url, size=info["size"], storage_options=storage_options, retries=retries, whole_max_mb=whole_max_mb)
        rows, lengths, footer = parquet_layout(url, column, storage_options=storage_options, retries=retries,
                                               source=source)
    else:
        from distlstm.data.shards.tar import tar_lengths
        lengths = np.asarray(tar_lengths(url, storage_options=storage_options, retries=retries), dtype=np.int32)
        rows = [len(lengths)]
    if path is None:
        return rows, lengths, info["size"], None
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique across hosts (a shared cache folder, containers with equal pids): host, pid, random.
    tmp = path.with_suffix(f".{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
    extra = {"footer": np.frombuffer(footer, np.uint8)} if footer is not None else {}
    np.savez(tmp, rows=np.asarray(rows, dtype=np.int64), lengths=lengths, **extra)
    os.replace(tmp, path)
    return rows, lengths, info["size"], str(path) if footer is not None else None


def _default_column(first_shard: str, fmt: str, storage_options, retries) -> str:
    """'tokens', or 'features' for Parquet shards that have that column and no 'tokens'."""
    if fmt == "parquet":
        from distlstm.data.shards.dims import parquet_column_names
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
               whole_shard_max_mb: float = WHOLE_FILE_MAX_MB, verify: str = "size") -> DatasetIndex:
    """Index a split: a prepared dataset folder (with manifest.json), files, globs, brace ranges or URLs.
    `task` (model.task) decides whether there is a label column at all: lm reads none, so a raw
    Parquet file with only a token column is a complete lm dataset. `verify` checks the shards
    against the manifest (distlstm.data.shards.verify)."""
    storage_options = dict(storage_options or {})
    manifest = Manifest.find(spec, storage_options=storage_options, retries=retries)
    shards = manifest.shard_urls() if manifest else expand_paths(spec, storage_options=storage_options,
                                                                 retries=retries)
    if not shards:
        raise ValueError(f"no shards found for {redact(spec)}")
    # Each shard's size and date, read once: for the manifest check and for the index cache's key.
    infos = [None] * len(shards)
    if manifest and verify != "none":
        from distlstm.data.shards.verify import verify_shards
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
    chunk_shard, chunk_local, rows_all, lengths_all, sizes, footers = [], [], [], [], [], []
    for s, (url, f) in enumerate(zip(shards, formats)):
        rows, lengths, size, footer = _shard_layout(url, f, column, cache, storage_options, retries,
                                                    whole_shard_max_mb, info=infos[s])
        sizes.append(size)
        footers.append(footer)
        chunk_shard += [s] * len(rows)
        chunk_local += list(range(len(rows)))
        rows_all += rows
        lengths_all.append(lengths)
        if progress is not None:
            progress(s + 1, len(shards))
    offsets = np.concatenate([[0], np.cumsum(rows_all)]).astype(np.int64)
    lengths = np.concatenate(lengths_all).astype(np.int32)
    if len(lengths) != offsets[-1]:
        raise ValueError(f"{redact(spec)}: index has {len(lengths)} lengths for {offsets[-1]} rows; "
                         f"delete the cache folder {cache / 'index'} and retry")
    return DatasetIndex(shards=shards, formats=formats, chunk_shard=np.asarray(chunk_shard, np.int64),
                        chunk_local=np.asarray(chunk_local, np.int64), chunk_offsets=offsets, lengths=lengths,
                        manifest=manifest, sequence_column=column, label_column=label,
                        storage_options=storage_options, retries=retries, shard_sizes=sizes,
                        footer_caches=footers, whole_shard_max_mb=whole_shard_max_mb)

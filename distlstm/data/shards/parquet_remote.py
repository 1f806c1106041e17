"""Remote Parquet shards read by exact byte ranges.

A row group is fetched as the byte ranges of its projected columns' chunks, taken from the footer
(``dictionary_page_offset`` or ``data_page_offset``, plus ``total_compressed_size``), touching
ranges merged into one request: nothing else of the file is read, and there is no readahead or
block cache. The footer is read once per shard: by the indexer, which keeps it in the index cache
entry, from where every process loads it; a process only fetches it itself (once, then cached in
memory) when that entry lacks it. Arrow then decodes the fetched bytes as it would a local file.

Local shards do not come here: Arrow's native reader already reads exact ranges from a local file.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import struct
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distlstm.data.sources import WHOLE_FILE_MAX_MB, ReadOnlyFile, coalesce, file_info, read_ranges, redact

log = logging.getLogger(__name__)

_MAGIC = b"PAR1"
_GROUPS_PER_FETCH = 16  # row groups fetched together (concurrently) when a whole shard is walked


@dataclass(frozen=True)
class Source:
    """A remote shard and what the index already knows about it."""

    url: str
    size: int | None = None
    footer_cache: str | None = None   # index cache entry (.npz) holding the footer, if any
    storage_options: dict = field(default_factory=dict, hash=False, compare=False)
    retries: int = 3
    whole_max_mb: float = WHOLE_FILE_MAX_MB

    def read(self, ranges: list[tuple[int, int | None]]) -> list[bytes]:
        return read_ranges(self.url, ranges, storage_options=self.storage_options, retries=self.retries,
                           whole_max_mb=self.whole_max_mb)


def fetch_footer(source: Source) -> bytes:
    """The file's tail from the footer on (thrift FileMetaData, its 4-byte length, ``PAR1``): two
    small reads, the last 8 bytes and then exactly the footer."""
    tail = source.read([(-8, None)])[0]
    if len(tail) < 8 or tail[4:] != _MAGIC:
        raise pa.ArrowInvalid(f"{redact(source.url)}: no Parquet magic bytes at the end of the file")
    n = struct.unpack("<I", tail[:4])[0]
    if source.size is not None:
        if n + 12 > source.size:
            raise pa.ArrowInvalid(f"{redact(source.url)}: footer length {n} exceeds the file size {source.size}")
        return source.read([(source.size - 8 - n, source.size - 8)])[0] + tail
    return source.read([(-(n + 8), None)])[0]


def parse_footer(footer: bytes) -> pq.FileMetaData:
    return pq.read_metadata(pa.BufferReader(footer))


def _cached_footer(path: str) -> bytes | None:
    try:
        with np.load(path) as z:
            return z["footer"].tobytes() if "footer" in z.files else None
    except (OSError, ValueError, KeyError):
        return None  # a missing or damaged cache entry: fetch the footer instead


@functools.lru_cache(maxsize=64)
def _metadata(source: Source) -> pq.FileMetaData:
    """Per process and shard, once (bounded: 64 shards' footers, about their serialized size each)."""
    footer = _cached_footer(source.footer_cache) if source.footer_cache else None
    return parse_footer(footer if footer is not None else fetch_footer(source))


def column_chunk_ranges(metadata: pq.FileMetaData, row_group: int, columns: list[str],
                        size: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` of every column chunk of `row_group` that belongs to one of `columns` (all
    leaves of a nested column), as Arrow computes them when it reads the row group."""
    rg = metadata.row_group(row_group)
    legacy = _pads_dictionary(metadata)
    out = []
    for i in range(rg.num_columns):
        chunk = rg.column(i)
        path = chunk.path_in_schema
        if not any(path == c or path.startswith(c + ".") for c in columns):
            continue
        start = chunk.data_page_offset
        if chunk.has_dictionary_page and chunk.dictionary_page_offset and 0 < chunk.dictionary_page_offset < start:
            start = chunk.dictionary_page_offset
        end = start + chunk.total_compressed_size
        if legacy:  # PARQUET-816: old parquet-mr left the dictionary page header out of the size
            end = end + 100 if size is None else min(size, end + 100)
        out.append((start, end))
    return out


def _pads_dictionary(metadata: pq.FileMetaData) -> bool:
    created = (metadata.created_by or "").lower()
    if not created.startswith("parquet-mr version "):
        return False
    try:
        version = tuple(int(x) for x in created.split()[2].split("-")[0].split(".")[:3])
    except (IndexError, ValueError):
        return False
    return version < (1, 2, 9)


class _SparseFile(ReadOnlyFile):
    """A read-only file of `size` bytes of which only some ranges were fetched. Arrow reads the
    column chunks it was told about; a read anywhere else is fetched (and logged: it means the
    ranges computed from the footer missed something, which costs a request, never correctness)."""

    def __init__(self, source: Source, size: int, pieces: dict[tuple[int, int], bytes]):
        super().__init__(source.url)
        self._source, self._size, self._pos = source, size, 0
        self._pieces = sorted((a, b, data) for (a, b), data in pieces.items())

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = self._size if n is None or n < 0 else min(self._size, start + n)
        for a, b, data in self._pieces:
            if a <= start and end <= b:
                self._pos = end
                return data[start - a:end - a]
        log.warning("%s: read of bytes [%d, %d) outside the column chunks named by the footer; fetching them",
                    redact(self._source.url), start, end)
        data = self._source.read([(start, end)])[0]
        self._pieces.append((start, end, data))
        self._pos = end
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def seekable(self) -> bool:
        return True


class RemoteParquetFile:
    """The part of `pyarrow.parquet.ParquetFile` the loader uses (metadata, schema_arrow,
    read_row_group), over exact byte-range reads."""

    def __init__(self, source: Source, metadata: pq.FileMetaData | None = None):
        if source.size is None:
            source = dataclasses.replace(source, size=file_info(source.url, storage_options=source.storage_options,
                                                                retries=source.retries)["size"])
            if source.size is None:
                raise OSError(f"{redact(source.url)}: the server does not report the file's size (no "
                              f"Content-Length), which reading Parquet row groups by byte range needs")
        self.source = source
        self.metadata = metadata if metadata is not None else _metadata(source)
        self.schema_arrow = self.metadata.schema.to_arrow_schema()
        self.num_row_groups = self.metadata.num_row_groups

    def first_row(self, row_group: int) -> int:
        return sum(self.metadata.row_group(i).num_rows for i in range(row_group))

    def _decode(self, row_group: int, columns: list[str], pieces: dict) -> pa.Table:
        sparse = _SparseFile(self.source, self.source.size, pieces)
        return pq.ParquetFile(sparse, metadata=self.metadata).read_row_group(row_group, columns=columns)

    def read_row_group(self, row_group: int, columns: list[str]) -> pa.Table:
        # Merged first: Arrow may read neighbouring column chunks in one read, which must find them
        # in one piece.
        ranges = coalesce(column_chunk_ranges(self.metadata, row_group, columns, self.source.size))
        return self._decode(row_group, columns, dict(zip(ranges, self.source.read(ranges))))

    def iter_row_groups(self, columns: list[str]) -> Iterator[pa.Table]:
        """Every row group in order; the ranges of several row groups are fetched concurrently."""
        for first in range(0, self.num_row_groups, _GROUPS_PER_FETCH):
            groups = range(first, min(self.num_row_groups, first + _GROUPS_PER_FETCH))
            wanted = [coalesce(column_chunk_ranges(self.metadata, g, columns, self.source.size)) for g in groups]
            fetched = self.source.read([r for ranges in wanted for r in ranges])
            at = 0
            for g, ranges in zip(groups, wanted):
                yield self._decode(g, columns, dict(zip(ranges, fetched[at:at + len(ranges)])))
                at += len(ranges)

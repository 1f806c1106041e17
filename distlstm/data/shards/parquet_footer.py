"""One row group of a local Parquet file, read without holding the file's whole parsed footer.

pyarrow parses a file's entire footer (the thrift FileMetaData: every row group's every column
chunk, with statistics) when it opens the file, and the parsed form is about ten times the
serialized one: ~6 MB for a shard of 2,442 row groups, ~2.5 bytes per sample at 1,024 rows per
group, held by every DataLoader worker for every shard it keeps open. At a billion samples that
is gigabytes per worker for reading one row group at a time.

Instead, each process walks a shard's serialized footer once (`RowGroupFooters.of`) and keeps only
where each row group's thrift struct lies in it and how many rows it has (24 bytes per row group)
plus the footer's other fields (the schema; the key-value metadata without distlstm's own length
histograms, which only the index reads). To read row group g it reads g's struct back from the
file (a few hundred bytes), builds the footer of a file holding only that row group (the offsets
in it still point into the real file) and hands it to pyarrow as the file's metadata: pyarrow
then reads row group 0 of that footer, which is g, by exact ranges as it always does.

The thrift compact protocol (the encoding of Parquet footers) is walked here just enough to find
value boundaries: https://github.com/apache/thrift/blob/master/doc/specs/thrift-compact-protocol.md
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distlstm.data.plan.chunks import LENGTHS_KEY

_MAGIC = b"PAR1"
_BOOL_TRUE, _BOOL_FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
_ROW_GROUPS, _KEY_VALUE_METADATA = 4, 5          # FileMetaData field ids
_RG_NUM_ROWS = 3                                  # RowGroup.num_rows
_KV_KEY = 1                                       # KeyValue.key


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _list_header(buf: bytes, i: int) -> tuple[int, int, int]:
    """(element type, size, position of the first element)."""
    b = buf[i]
    size, etype = b >> 4, b & 0x0F
    i += 1
    if size == 15:
        size, i = _varint(buf, i)
    return etype, size, i


def _skip(buf: bytes, i: int, typ: int) -> int:
    """The position after a value of compact type `typ` starting at `i`."""
    if typ in (_BOOL_TRUE, _BOOL_FALSE, _BYTE):
        return i + 1          # (a bool field has its value in the header; in a list it takes a byte)
    if typ in (_I16, _I32, _I64):
        while buf[i] & 0x80:
            i += 1
        return i + 1
    if typ == _DOUBLE:
        return i + 8
    if typ == _BINARY:
        n, i = _varint(buf, i)
        return i + n
    if typ in (_LIST, _SET):
        etype, size, i = _list_header(buf, i)
        for _ in range(size):
            i = _skip(buf, i, etype)
        return i
    if typ == _MAP:
        size, i = _varint(buf, i)
        if size:
            kv = buf[i]
            i += 1
            for _ in range(size):
                i = _skip(buf, _skip(buf, i, kv >> 4), kv & 0x0F)
        return i
    if typ == _STRUCT:
        return _walk(buf, i, keep=False)[1]
    raise ValueError(f"not a Parquet footer: thrift type {typ} at byte {i}")


def _walk(buf: bytes, i: int, keep: bool = True) -> tuple[list[tuple[int, int, int, int]], int]:
    """The fields of the struct at `i` as (id, type, value start, value end) (none unless `keep`),
    and the position after the struct's stop byte."""
    out, fid = [], 0
    while True:
        b = buf[i]
        i += 1
        if b == 0:
            return out, i
        typ, delta = b & 0x0F, b >> 4
        if delta:
            fid += delta
        else:
            raw, i = _varint(buf, i)
            fid = _zigzag(raw)
        end = i if typ in (_BOOL_TRUE, _BOOL_FALSE) else _skip(buf, i, typ)
        if keep:
            out.append((fid, typ, i, end))
        i = end


def _field_header(prev: int, fid: int, typ: int) -> bytes:
    delta = fid - prev
    if 0 < delta <= 15:
        return bytes([(delta << 4) | typ])
    zz = (fid << 1) ^ (fid >> 15)
    out = bytearray([typ])
    while True:
        if zz < 0x80:
            out.append(zz)
            return bytes(out)
        out.append((zz & 0x7F) | 0x80)
        zz >>= 7


def _list_bytes(etype: int, elements: list[bytes]) -> bytes:
    n = len(elements)
    head = bytes([(n << 4) | etype]) if n < 15 else bytes([0xF0 | etype]) + _uvarint(n)
    return head + b"".join(elements)


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass(frozen=True)
class RowGroupFooters:
    """Where each row group of a local Parquet file sits in its footer, and the footer's other
    fields: enough to build a one-row-group footer for any row group (`metadata`)."""

    path: str
    footer_at: int              # file offset of the serialized FileMetaData
    before: tuple               # (id, type, value bytes) of the fields before row_groups
    after: tuple                # ... and after it (key-value metadata without LENGTHS_KEY)
    spans: np.ndarray           # (row groups, 2) int64: each RowGroup struct's [start, end) in the footer
    first_rows: np.ndarray      # (row groups + 1,) int64: the first row of each row group, then the total

    @property
    def num_row_groups(self) -> int:
        return len(self.spans)

    @classmethod
    def of(cls, path: str) -> "RowGroupFooters":
        """Walk `path`'s footer once (raises pyarrow.ArrowInvalid when it is not Parquet)."""
        footer_at, buf = _footer_bytes(path)
        try:
            return cls._parse(path, footer_at, buf)
        except (IndexError, ValueError) as exc:
            raise pa.ArrowInvalid(f"{path}: unreadable Parquet footer ({exc})") from exc

    @classmethod
    def _parse(cls, path: str, footer_at: int, buf: bytes) -> "RowGroupFooters":
        fields, _ = _walk(buf, 0)
        before, after, spans, rows = [], [], [], []
        for fid, typ, start, end in fields:
            if fid == _ROW_GROUPS:
                etype, size, i = _list_header(buf, start)
                if etype != _STRUCT:
                    raise ValueError("row_groups is not a list of structs")
                for _ in range(size):
                    group, end_g = _walk(buf, i)
                    num_rows = next((s for f, t, s, _e in group if f == _RG_NUM_ROWS and t == _I64), None)
                    if num_rows is None:
                        raise ValueError(f"row group {len(spans)} has no num_rows")
                    spans.append((i, end_g))
                    rows.append(_zigzag(_varint(buf, num_rows)[0]))
                    i = end_g
                continue
            value = buf[start:end]
            if fid == _KEY_VALUE_METADATA:
                value = _without_key(buf, start, LENGTHS_KEY.encode())
            (before if fid < _ROW_GROUPS else after).append((fid, typ, value))
        return cls(path=path, footer_at=footer_at, before=tuple(before), after=tuple(after),
                   spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
                   first_rows=np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]))

    def first_row(self, row_group: int) -> int:
        return int(self.first_rows[row_group])

    def footer(self, row_group: int) -> bytes:
        """The serialized footer of a file holding only `row_group` (+ its length and magic)."""
        if not 0 <= row_group < self.num_row_groups:
            raise pa.ArrowInvalid(f"row group {row_group} does not exist (the file has {self.num_row_groups})")
        start, end = (int(v) for v in self.spans[row_group])
        with pa.OSFile(self.path, "r") as f:
            group = f.read_at(end - start, self.footer_at + start)
        out, prev = bytearray(), 0
        for fid, typ, value in (*self.before, (_ROW_GROUPS, _LIST, _list_bytes(_STRUCT, [group])), *self.after):
            out += _field_header(prev, fid, typ) + value
            prev = fid
        out.append(0)
        return bytes(out) + struct.pack("<I", len(out)) + _MAGIC

    def metadata(self, row_group: int) -> pq.FileMetaData:
        return pq.read_metadata(pa.BufferReader(self.footer(row_group)))

    def read_row_group(self, row_group: int, columns: list[str]) -> pa.Table:
        return pq.ParquetFile(self.path, metadata=self.metadata(row_group)).read_row_group(0, columns=columns)

    @functools.cached_property
    def schema_arrow(self) -> pa.Schema:
        return self.metadata(0).schema.to_arrow_schema() if self.num_row_groups else \
            pq.read_schema(self.path)


def _footer_bytes(path: str) -> tuple[int, bytes]:
    """(file offset, bytes) of `path`'s serialized footer, read with Arrow's native file (not a
    Python file object: tests/test_hostile_data.py says why)."""
    with pa.OSFile(path, "r") as f:
        size = f.size()
        if size < 12:
            raise pa.ArrowInvalid(f"{path}: {size} bytes, too small for a Parquet file")
        tail = f.read_at(8, size - 8)
        if tail[4:] != _MAGIC:
            raise pa.ArrowInvalid(f"{path}: no Parquet magic bytes at the end of the file")
        n = struct.unpack("<I", tail[:4])[0]
        if n + 12 > size:
            raise pa.ArrowInvalid(f"{path}: footer length {n} exceeds the file size {size}")
        return size - 8 - n, f.read_at(n, size - 8 - n)


def column_names(path: str) -> list[str]:
    """The top-level column names of a local Parquet file, from the footer's schema alone: the walk
    stops before the row groups, so this costs the same for any number of them."""
    _, buf = _footer_bytes(path)
    out, prev, i = bytearray(), 0, 0
    try:
        while buf[i] != 0:
            b = buf[i]
            typ, delta = b & 0x0F, b >> 4
            j = i + 1
            if delta:
                fid = prev + delta
            else:
                raw, j = _varint(buf, j)
                fid = _zigzag(raw)
            if fid >= _ROW_GROUPS:
                break
            end = j if typ in (_BOOL_TRUE, _BOOL_FALSE) else _skip(buf, j, typ)
            out += _field_header(prev, fid, typ) + buf[j:end]
            prev, i = fid, end
    except (IndexError, ValueError) as exc:
        raise pa.ArrowInvalid(f"{path}: unreadable Parquet footer ({exc})") from exc
    out += _field_header(prev, _ROW_GROUPS, _LIST) + _list_bytes(_STRUCT, []) + b"\x00"
    footer = bytes(out) + struct.pack("<I", len(out)) + _MAGIC
    return list(pq.read_metadata(pa.BufferReader(footer)).schema.to_arrow_schema().names)


def _without_key(buf: bytes, start: int, key: bytes) -> bytes:
    """The key-value metadata list at `start`, re-encoded without the entry named `key`."""
    etype, size, i = _list_header(buf, start)
    kept = []
    for _ in range(size):
        fields, end = _walk(buf, i)
        name = next((buf[s:e] for f, t, s, e in fields if f == _KV_KEY and t == _BINARY), b"")
        n, at = _varint(name, 0) if name else (0, 0)
        if name[at:at + n] != key:
            kept.append(buf[i:end])
        i = end
    return _list_bytes(etype, kept)

"""Parquet shards: row-group metadata, per-sample lengths from list offsets, and row groups decoded
into flat numpy arrays (column projection, no per-row Python objects)."""

from __future__ import annotations

import errno
import functools
import itertools
import os
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distlstm.data.batch import Chunk
from distlstm.data.plan.chunks import LENGTHS_KEY, Block, decode_block
from distlstm.data.plan.epoch import segments
from distlstm.data.errors import BadSampleError
from distlstm.data.shards.dims import UNKNOWN_MAX_ID, FooterFacts, fixed_feature_width, max_token_id
from distlstm.data.shards.parquet_footer import RowGroupFooters
from distlstm.data.shards.parquet_remote import RemoteParquetFile, Source, fetch_footer, parse_footer
from distlstm.data.sources import local_path, redact
from distlstm.tasks import get_task, per_sample_any


def _list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(offsets starting at 0, null mask, values array) of a list column, copying nothing per row."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_list(arr.type):
        n, size = len(arr), arr.type.list_size
        offsets = np.arange(n + 1, dtype=np.int64) * size
        values = arr.values.slice(arr.offset * size, n * size)
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        raw = arr.offsets.to_numpy().astype(np.int64)
        values = arr.values.slice(int(raw[0]), int(raw[-1] - raw[0]))
        offsets = raw - raw[0]
    else:
        raise TypeError(f"{arr.type}")
    nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(len(arr), bool)
    return offsets, nulls, values


def _null_items(values: pa.Array, offsets: np.ndarray) -> dict[int, int]:
    """{row: position of its first null item} of a list column (`offsets` into `values`); a list of
    feature vectors counts a null feature as a null step. Null items are not ids or values: pyarrow
    would hand them to numpy as NaN, and a cast to int makes them -2^63."""
    mask = values.is_null().to_numpy(zero_copy_only=False) if values.null_count else None
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        step_offsets, _, features = _list_parts(values)
        if features.null_count:
            steps = per_sample_any(features.is_null().to_numpy(zero_copy_only=False), step_offsets)
            mask = steps if mask is None else mask | steps
    if mask is None or not mask.any():
        return {}
    items = np.flatnonzero(mask)
    rows, first = np.unique(np.searchsorted(offsets, items, side="right") - 1, return_index=True)
    return {int(r): int(items[i] - offsets[r]) for r, i in zip(rows, first)}


def _null_problems(column: str, values: pa.Array, offsets: np.ndarray, row_group: int) -> dict[int, str]:
    return {r: f"'{column}' holds a null at position {k} (row group {row_group}), not a value"
            for r, k in _null_items(values, offsets).items()}


def _unreadable(path: str, where: str, exc: BaseException) -> BadSampleError:
    """A row group Arrow cannot decode (a corrupt page under an intact footer: "Couldn't deserialize
    thrift"), named by file and row group."""
    return BadSampleError(redact(path), where, f"cannot be read ({str(exc) or type(exc).__name__})",
                          fix="re-create the shard, or run with --data.on_bad_sample skip")


def _named_failures(path: str, tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """`tables` (one per row group), a row group that cannot be decoded named by file and number."""
    tables = iter(tables)
    for i in itertools.count():
        try:
            table = next(tables)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise _unreadable(path, f"row group {i}", exc) from exc
        yield table


def _sequence_type_error(path: str, column: str, typ: pa.DataType) -> BadSampleError:
    return BadSampleError(redact(path), "schema", f"column '{column}' is {typ}, expected list<int32|int64> "
                          f"(token ids) or list<float>/list<list<float>> (features)",
                          fix="re-run distlstm.prep or set --data.sequence_column")


def parquet_layout(path: str, column: str, *, storage_options=None, retries: int = 3,
                   source: Source | None = None) -> tuple[list[int], np.ndarray | Block, bytes | None, FooterFacts]:
    """Row-group sizes, the lengths of `column`, (remote shards, given as `source`) the footer, and
    what the footer tells about the model's sizes, for the index cache to keep. The lengths are the
    row groups' histograms (a Block) when the footer holds them (written by distlstm.prep: nothing
    but the footer is read), else every sample's length from the list offsets: a remote shard is
    then read by exact ranges, the footer, then only `column`'s chunks."""
    footer = None
    try:
        if source is not None:
            footer = fetch_footer(source)
            pf = RemoteParquetFile(source, metadata=parse_footer(footer))
        else:
            # Opened for this shard's layout only: its parsed footer is dropped afterwards.
            pf = pq.ParquetFile(_local_path(path, storage_options, retries))
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise BadSampleError(redact(path), "file", f"not a readable Parquet file ({exc})",
                             fix="re-create the shard or remove it from the dataset") from exc
    if column not in pf.schema_arrow.names:
        raise BadSampleError(redact(path), "schema", f"no column '{column}' (columns: "
                             f"{', '.join(pf.schema_arrow.names)})", fix="set --data.sequence_column")
    rows = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    top = max_token_id(pf, column)
    facts = FooterFacts(max_id=UNKNOWN_MAX_ID if top is None else top,
                        feature_width=fixed_feature_width(pf.schema_arrow.field(column).type))
    written = (pf.metadata.metadata or {}).get(LENGTHS_KEY.encode())
    block = decode_block(written, column=column, rows=rows) if written is not None else None
    if block is not None:
        return rows, block, footer, facts
    groups = pf.iter_row_groups([column]) if source is not None else \
        (pf.read_row_group(i, columns=[column]) for i in range(pf.num_row_groups))
    lengths = []
    for table in _named_failures(path, groups):
        col = table.column(0)
        try:
            offsets, _, _ = _list_parts(col)
        except TypeError:
            raise _sequence_type_error(path, column, col.type) from None
        lengths.append(np.diff(offsets).astype(np.int32))
    return rows, (np.concatenate(lengths) if lengths else np.zeros(0, np.int32)), footer, facts


def _to_numpy_values(path: str, column: str, values: pa.Array, column_type: pa.DataType) -> np.ndarray:
    typ = values.type
    if pa.types.is_integer(typ):
        # int32 stays int32 (no copy): the loader widens to int64 while padding, in the same pass.
        array = values.to_numpy(zero_copy_only=False)
        return array if array.dtype in (np.int32, np.int64) else array.astype(np.int64)
    if pa.types.is_floating(typ):
        return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)[:, None]
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        offsets, _, inner = _list_parts(values)
        widths = np.unique(np.diff(offsets))
        if len(widths) > 1:
            raise BadSampleError(redact(path), "schema", f"column '{column}' has feature vectors of different "
                                 f"sizes {widths[:5].tolist()}", fix="give every step the same number of features")
        width = int(widths[0]) if len(widths) else 0
        if not pa.types.is_floating(inner.type) and not pa.types.is_integer(inner.type):
            raise _sequence_type_error(path, column, column_type)
        return inner.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)
    # Name the column's type (list<string>), not its items' (string): that is what the user wrote.
    raise _sequence_type_error(path, column, column_type)


def _local_path(path: str, storage_options=None, retries: int = 3) -> str:
    """A local file by name: Arrow's native reader reads exact ranges and is several times faster
    than through a Python file object."""
    local = local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(errno.ENOENT, f"{redact(path)}: not found; check the path and that the "
                                f"shard exists", redact(path))
    return local


@functools.lru_cache(maxsize=4096)
def _local_footers(path: str, mtime_ns: int, size: int) -> RowGroupFooters:
    """Each local shard's footer walked once per process, keeping 24 bytes per row group instead of
    pyarrow's parsed footer (~2.5 KB per row group: parquet_footer.py); keyed by mtime and size so a
    rewritten file is read afresh. 4,096 shards of 2,442 row groups: 240 MB here, 25 GB parsed."""
    return RowGroupFooters.of(path)


def _row_groups(local: str) -> RowGroupFooters:
    st = os.stat(local)
    return _local_footers(local, st.st_mtime_ns, st.st_size)


def _vector_labels(path: str, column: str, lab_offsets: np.ndarray, lab_nulls: np.ndarray, lab_values: pa.Array,
                   first_row: int) -> np.ndarray:
    """A list<float> target column (regression with K outputs; its `_list_parts`) as an (n, K) array."""
    widths = np.diff(lab_offsets)[~lab_nulls]
    if len(np.unique(widths)) > 1:
        row = int(np.flatnonzero(np.diff(lab_offsets) != widths[0])[0])
        raise BadSampleError(redact(path), f"row {first_row + row}", f"'{column}' has {np.diff(lab_offsets)[row]} "
                             f"values but earlier rows have {widths[0]}", fix="give every sample the same number of targets")
    k = int(widths[0]) if len(widths) else 1
    flat = lab_values.to_numpy(zero_copy_only=False).astype(np.float32)
    labels = np.zeros((len(lab_nulls), k), np.float32)
    labels[~lab_nulls] = flat.reshape(-1, k)
    return labels


def _scalar_labels(path: str, column: str, lab: pa.Array, task: str | None) -> tuple[np.ndarray, dict[int, str]]:
    """One label per row as numpy, and the rows whose label is unusable. Class ids must be integers:
    a float column is accepted only where every value is whole (pandas writes int columns with
    nulls as float), and a row like 2.5 is bad instead of silently becoming class 2. A column that
    is not numeric at all (strings) is a schema error naming the column."""
    typ = lab.type
    classes = task is None or get_task(task).needs_classes
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
        need = "integer class ids" if classes else "numbers"
        raise BadSampleError(redact(path), "schema", f"label column '{column}' is {typ}; {task or 'the task'} needs "
                             f"{need}", fix="map the labels to numbers (distlstm.prep does, with --label-field), "
                             "or set --data.label_column")
    labels = lab.fill_null(0).to_numpy(zero_copy_only=False)
    bad: dict[int, str] = {}
    if task is not None and classes and pa.types.is_floating(typ):
        fraction = ~np.isfinite(labels) | (labels != np.round(labels))
        for r in np.flatnonzero(fraction).tolist():
            bad[r] = f"'{column}' is {float(labels[r])}, not a whole number: class ids must be integers"
        labels = np.where(fraction, 0, labels).astype(np.int64)
    return labels, bad


def _tag_problems(path: str, column: str, sequence_column: str, offsets: np.ndarray, lab_offsets: np.ndarray,
                  lab_values: pa.Array, skip: np.ndarray) -> dict[int, str]:
    """Rows (local index) whose tags do not fit: another step count than the sequence, or a
    fractional tag. Only these rows are bad, not the row group."""
    if not (pa.types.is_integer(lab_values.type) or pa.types.is_floating(lab_values.type)):
        raise BadSampleError(redact(path), "schema", f"tag column '{column}' holds {lab_values.type}; tag needs "
                             "integer tag ids per step", fix="map the tags to integers, or set --data.label_column")
    steps, tags = np.diff(offsets), np.diff(lab_offsets)
    bad = {int(r): f"'{column}' has {tags[r]} steps but '{sequence_column}' has {steps[r]}"
           for r in np.flatnonzero((steps != tags) & ~skip)}
    if pa.types.is_floating(lab_values.type) and len(lab_values):
        values = lab_values.to_numpy(zero_copy_only=False)
        fractional = ~np.isfinite(values) | (values != np.round(values))
        if fractional.any():
            rows = np.searchsorted(lab_offsets, np.flatnonzero(fractional), side="right") - 1
            for r in np.unique(rows).tolist():
                if not skip[r]:
                    bad.setdefault(r, f"'{column}' holds a fractional tag: tags must be integers")
    return bad


def read_parquet_chunk(path: str, row_group: int, *, sequence_column: str, label_column: str | None,
                       storage_options=None, retries: int = 3, task: str | None = None,
                       source: Source | None = None, flags_column: str | None = None) -> Chunk:
    """Decode one row group: flat values, offsets, labels. A list label column is per-step tags for
    task tag (aligned with `values`) and a K-vector per sample otherwise (labels shape (n, K)).
    A remote shard comes as `source` and is read by exact byte ranges (parquet_remote.py).
    `flags_column`: an optional bool (or integer) column read in the same request, as `Chunk.flags`
    (null = False)."""
    columns = [sequence_column] + ([label_column] if label_column else [])
    try:
        pf = RemoteParquetFile(source) if source is not None else _row_groups(_local_path(path, storage_options))
        with_flags = flags_column is not None and flags_column in pf.schema_arrow.names
        table = pf.read_row_group(row_group, columns=columns + [flags_column] * with_flags)
        first_row = pf.first_row(row_group)
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise _unreadable(path, f"row group {row_group}", exc) from exc
    # pyarrow silently leaves out a requested column the file does not have.
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise BadSampleError(redact(path), "schema", f"no column '{missing[0]}' (columns: "
                             f"{', '.join(pf.schema_arrow.names)})",
                             fix="set --data.sequence_column / --data.label_column, or re-run distlstm.prep")
    seq = table.column(0)
    try:
        offsets, nulls, values = _list_parts(seq)
    except TypeError:
        raise _sequence_type_error(path, sequence_column, seq.type) from None
    problems = _null_problems(sequence_column, values, offsets, row_group)  # row -> what is wrong with it
    if problems and pa.types.is_integer(values.type):
        values = values.fill_null(0)  # the rows are bad (reported, never used); keep the dtype
    labels = None
    if label_column:
        lab = table.column(1).combine_chunks()
        is_list = pa.types.is_list(lab.type) or pa.types.is_large_list(lab.type) or pa.types.is_fixed_size_list(lab.type)
        per_step = task is not None and get_task(task).per_step
        if is_list:
            lab_offsets, lab_nulls, lab_values = _list_parts(lab)
            for r, problem in _null_problems(label_column, lab_values, lab_offsets, row_group).items():
                problems.setdefault(r, problem)
        if is_list and not per_step:
            labels = _vector_labels(path, label_column, lab_offsets, lab_nulls, lab_values, first_row)
            nulls = nulls | lab_nulls
        elif is_list:
            for r, problem in _tag_problems(path, label_column, sequence_column, offsets, lab_offsets, lab_values,
                                            nulls | lab_nulls).items():
                problems.setdefault(r, problem)
            nulls = nulls | lab_nulls
            labels = (lab_values.fill_null(0) if lab_values.null_count else lab_values).to_numpy(zero_copy_only=False)
            unusable = nulls.copy()
            unusable[list(problems)] = True
            if unusable.any():
                # Tags must line up with `values` step for step: rows with a null sequence, null tags
                # or a wrong tag count get zeros in their place (they are reported as bad, never used).
                aligned = np.zeros(int(offsets[-1]), labels.dtype)
                keep = np.flatnonzero(~unusable)
                aligned[segments(offsets[keep], np.diff(offsets)[keep])] = \
                    labels[segments(lab_offsets[keep], np.diff(lab_offsets)[keep])]
                labels = aligned
        else:
            nulls = nulls | (lab.is_null().to_numpy(zero_copy_only=False) if lab.null_count else False)
            labels, scalar_bad = _scalar_labels(path, label_column, lab, task)
            for r, problem in scalar_bad.items():
                problems.setdefault(r, problem)
    bad = {int(r): f"null in '{sequence_column}' or '{label_column}'" for r in np.flatnonzero(nulls)}
    for r, problem in problems.items():
        bad.setdefault(r, problem)
    flags = None
    if with_flags:
        column = table.column(flags_column).combine_chunks()
        if column.null_count:
            column = column.fill_null(False if column.type == "bool" else 0)
        flags = column.to_numpy(zero_copy_only=False).astype(bool)
    return Chunk(values=_to_numpy_values(path, sequence_column, values, seq.type), offsets=offsets, labels=labels,
                 first_row=first_row, bad=bad, flags=flags)

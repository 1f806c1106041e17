"""Model sizes read from raw Parquet shards, for datasets without a manifest that gives them.

    vocab_size   largest token id + 1, from the row-group statistics of the sequence column (the
                 footer only: no data is read)
    input_size   the width F of a `list<fixed_size_list<float, F>>` feature column (the schema)

Only the footers are read, on first use and only when neither the config nor a manifest gives the
size (see `distlstm.run.build.resolve_config`), so a dataset with a manifest costs nothing here.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from distlstm.data.shards.parquet_footer import column_names
from distlstm.data.sources import is_local, local_path, open_file, redact


@contextlib.contextmanager
def _parquet_footer(url: str, storage_options: dict | None, retries: int):
    """A ParquetFile for its metadata and schema (a local path by name, anything else through fsspec)."""
    local = local_path(url)
    if is_local(url, storage_options) and os.path.isfile(local):
        yield pq.ParquetFile(local)
        return
    with open_file(url, storage_options=storage_options, retries=retries) as f:
        yield pq.ParquetFile(f)


def parquet_column_names(url: str, *, storage_options: dict | None = None, retries: int = 3) -> list[str]:
    local = local_path(url)
    if is_local(url, storage_options) and os.path.isfile(local):
        return column_names(local)  # the schema alone, not the row groups' metadata
    with _parquet_footer(url, storage_options, retries) as pf:
        return list(pf.schema_arrow.names)


def fixed_feature_width(typ: pa.DataType) -> int:
    """F for a `list<fixed_size_list<float, F>>` sequence type, else 0 (the width is not in the schema)."""
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        inner = typ.value_type
        if pa.types.is_fixed_size_list(inner) and pa.types.is_floating(inner.value_type):
            return int(inner.list_size)
    return 0


def max_token_id(pf: pq.ParquetFile, column: str) -> int | None:
    """The largest value of integer list column `column` over all row groups, from the footer's
    statistics; None when any row group has none (a writer that leaves them out) or the values
    are not integers."""
    typ = pf.schema_arrow.field(column).type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_integer(typ.value_type):
        return None
    md = pf.metadata
    leaf = [j for j in range(md.num_columns) if md.schema.column(j).path.startswith(column + ".")]
    if len(leaf) != 1:
        return None
    best = -1
    for i in range(md.num_row_groups):
        chunk = md.row_group(i).column(leaf[0])
        stats = chunk.statistics
        if stats is None or not stats.has_min_max:
            if chunk.num_values == 0 or (stats is not None and stats.null_count == chunk.num_values):
                continue  # only empty lists or nulls in this row group: nothing to bound
            return None
        best = max(best, int(stats.max))
    return best


UNKNOWN_MAX_ID = -2
"""FooterFacts.max_id when the statistics cannot tell (a row group without them)."""


@dataclass(frozen=True)
class FooterFacts:
    """What one shard's footer tells about the model's sizes, learned when the shard is indexed and
    kept in its index cache entry, so that a warm start opens no footer for them (a parsed footer
    is ~2.5 KB per row group, and what a process frees of it stays resident and is inherited by
    its DataLoader workers)."""

    max_id: int = UNKNOWN_MAX_ID   # largest token id (max_token_id), -1 = none, UNKNOWN_MAX_ID = cannot tell
    feature_width: int = 0         # fixed_feature_width of the sequence column


MAX_INFERRED_VOCAB = 1 << 24
"""The largest vocabulary taken from column statistics (16.8 M ids; a larger one must be given)."""


class DataDims:
    """The sizes of `indexes` (one or more DatasetIndex of the same dataset's splits), each read once
    on first use; 0 where the data does not tell (tar shards, missing statistics, plain lists)."""

    def __init__(self, *indexes) -> None:
        self.indexes = []
        for ix in indexes:
            if ix is not None and all(ix is not seen for seen in self.indexes):
                self.indexes.append(ix)

    def _parquet(self):
        for ix in self.indexes:
            for s, (url, fmt) in enumerate(zip(ix.shards, ix.formats)):
                yield ix, s, url, fmt == "parquet"

    def _facts(self, ix, s: int, url: str) -> FooterFacts:
        """Shard `s` of `ix`: from the index (learned when it was indexed), else from its footer."""
        known = ix.footer_facts[s] if s < len(ix.footer_facts) else None
        if known is not None:
            return known
        with _parquet_footer(url, ix.storage_options, ix.retries) as pf:
            top = max_token_id(pf, ix.sequence_column)
            return FooterFacts(max_id=UNKNOWN_MAX_ID if top is None else top,
                               feature_width=fixed_feature_width(pf.schema_arrow.field(ix.sequence_column).type))

    @functools.cached_property
    def input_size(self) -> int:
        for ix, s, url, parquet in self._parquet():
            if not parquet:
                return 0
            return self._facts(ix, s, url).feature_width
        return 0

    @functools.cached_property
    def vocab_size(self) -> int:
        """Largest token id + 1 over every shard of every index; 0 if any shard cannot tell.
        ValueError naming the shard when an id is beyond `MAX_INFERRED_VOCAB` (a stray id would
        otherwise size an embedding of that many rows)."""
        largest = -1
        for ix, s, url, parquet in self._parquet():
            if not parquet:
                return 0
            found = self._facts(ix, s, url).max_id
            if found == UNKNOWN_MAX_ID:
                return 0
            if found >= MAX_INFERRED_VOCAB:
                raise ValueError(f"{redact(url)}: column '{ix.sequence_column}' holds token id {found} (from the "
                                 f"Parquet statistics), beyond the {MAX_INFERRED_VOCAB:,} ids a vocabulary "
                                 f"inferred from the data may have; remap the ids to 0..V-1 (distlstm.prep does) or "
                                 f"set --model.vocab_size")
            largest = max(largest, found)
        return largest + 1 if largest >= 0 else 0

    @property
    def num_shards(self) -> int:
        return sum(len(ix.shards) for ix in self.indexes)

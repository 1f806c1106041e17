"""Reading one row group of a local Parquet file through a one-row-group footer
(distlstm/data/shards/parquet_footer.py), instead of holding pyarrow's parsed footer of the whole file.

A failure means a row group read this way differs from pyarrow's own read of it (values, types,
nulls, row offsets), the walk of the footer misreads a file pyarrow writes (long lists, key-value
metadata, dictionary pages, fixed-size lists, statistics off), or what a process keeps per row group
grows back towards the parsed footer's size (the DataLoader worker memory of issue 17).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distlstm.data.plan.chunks import LENGTHS_KEY
from distlstm.data.shards.parquet_footer import RowGroupFooters


def _table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 9, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = pa.array(rng.integers(0, 50, int(offsets[-1])).astype(np.int32))
    mask = rng.random(n) < 0.05
    tokens = pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(mask))
    feats = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 3).astype(np.float32)), 3)
    words = pa.array([f"w{int(v) % 7}" for v in rng.integers(0, 100, n)]).dictionary_encode()
    return pa.table({"tokens": tokens, "large": pa.array(tokens.to_pylist(), pa.large_list(pa.int64())),
                     "feats": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), feats),
                     "label": pa.array(rng.integers(0, 3, n)), "word": words,
                     "score": pa.array(np.where(rng.random(n) < 0.1, None, rng.random(n)).tolist(), pa.float64())})


@pytest.mark.parametrize("options", [
    dict(row_group_size=7),                                   # 43 row groups: the long list header
    dict(row_group_size=300, write_statistics=False),         # no statistics
    dict(row_group_size=50, compression="zstd", use_dictionary=False),
    dict(row_group_size=1000),                                # one row group
], ids=["many", "no-stats", "zstd-plain", "one"])
def test_every_row_group_reads_as_pyarrow_reads_it(tmp_path, options):
    table = _table(300)
    path = tmp_path / "x.parquet"
    pq.write_table(table, path, **options)
    pf = pq.ParquetFile(path)
    footers = RowGroupFooters.of(str(path))
    assert footers.num_row_groups == pf.num_row_groups
    assert footers.schema_arrow == pf.schema_arrow
    rows = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    assert footers.first_rows.tolist() == np.concatenate([[0], np.cumsum(rows)]).tolist()
    columns = table.column_names
    for g in range(pf.num_row_groups):
        ours = footers.read_row_group(g, columns)
        assert ours.equals(pf.read_row_group(g, columns=columns)), f"row group {g}"
        assert ours.num_rows == rows[g]
    assert footers.read_row_group(pf.num_row_groups - 1, ["label"]).equals(
        pf.read_row_group(pf.num_row_groups - 1, columns=["label"]))


def test_the_length_histograms_stay_out_of_the_small_footer_and_the_rest_of_the_metadata_stays(tmp_path):
    """As distlstm.prep writes them: key-value metadata added when the file is closed."""
    table = _table(200)
    path = tmp_path / "prepared.parquet"
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table, row_group_size=20)
        writer.add_key_value_metadata({LENGTHS_KEY: json.dumps({"big": list(range(5000))}), "other": "kept"})
    footers = RowGroupFooters.of(str(path))
    small = footers.metadata(3)
    assert small.num_row_groups == 1 and small.row_group(0).num_rows == 20
    assert LENGTHS_KEY.encode() not in small.metadata and small.metadata[b"other"] == b"kept"
    assert b"ARROW:schema" in small.metadata  # pyarrow's own types (large_list, dictionary) come from it
    assert len(footers.footer(3)) < pq.ParquetFile(path).metadata.serialized_size / 5
    assert footers.read_row_group(3, ["tokens", "word"]).equals(pq.ParquetFile(path).read_row_group(3, columns=["tokens", "word"]))


def test_a_process_keeps_a_few_bytes_per_row_group_not_the_parsed_footer(tmp_path):
    """What stays in memory per shard: 24 bytes per row group plus the footer's small fields, against
    the serialized footer (pyarrow's parsed form is several times that)."""
    path = tmp_path / "many.parquet"
    pq.write_table(_table(6000), path, row_group_size=10)
    footers = RowGroupFooters.of(str(path))
    kept = footers.spans.nbytes + footers.first_rows.nbytes + sum(len(v) for _f, _t, v in footers.before + footers.after)
    serialized = pq.ParquetFile(path).metadata.serialized_size
    assert footers.num_row_groups == 600
    assert kept / footers.num_row_groups < 40 and kept < serialized / 10, (kept, serialized)


@pytest.mark.parametrize("damage", ["magic", "length", "footer"])
def test_a_damaged_footer_is_an_arrow_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "bad.parquet"
    pq.write_table(_table(100), path, row_group_size=10)
    data = bytearray(path.read_bytes())
    if damage == "magic":
        data[-1:] = b"X"
    elif damage == "length":
        data[-8:-4] = (len(data) * 2).to_bytes(4, "little")
    else:
        n = int.from_bytes(data[-8:-4], "little")
        data[len(data) - 8 - n:len(data) - 8] = b"\xff" * n
    path.write_bytes(bytes(data))
    with pytest.raises(pa.ArrowInvalid, match="bad.parquet"):
        RowGroupFooters.of(str(path))


def test_a_row_group_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(_table(30), path, row_group_size=10)
    with pytest.raises(pa.ArrowInvalid, match="row group 3 does not exist"):
        RowGroupFooters.of(str(path)).read_row_group(3, ["tokens"])


def test_column_names_come_from_the_schema_alone(tmp_path):
    from distlstm.data.shards.parquet_footer import column_names
    path = tmp_path / "x.parquet"
    table = _table(400)
    pq.write_table(table, path, row_group_size=3)
    assert column_names(str(path)) == table.column_names == pq.ParquetFile(path).schema_arrow.names


def test_the_index_keeps_what_the_footers_tell_so_a_warm_start_reads_none(tmp_path):
    """The largest token id (vocab_size) and feature width come from the index cache entries on a
    warm start (learned when the shard was indexed), not from parsing every footer again; an entry
    written before they were kept still works, through the footer."""
    from distlstm.data.shards.dims import DataDims, FooterFacts
    from distlstm.data.shards.index import open_index
    folder = tmp_path / "raw"
    folder.mkdir()
    for s in range(3):
        t = _table(120, seed=s)
        pq.write_table(t.select(["tokens", "label"]), folder / f"part-{s}.parquet", row_group_size=16)
    truth = max(max(v for row in pq.read_table(p).column("tokens").to_pylist() if row for v in row if v is not None)
                for p in folder.glob("*.parquet"))
    cold = open_index(str(folder / "*.parquet"), cache_dir=tmp_path / "cache")
    warm = open_index(str(folder / "*.parquet"), cache_dir=tmp_path / "cache")
    assert all(isinstance(f, FooterFacts) for f in warm.footer_facts)
    assert DataDims(warm).vocab_size == DataDims(cold).vocab_size == truth + 1
    assert [f.max_id for f in warm.footer_facts] == [f.max_id for f in cold.footer_facts]
    # A cache entry of the previous layout (no facts): the footer is read instead, same answer.
    for entry in (tmp_path / "cache" / "index").glob("*.npz"):
        with np.load(entry) as z:
            kept = {k: z[k] for k in z.files if k not in ("max_id", "feature_width", "chunk_tokens",
                                                         "chunk_longest", "chunk_shortest")}
        np.savez(entry, **kept)
    old = open_index(str(folder / "*.parquet"), cache_dir=tmp_path / "cache")
    assert old.footer_facts == [None, None, None]
    assert DataDims(old).vocab_size == truth + 1 and DataDims(old).input_size == 0
    assert old.chunk_lengths.tokens.tolist() == warm.chunk_lengths.tokens.tolist()

"""Remote shards are read once per epoch: exact byte ranges, one owner per chunk, at any world size.

A real HTTP server on loopback (tests/_http_server.py) serves prepared Parquet and tar shards and
logs every request with its Range header and the bytes it sent. A failure here means that with the
default config some chunk is fetched (and so decoded) more than once per epoch across all ranks and
DataLoader workers, or that a row group's read pulls bytes other than its column chunks (readahead,
a block cache, a footer per read), or that a server without byte-range support breaks the run or
is read more than once per process, or that remote data differs from the same data on local disk.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _loader_worker as lw  # noqa: E402
from _http_server import bytes_sent  # noqa: E402

from distlstm.data.prep import prep  # noqa: E402
from distlstm.data.shards.index import open_index  # noqa: E402
from distlstm.data.shards.parquet_remote import column_chunk_ranges  # noqa: E402
from distlstm.data.sources import coalesce  # noqa: E402


def _prep(tmp_path: Path, out: Path, fmt: str = "parquet", n: int = 1200) -> Path:
    """A classify dataset written by distlstm.prep: several shards, many small row groups."""
    seqs, labels = lw.sample_data(n, seed=8)
    src = tmp_path / f"in-{fmt}.jsonl"
    src.write_text("".join(json.dumps({"ids": s.tolist(), "y": int(y)}) + "\n" for s, y in zip(seqs, labels)))
    prep.run(prep.build_parser().parse_args(
        ["--jsonl", str(src), "--tokens-field", "ids", "--label-field", "y", "--task", "classify", "--format", fmt,
         "--valid-fraction", "0.1", "--shard-size-mb", "0.015", "--rows-per-group", "24", "--out", str(out),
         "--quiet"]))
    return out


def _chunk_ranges(folder: Path, columns: list[str]) -> dict[tuple[str, int, int], int]:
    """(url path, start, end) of each row group's coalesced column chunks -> global chunk id, in the
    index's order (manifest order of shards, row groups in order)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return _chunk_ranges_of(folder, [shard["path"] for shard in manifest["shards"]], columns)


def _chunk_ranges_of(folder: Path, shards: list[str], columns: list[str]) -> dict[tuple[str, int, int], int]:
    """The same for the Parquet files `shards` (names under `folder`), in that order."""
    out, c = {}, 0
    for shard in shards:
        md = pq.read_metadata(folder / shard)
        for g in range(md.num_row_groups):
            for a, b in coalesce(column_chunk_ranges(md, g, columns)):
                out[(shard, a, b)] = c
            c += 1
    return out


def _fetches(log, folder_url_path: str, ranges: dict) -> collections.Counter:
    """Chunk id -> times fetched; fails on any .parquet request that is not one chunk's exact range."""
    got: collections.Counter = collections.Counter()
    for r in log:
        if not r.path.startswith(folder_url_path) or not r.path.endswith(".parquet") or r.method != "GET":
            continue
        name = r.path[len(folder_url_path):]
        assert r.range and r.range.startswith("bytes=") and r.status == 206, f"not a range read: {r}"
        a, _, b = r.range[len("bytes="):].partition("-")
        key = (name, int(a), int(b) + 1)
        assert key in ranges, f"{r.path} {r.range}: not the column chunks of one row group"
        got[ranges[key]] += 1
    return got


@pytest.fixture
def served(tmp_path, http_server):
    """A prepared Parquet dataset under the server's root, indexed once (the index cache then holds
    every shard's footer), with the request log cleared."""
    _prep(tmp_path, http_server.root / "pq")
    cache = tmp_path / "cache"
    index = open_index(http_server.url("pq/train/"), cache_dir=cache)
    assert index.num_chunks >= 30 and len(index.shards) >= 3, (index.num_chunks, index.shards)
    http_server.take_log()
    return http_server, index, cache


def test_indexing_asks_each_shard_for_its_size_once(served):
    """The manifest check (data.verify=size) and the index cache's key need the same size and date:
    one request per shard, not one for each (on an object store each is a round trip, per rank)."""
    server, index, cache = served
    for verify in ("size", "none"):
        again = open_index(server.url("pq/train/"), cache_dir=cache, verify=verify)
        assert again.fingerprint() == index.fingerprint()
        log = server.take_log()
        for shard in index.shards:
            name = shard[shard.index("pq/train/"):]
            stats = [r for r in log if r.path == "/" + name]
            assert len(stats) == 1 and stats[0].method == "HEAD", (verify, name, stats)


@pytest.mark.timeout(120)
def test_two_ranks_two_workers_fetch_every_chunk_exactly_once(served, tmp_path):
    """Default data config (data.streams=auto): 2 simulated ranks x 2 real DataLoader worker
    processes; over one epoch each row group's column chunks are fetched exactly once, with one
    request, and nothing else of the shards is read (footers come from the index cache)."""
    server, index, _ = served
    batches = [lw.take(lw.make_loader(None, None, index=index, rank=r, world=2, workers=2, max_epochs=1), 10_000)
               for r in range(2)]
    assert len({len(b) for b in batches}) == 1, "ranks ran different numbers of steps"
    ids = [i for rank in batches for b in rank if b["weight"] for i in b["ids"]]
    assert sorted(ids) == list(range(index.num_samples)), "a sample was skipped or repeated"
    log = server.take_log()
    ranges = _chunk_ranges(server.root / "pq" / "train", ["tokens", "label"])
    fetched = _fetches(log, "/pq/train/", ranges)
    assert set(fetched) == set(range(index.num_chunks)), "a chunk was never fetched"
    assert max(fetched.values()) == 1, f"chunks fetched twice: {[c for c, n in fetched.items() if n > 1]}"
    dataset = sum(p.stat().st_size for p in (server.root / "pq" / "train").glob("*.parquet"))
    column_bytes = sum(b - a for a, b in [(k[1], k[2]) for k in ranges])
    assert bytes_sent(log, "/pq/train/", ".parquet") == column_bytes <= dataset


@pytest.mark.timeout(120)
def test_lm_stream_mode_reads_each_row_group_once_per_rank(tmp_path, http_server):
    """lm stream mode (the lm default), 2 ranks asking for 2 workers each, over HTTP: a rank reads
    each row group its rows cross once per epoch, tokens and doc_start in one request, although a
    row's start and the previous row's end share a row group (read at the epoch's start and again
    at its end); only the row group where the two ranks' rows meet is read by both."""
    from distlstm.data.plan.stream import StreamParams
    from distlstm.data.loader.stream_loader import StreamLoader
    from tests._stream_data import documents, write_stream_parquet
    write_stream_parquet(http_server.root / "lm" / "s.parquet", documents(150, seed=2, max_len=80), piece=16,
                         rows_per_group=6)
    index = open_index(http_server.url("lm/s.parquet"), cache_dir=tmp_path / "cache")
    assert index.num_chunks >= 60
    ranges = _chunk_ranges_of(http_server.root / "lm", ["s.parquet"], ["tokens", "doc_start"])
    per_rank = []
    for rank in range(2):
        http_server.take_log()
        loader = StreamLoader(index, StreamParams(batch_size=4, bptt=10), seed=0, dp_rank=rank, dp_world_size=2,
                              num_workers=2, max_epochs=1, log=lambda msg: None)
        assert loader.num_workers == 1
        assert sum(1 for _ in loader) > 0
        fetched = _fetches(http_server.take_log(), "/lm/", ranges)
        assert max(fetched.values()) == 1, f"rank {rank} read row groups twice: {sorted(fetched.items())}"
        per_rank.append(set(fetched))
    assert per_rank[0] | per_rank[1] == set(range(index.num_chunks))
    assert len(per_rank[0] & per_rank[1]) <= 1


@pytest.mark.timeout(120)
def test_one_stream_reads_every_chunk_on_every_worker(served):
    """The contrast that shows the test above is not vacuous: data.streams=1 at 2 ranks x 2 workers
    fetches every chunk about 4 times."""
    server, index, _ = served
    for r in range(2):
        lw.take(lw.make_loader(None, None, index=index, rank=r, world=2, workers=2, max_epochs=1, streams=1), 10_000)
    fetched = _fetches(server.take_log(), "/pq/train/", _chunk_ranges(server.root / "pq" / "train", ["tokens", "label"]))
    assert sum(fetched.values()) >= 3 * index.num_chunks


@pytest.mark.timeout(120)
def test_remote_batches_equal_local_and_footer_is_fetched_once_without_the_cache(served, tmp_path):
    """Over HTTP the loader yields exactly the batches it yields from the same files on disk. With
    no footer in the index (an entry written by an older version), each process fetches each
    shard's footer once (2 small reads), not once per row group."""
    server, index, cache = served
    local = lw.take(lw.make_loader(str(server.root / "pq" / "train"), tmp_path / "cache-local", max_epochs=1), 10_000)
    server.take_log()
    index.footer_caches = [None] * len(index.shards)
    from distlstm.data.shards import parquet_remote
    parquet_remote._metadata.cache_clear()
    remote = lw.take(lw.make_loader(None, None, index=index, max_epochs=1), 10_000)
    assert remote == local
    chunk_reads = {(f"/pq/train/{name}", f"bytes={a}-{b - 1}")
                   for name, a, b in _chunk_ranges(server.root / "pq" / "train", ["tokens", "label"])}
    other = collections.Counter(r.path for r in server.take_log()
                                if r.method == "GET" and (r.path, r.range) not in chunk_reads)
    # Per shard: its last 8 bytes (footer length), then the footer itself.
    assert sorted(other.values()) == [2] * len(index.shards), other


@pytest.mark.timeout(120)
def test_server_without_ranges_reads_each_shard_once_per_process(tmp_path, http_server_no_ranges, caplog):
    """A server that ignores Range (like `python -m http.server`): the loader still works and reads
    each shard whole, once per process, saying so in the log; a shard over data.whole_shard_max_mb
    is a clear error instead."""
    server = http_server_no_ranges
    _prep(tmp_path, server.root / "pq")
    index = open_index(server.url("pq/train/"), cache_dir=tmp_path / "cache")
    server.take_log()
    remote = lw.take(lw.make_loader(None, None, index=index, max_epochs=1), 10_000)
    local = lw.take(lw.make_loader(str(server.root / "pq" / "train"), tmp_path / "cache-local", max_epochs=1), 10_000)
    assert remote == local
    log = server.take_log()
    gets = collections.Counter(r.path for r in log if r.method == "GET" and r.path.endswith(".parquet"))
    # The indexing pass in this process already holds every shard whole: no request at all now.
    assert sum(gets.values()) == 0, gets
    assert "ignores byte ranges" in caplog.text
    from distlstm.data import sources
    sources._WHOLE = sources._WholeFiles()  # a fresh process
    for r in range(2):  # 2 ranks x 2 workers: each worker process reads each shard it needs once
        lw.take(lw.make_loader(None, None, index=index, rank=r, world=2, workers=2, max_epochs=1), 10_000)
    gets = collections.Counter(r.path for r in server.take_log() if r.method == "GET" and r.path.endswith(".parquet"))
    assert set(gets) == {"/pq/train/" + Path(s).name for s in index.shards}
    assert max(gets.values()) <= 4, gets  # at most once per worker process
    small = open_index(server.url("pq/train/"), cache_dir=tmp_path / "cache", whole_shard_max_mb=0.001)
    sources._WHOLE = sources._WholeFiles()
    with pytest.raises(ValueError, match="ignores byte ranges.*whole_shard_max_mb=0"):
        lw.take(lw.make_loader(None, None, index=small, max_epochs=1), 10)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranges", [True, False])
def test_tar_shards_are_streamed_once_per_owner(tmp_path, http_server, http_server_no_ranges, ranges):
    """Tar shards (one chunk each) are streamed front to back with one request by the one worker
    that owns them, with or without byte-range support on the server."""
    server = http_server if ranges else http_server_no_ranges
    folder = _prep(tmp_path, server.root / "tar", fmt="tar", n=600) / "train"
    index = open_index(server.url("tar/train/"), cache_dir=tmp_path / "cache")
    assert len(index.shards) >= 4
    server.take_log()
    batches = [lw.take(lw.make_loader(None, None, index=index, rank=r, world=2, workers=2, max_epochs=1), 10_000)
               for r in range(2)]
    ids = [i for rank in batches for b in rank if b["weight"] for i in b["ids"]]
    assert sorted(ids) == list(range(index.num_samples))
    log = server.take_log()
    gets = collections.Counter(r.path for r in log if r.method == "GET" and r.path.endswith(".tar"))
    assert sorted(gets.values()) == [1] * len(index.shards), gets
    assert bytes_sent(log, "/tar/train/", ".tar") == sum(p.stat().st_size for p in folder.glob("*.tar"))


def test_a_range_is_the_range_whatever_the_server(http_server, http_server_no_ranges):
    """fsspec's cat_file hands back whatever body comes back: from a server that ignores Range, the
    whole file as if it were the range. read_bytes/read_ranges check the status and slice."""
    from distlstm.data.sources import read_bytes, read_ranges
    data = bytes(range(256)) * 40
    for server in (http_server, http_server_no_ranges):
        (server.root / "blob.bin").write_bytes(data)
        url = server.url("blob.bin")
        assert read_bytes(url, 100, 164) == data[100:164]
        assert read_ranges(url, [(0, 10), (5000, 5100), (-7, None)]) == [data[:10], data[5000:5100], data[-7:]]
    assert http_server.count("blob.bin", "GET") == 4  # one request per range (the first alone)
    assert http_server_no_ranges.count("blob.bin", "GET") == 1  # the whole file once, then from memory


@pytest.mark.timeout(60)
def test_object_store_reads_exact_ranges_through_fsspec(tmp_path):
    """Object stores go through fsspec's cat_file (here its in-memory filesystem, a real fsspec
    backend): every row group read is exactly its column chunks, and batches equal local ones."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    folder = lw.write_parquet(tmp_path / "pq", 400, rows_per_group=25, shards=2, seed=3)
    fs = fsspec.filesystem("memory")
    for p in folder.glob("*.parquet"):
        fs.pipe(f"/bucket/pq/{p.name}", p.read_bytes())
    reads = []
    original = MemoryFileSystem.cat_file

    def counting_cat_file(self, path, start=None, end=None, **kw):
        reads.append((path.rsplit("/", 1)[-1], start, end))
        return original(self, path, start=start, end=end, **kw)

    try:
        index = open_index("memory://bucket/pq/*.parquet", cache_dir=tmp_path / "cache")
        MemoryFileSystem.cat_file = counting_cat_file
        remote = lw.take(lw.make_loader(None, None, index=index, max_epochs=1), 10_000)
    finally:
        MemoryFileSystem.cat_file = original
        fs.rm("/bucket", recursive=True)
    local = lw.take(lw.make_loader(str(folder), tmp_path / "cache-local", max_epochs=1), 10_000)
    assert remote == local
    expected = set(_chunk_ranges_of(folder, sorted(p.name for p in folder.glob("*.parquet")), ["tokens", "label"]))
    assert sorted(reads) == sorted(expected), "reads other than each row group's column chunks, once"


@pytest.mark.timeout(60)
def test_a_stream_cut_midway_is_resumed_and_a_range_cut_is_retried(tmp_path, http_server):
    """A tar shard's stream that breaks off midway is re-opened and continued where it stopped; a
    row group's range that comes back short is fetched again: the data equals the local file's."""
    from distlstm.data.shards.parquet import read_parquet_chunk
    from distlstm.data.shards.tar import read_tar_chunk
    tar_dir = _prep(tmp_path, http_server.root / "tar", fmt="tar", n=300) / "train"
    name = sorted(p.name for p in tar_dir.glob("*.tar"))[0]
    http_server.fail_once(f"tar/train/{name}", "cut")
    remote = read_tar_chunk(http_server.url(f"tar/train/{name}"), task="classify")
    local = read_tar_chunk(str(tar_dir / name), task="classify")
    assert remote.keys == local.keys and np.array_equal(remote.values, local.values)
    assert http_server.count(f"tar/train/{name}", "GET") == 2
    pq_dir = _prep(tmp_path, http_server.root / "pq") / "train"
    index = open_index(http_server.url("pq/train/"), cache_dir=tmp_path / "cache")
    shard = Path(index.shards[0]).name
    http_server.fail_once(f"pq/train/{shard}", "cut")
    got = read_parquet_chunk(index.shards[0], 2, sequence_column="tokens", label_column="label",
                             source=index.remote_source(0))
    want = read_parquet_chunk(str(pq_dir / shard), 2, sequence_column="tokens", label_column="label")
    assert np.array_equal(got.values, want.values) and np.array_equal(got.labels, want.labels)


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_default_config_fetches_each_chunk_once_per_epoch(served, tmp_path):
    """The acceptance test: `torchrun --nproc_per_node 2 -m distlstm.train` with 2 DataLoader workers
    per rank and otherwise the default data config, streaming train and valid splits over HTTP for
    one epoch (evaluation at the end). Every train chunk is fetched exactly once, every valid chunk
    once (one evaluation, each rank its share), and every train sample is consumed exactly once."""
    server, index, cache = served
    open_index(server.url("pq/valid/"), cache_dir=cache)
    server.take_log()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distlstm.train",
           "--data.train", server.url("pq/train/"), "--data.valid", server.url("pq/valid/"),
           "--data.cache_dir", str(cache), "--data.num_workers", "2", "--train.max_epochs", "1",
           "--train.max_steps", "0", "--train.eval_every", "0", "--model.hidden_size", "16",
           "--model.embed_size", "8", "--train.run_dir", str(run_dir), "--log.progress", "false",
           "--log.tensorboard", "false", "--log.sample_ids", "true", "--checkpoint.at_end", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "4 stream(s)" in proc.stdout, proc.stdout[-3000:]
    log = server.take_log()
    for split, chunks in (("train", index.num_chunks), ("valid", None)):
        fetched = _fetches(log, f"/pq/{split}/", _chunk_ranges(server.root / "pq" / split, ["tokens", "label"]))
        assert max(fetched.values()) == 1, f"{split}: chunks fetched twice: {[c for c, n in fetched.items() if n > 1]}"
        if chunks is not None:
            assert len(fetched) == chunks, f"{split}: {chunks - len(fetched)} chunks never fetched"
    seen = collections.Counter()
    for path in (run_dir / "samples").glob("rank*.txt"):
        for line in path.read_text().splitlines():
            seen.update(int(i) for i in line.split()[2:])
    assert sorted(seen) == list(range(index.num_samples)) and set(seen.values()) == {1}
    assert np.isfinite(json.loads((run_dir / "final.json").read_text())["valid_loss"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks,workers", [(1, 0), (2, 2)])
def test_a_prepared_dataset_is_indexed_from_its_footers_and_a_cold_epoch_reads_it_once(tmp_path, http_server,
                                                                                       ranks, workers):
    """Issue 17: prep writes the row groups' length histograms into the Parquet footer, so a cold
    first run indexes a remote prepared dataset without reading any token column, and the whole
    cold epoch (index + training reads) moves <= 1.15x the shards' bytes (it was 1.96x: indexing
    decoded every row group's tokens, then training read them again)."""
    _prep(tmp_path, http_server.root / "pq")
    folder = http_server.root / "pq" / "train"
    ranges = _chunk_ranges(folder, ["tokens", "label"])
    http_server.take_log()
    index = open_index(http_server.url("pq/train/"), cache_dir=tmp_path / "cold")
    log = http_server.take_log()
    chunks = {(name, f"bytes={a}-{b - 1}") for name, a, b in ranges}
    column_reads = [r for r in log if r.method == "GET" and r.path.startswith("/pq/train/")
                    and (r.path[len("/pq/train/"):], r.range) in chunks]
    assert not column_reads, f"indexing read column chunks: {column_reads[:3]}"
    indexing = bytes_sent(log, "/pq/train/", ".parquet")
    batches = [lw.take(lw.make_loader(None, None, index=index, rank=r, world=ranks, workers=workers, max_epochs=1),
                       10_000) for r in range(ranks)]
    ids = [i for rank in batches for b in rank if b["weight"] for i in b["ids"]]
    assert sorted(ids) == list(range(index.num_samples))
    dataset = sum(p.stat().st_size for p in folder.glob("*.parquet"))
    total = indexing + bytes_sent(http_server.take_log(), "/pq/train/", ".parquet")
    assert total <= 1.15 * dataset, f"a cold epoch read {total / dataset:.2f}x the dataset"

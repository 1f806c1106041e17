"""The batch loader over real shards: exact resume, elastic world sizes, streaming over HTTP.

A failure here means a restarted run repeats or skips batches (or yields different tensors), a
checkpoint taken on N ranks cannot continue on M ranks without losing or duplicating samples,
DataLoader workers change the batch order, or remote shards read differently from local ones or
a transient HTTP error kills the run instead of being retried.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _loader_worker as lw  # noqa: E402

from distlstm.data.prep import prep  # noqa: E402
from distlstm.data.shards.index import open_index  # noqa: E402
from distlstm.data.plan.epoch import EpochPlan  # noqa: E402


@pytest.fixture
def parquet_dir(tmp_path):
    return lw.write_parquet(tmp_path / "pq", 600, rows_per_group=50, shards=3)


def _epoch_batches(loader) -> int:
    return EpochPlan(loader.index.chunk_offsets, loader.index.sample_lengths(), loader.params, seed=loader.seed,
                     epoch=0).num_batches


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"batch {i} differs: {g} != {w}"


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("workers,streams,shape_buckets", [(0, 1, 0), (2, 1, 0), (2, 2, 0), (0, 1, 8), (2, 1, 8)])
@pytest.mark.parametrize("where", ["mid-epoch", "across-epoch-boundary"])
def test_resume_yields_identical_batches(parquet_dir, tmp_path, workers, where, streams, shape_buckets):
    cache = tmp_path / "cache"
    kw = dict(workers=workers, max_epochs=3, streams=streams, window_chunks=2, shape_buckets=shape_buckets)
    G = _epoch_batches(lw.make_loader(parquet_dir, cache, streams=streams, window_chunks=2,
                                      shape_buckets=shape_buckets))
    n, k = (7, 9) if where == "mid-epoch" else (G - 3, 8)
    reference = lw.take(lw.make_loader(parquet_dir, cache, **kw), n + k)
    first = lw.make_loader(parquet_dir, cache, **kw)
    before = lw.take(first, n)
    state = first.state_dict()
    assert (state["epoch"], state["consumed"]) == (0, n)
    fresh = lw.make_loader(parquet_dir, cache, **kw)
    fresh.load_state_dict(state)
    after = lw.take(fresh, k)
    _assert_same(before + after, reference)
    if where == "across-epoch-boundary":
        assert {b["epoch"] for b in after} == {0, 1}
        assert (fresh.epoch, fresh.consumed) == (1, k - 3)
        # Epoch 1 is a new order, not a replay of epoch 0.
        epoch1 = [b["ids"] for b in reference if b["epoch"] == 1]
        assert epoch1 != [b["ids"] for b in reference[:len(epoch1)]]


def test_state_at_epoch_end_points_at_next_epoch(parquet_dir, tmp_path):
    loader = lw.make_loader(parquet_dir, tmp_path / "cache", max_epochs=1)
    batches = lw.take(loader, 10_000)
    assert len(batches) == _epoch_batches(loader)
    assert (loader.epoch, loader.consumed) == (1, 0)
    ids = np.concatenate([b["ids"] for b in batches])
    np.testing.assert_array_equal(np.sort(ids), np.arange(600))


def test_load_state_refuses_other_seed_or_plan(parquet_dir, tmp_path):
    cache = tmp_path / "cache"
    state = lw.make_loader(parquet_dir, cache).state_dict()
    with pytest.raises(ValueError, match="seed changed"):
        lw.make_loader(parquet_dir, cache, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="plan changed"):
        lw.make_loader(parquet_dir, cache, max_tokens=512).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        lw.make_loader(parquet_dir, cache).load_state_dict({**state, "version": 99})


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_real_ranks_with_workers_resume_exactly(parquet_dir, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    open_index(str(parquet_dir), cache_dir=cache)  # index once; the ranks read the cached index
    G = _epoch_batches(lw.make_loader(parquet_dir, cache))
    per_rank = -(-G // 2)
    n, k = per_rank - 4, 7  # resume 4 steps before the end of epoch 0, run into epoch 1
    procs = [subprocess.Popen([sys.executable, str(HERE / "_loader_worker.py"), "resume", str(parquet_dir),
                               str(cache), str(r), "2", "2", str(n), str(k), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        try:
            log, _ = p.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank process hung")
        assert p.returncode == 0, log[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        _assert_same(r["resumed"], r["reference"])
    assert ranks[0]["state"] == ranks[1]["state"], "the loader state is global, the same on every rank"
    # Over epoch 0, the two ranks together see every sample exactly once (fillers have weight 0).
    ids = np.concatenate([b["ids"] for r in ranks for b in r["reference"] if b["epoch"] == 0 and b["weight"]])
    np.testing.assert_array_equal(np.sort(ids), np.arange(600))
    assert len({len([b for b in r["reference"] if b["epoch"] == 0]) for r in ranks}) == 1


# ---------------------------------------------------------------------------------------------- elastic


def _run_to_epoch_end(loaders) -> list[list[dict]]:
    """Step the simulated ranks in lockstep to the end of epoch 0; batches per rank."""
    out = [lw.take(ld, 10_000) for ld in loaders]  # max_epochs=1: each stops at the end of epoch 0
    assert len({len(b) for b in out}) == 1, "ranks ran different numbers of steps"
    return out


def _real_ids(batches) -> list[int]:
    return [i for b in batches if b["weight"] for i in b["ids"] if i >= 0]  # -1: a bounded shape's dummy row


@pytest.mark.parametrize("old,new,steps,shape_buckets", [(2, 1, 5, 0), (1, 3, 11, 0), (3, 2, 4, 0), (3, 2, 4, 8)])
def test_elastic_resume_covers_epoch_once(parquet_dir, tmp_path, old, new, steps, shape_buckets):
    cache = tmp_path / "cache"
    index = open_index(str(parquet_dir), cache_dir=cache)
    before_loaders = [lw.make_loader(None, None, index=index, rank=r, world=old, max_epochs=1,
                                     shape_buckets=shape_buckets) for r in range(old)]
    before = [lw.take(ld, steps) for ld in before_loaders]
    states = [ld.state_dict() for ld in before_loaders]
    assert all(s == states[0] for s in states) and states[0]["consumed"] == steps * old
    after_loaders = [lw.make_loader(None, None, index=index, rank=r, world=new, max_epochs=1,
                                    shape_buckets=shape_buckets) for r in range(new)]
    for ld in after_loaders:
        ld.load_state_dict(states[0])
    after = _run_to_epoch_end(after_loaders)
    ids = [i for batches in before + after for i in _real_ids(batches)]
    assert len(ids) == len(set(ids)), "a sample was consumed twice"
    assert sorted(ids) == list(range(600)), "a sample was never consumed"
    assert all((ld.epoch, ld.consumed) == (1, 0) for ld in after_loaders)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("new,new_workers", [(1, 2), (3, 1)])
def test_elastic_resume_with_auto_streams_and_real_workers(tmp_path, new, new_workers):
    """The default data.streams=auto at 2 ranks x 2 workers plans 4 streams; the state records
    them, so a resume on 1 rank x 2 workers or 3 ranks x 1 worker finishes the epoch on that plan
    (each sample exactly once) and plans later epochs for its own ranks x workers."""
    index = open_index(str(lw.write_parquet(tmp_path / "pq", 1200, rows_per_group=20, shards=3)),
                       cache_dir=tmp_path / "cache")
    old = [lw.make_loader(None, None, index=index, rank=r, world=2, workers=2, max_epochs=1) for r in range(2)]
    before = [lw.take(ld, 7) for ld in old]
    states = [ld.state_dict() for ld in old]
    assert states[0] == states[1] and states[0]["streams"] == 4 and states[0]["consumed"] == 14
    after_loaders = [lw.make_loader(None, None, index=index, rank=r, world=new, workers=new_workers, max_epochs=1)
                     for r in range(new)]
    for ld in after_loaders:
        ld.load_state_dict(json.loads(json.dumps(states[0])))
    assert after_loaders[0].params_for(0).streams == 4
    assert after_loaders[0].params_for(1).streams == new * new_workers
    after = _run_to_epoch_end(after_loaders)
    ids = [i for batches in before + after for i in _real_ids(batches)]
    assert len(ids) == len(set(ids)), "a sample was consumed twice"
    assert sorted(ids) == list(range(1200)), "a sample was never consumed"
    assert after_loaders[0].state_dict()["streams"] == new * new_workers  # epoch 1 is planned afresh


@pytest.mark.parametrize("chunks,expected", [(64, 4), (32, 4), (31, 2), (16, 2), (15, 1), (2, 1)])
def test_streams_auto_is_ranks_times_workers_when_the_data_allows(chunks, expected):
    """auto = ranks x workers (2 x 2 here) when every stream gets at least `min_chunks_per_stream`
    chunks, else the largest divisor of it that does."""
    from distlstm.data.loader.batch_loader import resolve_streams
    kw = dict(dp_world_size=2, num_workers=2, min_chunks_per_stream=8)
    assert resolve_streams("auto", num_chunks=chunks, **kw) == expected
    assert resolve_streams(3, num_chunks=chunks, **kw) == 3
    assert resolve_streams("auto", dp_world_size=3, num_workers=0, num_chunks=100) == 3


def test_version_1_state_resumes_as_one_stream(parquet_dir, tmp_path):
    """A loader state saved before data.streams=auto (version 1, one stream) resumes exactly."""
    cache = tmp_path / "cache"
    reference = lw.take(lw.make_loader(parquet_dir, cache, max_epochs=1, streams=1), 20)
    state = lw.make_loader(parquet_dir, cache, streams=1).state_dict()
    v1 = {k: v for k, v in state.items() if k != "streams"} | {"version": 1, "consumed": 9}
    fresh = lw.make_loader(parquet_dir, cache, max_epochs=1, world=2)  # auto: 2 streams from epoch 1 on
    fresh.load_state_dict(v1)
    assert fresh.params_for(0).streams == 1
    got = lw.take(fresh, 11 // 2)
    assert [b["ids"] for b in got] == [b["ids"] for b in reference[9::2]][:len(got)]


# ---------------------------------------------------------------------------------------------- HTTP


def _prep_tar(tmp_path: Path, out: Path) -> Path:
    seqs, labels = lw.sample_data(400, seed=3)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"ids": s.tolist(), "y": int(y)}) + "\n" for s, y in zip(seqs, labels)))
    prep.run(prep.build_parser().parse_args(
        ["--jsonl", str(src), "--tokens-field", "ids", "--label-field", "y", "--task", "classify", "--format", "tar",
         "--valid-fraction", "0", "--shard-size-mb", "0.1", "--out", str(out), "--quiet"]))
    return out / "train"


def _stream_matches_local(http_server, spec_http: str, spec_local: str, shard: str, tmp_path: Path,
                          workers: int) -> None:
    http_server.fail_once(shard, "503")  # hits indexing (HEAD/stat or sidecar of the shard)
    remote_index = open_index(spec_http, cache_dir=tmp_path / "cache-http")
    assert http_server.failures["/" + shard] == [], "the injected failure was never served"
    local = lw.take(lw.make_loader(spec_local, tmp_path / "cache-local", max_epochs=1, workers=workers), 10_000)
    http_server.fail_once(shard, "503")  # hits the loader's read of the shard
    remote = lw.take(lw.make_loader(None, None, index=remote_index, max_epochs=1, workers=workers), 10_000)
    assert http_server.failures["/" + shard] == []
    assert len(local) > 5
    _assert_same(remote, local)


@pytest.mark.timeout(90)
def test_parquet_over_http_with_transient_failure(http_server, tmp_path):
    folder = lw.write_parquet(http_server.root / "pq", 300, rows_per_group=40, shards=2, seed=4)
    names = sorted(p.name for p in folder.iterdir())
    spec = ",".join(http_server.url(f"pq/{n}") for n in names)
    _stream_matches_local(http_server, spec, str(folder), f"pq/{names[1]}", tmp_path, workers=0)
    assert http_server.count(f"pq/{names[1]}", "GET") > 0


@pytest.mark.timeout(90)
def test_tar_over_http_with_transient_failure(http_server, tmp_path):
    folder = _prep_tar(tmp_path, http_server.root / "tar")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "tar" and len(manifest["shards"]) >= 3
    shard = f"tar/train/{manifest['shards'][1]['path']}"
    # Through a DataLoader worker process too: fsspec's HTTP session must survive the fork.
    _stream_matches_local(http_server, http_server.url("tar/train/"), str(folder), shard, tmp_path, workers=1)


def test_moved_dataset_keeps_its_fingerprint_and_a_damaged_cache_is_rebuilt(tmp_path):
    """Resume checks the data by shard names and lengths, not full paths: moving the shards (or a
    new signed URL) still resumes. A truncated index cache entry is rebuilt, not fatal."""
    import shutil

    from distlstm.data.shards.index import open_index
    from distlstm.data.prep.synthetic import ensure_synthetic
    root = ensure_synthetic(tmp_path / "a", num_train=600, num_valid=50)
    moved = tmp_path / "b" / "train"
    shutil.copytree(root / "train", moved)
    cache = tmp_path / "cache"
    first = open_index(str(root / "train"), cache_dir=cache)
    for entry in (cache / "index").glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:20])
    again = open_index(str(root / "train"), cache_dir=cache)
    assert again.fingerprint() == first.fingerprint() == open_index(str(moved), cache_dir=cache).fingerprint()

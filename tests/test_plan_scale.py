"""The plan at scale (issue 17): built from per-chunk length histograms, never from a per-sample
array, and identical to the plan of every sample's length; a billion-sample (virtual) dataset plans
in seconds with memory that follows the chunks; the plan is the same in every process."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from distlstm.data.errors import BadSampleError
from distlstm.data.plan.chunks import ChunkLengths, VirtualLengths
from distlstm.data.plan.epoch import EpochPlan, PlanParams

ROOT = Path(__file__).resolve().parent.parent


def _dataset(seed: int = 0, chunks: int = 60):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 90, chunks)  # empty chunks included
    offsets = np.concatenate([[0], np.cumsum(rows)])
    lengths = np.minimum(rng.lognormal(3.0, 0.9, int(offsets[-1])).astype(np.int64), 700)
    lengths[rng.random(len(lengths)) < 0.01] = 0  # empty samples
    return offsets, lengths


def _in_blocks(offsets: np.ndarray, lengths: np.ndarray, per_part: int) -> ChunkLengths:
    """The dataset as several parts (like shards), each a block of its own."""
    parts = []
    for lo in range(0, len(offsets) - 1, per_part):
        hi = min(lo + per_part, len(offsets) - 1)
        sub = offsets[lo:hi + 1] - offsets[lo]
        parts.append(ChunkLengths.from_lengths(sub, lengths[offsets[lo]:offsets[hi]]))
    return ChunkLengths.concat(parts)


def _all(plan: EpochPlan) -> list:
    return [(plan.batch(g).tolist(), plan.is_filler(g), plan.batch_shape(g)) for g in range(plan.num_batches)]


@pytest.mark.parametrize("params", [
    PlanParams(max_tokens=2000, window_chunks=4),
    PlanParams(max_tokens=2000, window_chunks=4, streams=3, max_length=128),
    PlanParams(max_tokens=2000, window_chunks=4, streams=2, max_length=100, too_long="drop"),
    PlanParams(max_tokens=2000, window_chunks=4, max_length=100, too_long="chunk"),
    PlanParams(max_tokens=3000, window_chunks=4, streams=2, shape_buckets=5, min_batch_size=4, max_length=256),
    PlanParams(max_tokens=3000, window_chunks=2, shape_buckets=3, max_length=64, too_long="drop", shuffle=False),
], ids=["exact", "streams", "drop", "chunk", "bounded", "bounded-drop"])
def test_the_plan_from_chunk_histograms_is_the_plan_from_every_length(params):
    """Counting from histograms read block by block, and windows materialised from `lengths_of`,
    give exactly the batches, fillers and shapes of the plan over the per-sample array."""
    offsets, lengths = _dataset()
    reference = EpochPlan(offsets, lengths, params, seed=7, epoch=2)
    stats = _in_blocks(offsets, lengths, per_part=7)
    seen = []

    def lengths_of(chunks):
        seen.append(len(chunks))
        return np.concatenate([lengths[offsets[c]:offsets[c + 1]] for c in chunks.tolist()] or [np.zeros(0, int)])

    plan = EpochPlan.of(stats, params, seed=7, epoch=2).with_lengths(lengths_of)
    assert plan.num_batches == reference.num_batches and plan.num_real_batches == reference.num_real_batches
    assert _all(plan) == _all(reference)
    assert seen, "windows were materialised from lengths_of"


def test_a_plan_is_built_once_per_process_and_shared():
    offsets, lengths = _dataset(1)
    stats = ChunkLengths.from_lengths(offsets, lengths)
    params = PlanParams(max_tokens=2000)
    assert EpochPlan.of(stats, params, seed=1, epoch=0) is EpochPlan.of(stats, params, seed=1, epoch=0)
    assert EpochPlan.of(stats, params, seed=1, epoch=1) is not EpochPlan.of(stats, params, seed=1, epoch=0)


def test_a_billion_samples_plan_in_seconds_with_memory_of_the_chunks():
    """1e9 virtual samples (15,259 chunks of 65,536): the plan counts every window from the
    histograms with a few MB, and a resume near the end of the epoch materialises only the window
    it starts in (no walk over earlier windows)."""
    virtual = VirtualLengths(num_chunks=15_259, rows=65_536, low=4, high=64, seed=3)
    stats = virtual.chunk_lengths()
    assert stats.num_samples >= 10**9
    calls = []

    def lengths_of(chunks):
        calls.append(chunks.copy())
        return virtual.lengths_of(chunks)

    tracemalloc.start()
    try:
        plan = EpochPlan.of(stats, PlanParams(max_tokens=65_536, streams=16), seed=5, epoch=0)
        plan = plan.with_lengths(lengths_of)
        start = plan.num_batches * 3 // 4  # three quarters into the epoch
        ids, filler = plan.rank_batch(2, dp_rank=3, dp_world_size=8, start=start)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(calls) == 1, "only the resumed window is materialised"
    assert peak < 96 * 2**20, f"planning peaked at {peak / 2**20:.0f} MB"
    assert not filler and len(ids) and ids.min() >= 0 and ids.max() < stats.num_samples
    window = calls[0]
    assert np.isin(np.searchsorted(stats.chunk_offsets, ids, side="right") - 1, window).all()
    # Counting agrees with materialising: every window of one stream yields its counted batches.
    per_stream = plan.stream_lengths
    # Streams end within about a chunk of each other (a chunk here is ~35 batches).
    chunk_batches = -(-int(stats.tokens.max()) // 65_536)
    assert per_stream.sum() == plan.num_real_batches and int(per_stream.max() - per_stream.min()) <= 2 * chunk_batches


_DIGEST = """
import hashlib, json, sys
import numpy as np
from distlstm.data.plan.chunks import VirtualLengths
from distlstm.data.plan.epoch import EpochPlan, PlanParams
v = VirtualLengths(num_chunks=3000, rows=1000, low=1, high=300, seed=11)
out = {}
for world in (1, 2, 8):
    plan = EpochPlan.of(v.chunk_lengths(), PlanParams(max_tokens=8192, streams=8, shape_buckets=6), seed=9,
                        epoch=1).with_lengths(v.lengths_of)
    h = hashlib.sha256()
    for rank in range(world):
        for i in range(0, plan.batches_per_rank(world), 97):
            ids, filler = plan.rank_batch(i, dp_rank=rank, dp_world_size=world)
            h.update(np.int64(rank + world * i * world).tobytes() + ids.tobytes() + bytes([filler]))
    # The global batch list, whatever the world size: rank r's i-th batch is global r + i * world.
    out[world] = [h.hexdigest(), plan.num_batches, plan.batch(plan.num_batches // 2).tolist()[:5]]
print(json.dumps(out))
"""


def test_the_plan_is_identical_across_processes_and_world_sizes():
    runs = [json.loads(subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, check=True,
                                      env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": str(seed)}).stdout)
            for seed in (1, 2)]
    assert runs[0] == runs[1], "two processes planned differently"
    worlds = runs[0]
    assert len({tuple(map(str, v[1:])) for v in worlds.values()}) == 1, "the global batches depend on the world size"


def test_decoded_lengths_that_differ_from_the_index_are_an_error(tmp_path):
    """The loader's window lengths must be the ones the plan counted: a shard whose samples changed
    since indexing stops with the shard and the fix; unreadable samples take the lengths left over."""
    from tests import _loader_worker as lw
    from distlstm.data.shards.index import open_index
    index = open_index(str(lw.write_parquet(tmp_path / "pq", 200, rows_per_group=50, shards=2)),
                       cache_dir=tmp_path / "cache")
    true = index.read_chunk(1).lengths.astype(np.int64)
    none_bad = np.zeros(len(true), bool)
    assert np.array_equal(index.check_chunk_lengths(1, true, none_bad), true)
    changed = true.copy()
    changed[3] += 1
    with pytest.raises(BadSampleError, match="changed after it was indexed"):
        index.check_chunk_lengths(1, changed, none_bad)
    bad = none_bad.copy()
    bad[[0, 5]] = True
    unknown = true.copy()
    unknown[[0, 5]] = 0
    filled = index.check_chunk_lengths(1, unknown, bad)
    assert np.array_equal(np.sort(filled), np.sort(true)) and np.array_equal(filled[~bad], true[~bad])


def test_the_index_holds_nothing_per_sample(tmp_path, monkeypatch):
    """No array in the index grows with the samples; with the histograms left in the cache files
    (a large dataset), the plan and the batches are the same."""
    from tests import _loader_worker as lw
    from distlstm.data.shards import index as index_mod
    spec = str(lw.write_parquet(tmp_path / "pq", 3000, rows_per_group=100, shards=3))
    held = index_mod.open_index(spec, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(index_mod, "IN_MEMORY_ENTRIES", 0)
    lazy = index_mod.open_index(spec, cache_dir=tmp_path / "cache")

    per_sample = [k for k, v in vars(lazy).items() if isinstance(v, np.ndarray) and v.size > lazy.num_chunks + 1]
    assert not per_sample and lazy.num_samples == 3000
    assert all(part._source.block is None for part in lazy.chunk_lengths._source.parts), "histograms left in memory"
    params = PlanParams(max_tokens=1500, window_chunks=3, streams=2)
    a = EpochPlan.of(held.chunk_lengths, params, seed=1, epoch=0).with_lengths(
        lambda c: np.concatenate([held.read_chunk(int(k)).lengths for k in c]))
    b = EpochPlan.of(lazy.chunk_lengths, params, seed=1, epoch=0).with_lengths(
        lambda c: np.concatenate([lazy.read_chunk(int(k)).lengths for k in c]))
    assert _all(a) == _all(b)


def test_long_indexing_reports_progress_with_an_eta(tmp_path):
    from tests import _loader_worker as lw
    from distlstm.data.shards.index import open_index
    from distlstm.run.build import IndexProgress
    lines = []
    spec = str(lw.write_parquet(tmp_path / "pq", 400, rows_per_group=50, shards=4))
    open_index(spec, cache_dir=tmp_path / "cache", progress=IndexProgress("pq", lines.append, every_s=0.0))
    assert [line.split(":")[2].split(",")[0].strip() for line in lines] == ["1/4 shards", "2/4 shards", "3/4 shards"]
    assert all("ETA" in line for line in lines)

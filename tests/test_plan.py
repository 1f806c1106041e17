"""The data plan as a pure function of (lengths, seed, epoch, world size), at 1..64 simulated ranks.

A failure here means a multi-rank run trains on some samples twice or never in an epoch, ranks run
different numbers of steps (a DDP hang at the end of an epoch), batches blow the token budget (GPU
out of memory) or break the batch-size floor, every epoch sees the same order, two ranks compute
different plans from the same seed, or a restart on another world size repeats or skips batches.
With bounded shapes (data.shape_buckets), it also means a run would see more batch shapes than
stated (more CUDA graphs than budgeted), pad beyond the stated bound, or break the token budget.
"""

from __future__ import annotations

import numpy as np
import pytest

from distlstm.data.plan.epoch import EpochPlan, PlanParams, bucket_batch_sizes, bucket_edges, padding_fraction

WORLD_SIZES = (1, 2, 3, 8, 64)


def _dataset(n_samples: int = 6000, rows_per_chunk: int = 97, seed: int = 0, max_len: int = 1500):
    """Log-normal lengths (some above max_length) in ragged chunks, like real row groups."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(120), 0.9, n_samples)), 1, max_len).astype(np.int32)
    sizes = rng.integers(rows_per_chunk // 2, rows_per_chunk * 2, size=n_samples // rows_per_chunk + 2)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    offsets = offsets[offsets < n_samples]
    offsets = np.concatenate([offsets, [n_samples]]).astype(np.int64)
    return offsets, lengths


def _params(**kw) -> PlanParams:
    base = dict(max_tokens=4096, min_batch_size=8, max_length=1024, window_chunks=5)
    base.update(kw)
    return PlanParams(**base)


def _rank_lists(plan: EpochPlan, world: int, start: int = 0):
    return [list(plan.rank_batches(dp_rank=r, dp_world_size=world, start=start)) for r in range(world)]


def _real_ids(per_rank) -> np.ndarray:
    """Sample ids of every non-filler batch over all ranks, concatenated."""
    parts = [ids for batches in per_rank for ids, filler in batches if not filler]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("too_long", ["truncate", "drop"])
@pytest.mark.parametrize("streams,shape_buckets", [(1, 0), (4, 0), (1, 16), (4, 16)])
def test_every_sample_once_and_equal_steps(world, too_long, streams, shape_buckets):
    offsets, lengths = _dataset()
    params = _params(too_long=too_long, streams=streams, shape_buckets=shape_buckets)
    for epoch in (0, 1):
        plan = EpochPlan(offsets, lengths, params, seed=11, epoch=epoch)
        per_rank = _rank_lists(plan, world)
        counts = {len(b) for b in per_rank}
        assert counts == {-(-plan.num_batches // world)}, "ranks must run the same number of steps"
        ids = _real_ids(per_rank)
        expected = np.arange(len(lengths)) if too_long == "truncate" else np.flatnonzero(lengths <= 1024)
        assert len(ids) == len(expected), "a sample repeated or missing"
        np.testing.assert_array_equal(np.sort(ids), expected)
        # Pad rule: fillers (weight 0 in the loader) where a stream ran out before the longest one,
        # and in the last round where fewer than `world` batches remained.
        fillers = [(r, i) for r, b in enumerate(per_rank) for i, (_, f) in enumerate(b) if f]
        assert len(fillers) == plan.num_batches - plan.num_real_batches + (-plan.num_batches) % world
        if streams == 1:  # one stream: only the last round, copies of the epoch's last batch
            last = plan.batch(plan.num_batches - 1)
            for r, i in fillers:
                assert i == len(per_rank[r]) - 1
                np.testing.assert_array_equal(per_rank[r][i][0], last)


def test_drop_rule_drops_exactly_the_long_samples():
    offsets, lengths = _dataset()
    long_ids = np.flatnonzero(lengths > 1024)
    assert len(long_ids) > 0, "the fixture must contain samples over max_length"
    plan = EpochPlan(offsets, lengths, _params(too_long="drop"), seed=3, epoch=0)
    seen = np.concatenate([plan.batch(g) for g in range(plan.num_batches)])
    assert not np.isin(long_ids, seen).any()
    assert len(seen) == len(lengths) - len(long_ids)


@pytest.mark.parametrize("max_tokens,min_bs,max_bs", [(4096, 8, 0), (2048, 1, 0), (8192, 16, 64), (512, 4, 0)])
def test_token_budget_and_batch_size_floor(max_tokens, min_bs, max_bs):
    offsets, lengths = _dataset(seed=5)
    params = _params(max_tokens=max_tokens, min_batch_size=min_bs, max_batch_size=max_bs)
    plan = EpochPlan(offsets, lengths, params, seed=2, epoch=0)
    edges = bucket_edges(params.max_length)
    sizes = bucket_batch_sizes(edges, params)
    floor_batches = 0
    for g in range(plan.num_batches):
        ids = plan.batch(g)
        lens = np.minimum(lengths[ids], params.max_length)
        b, longest = len(ids), int(lens.max())
        assert b >= 1
        if max_bs:
            assert b <= max_bs
        # One length bucket per batch, and at most that bucket's batch size.
        buckets = np.unique(np.searchsorted(edges, lens))
        assert len(buckets) == 1
        assert b <= sizes[buckets[0]]
        if b * longest > max_tokens:
            # Only the floor may break the budget, and then with exactly min_batch_size samples or
            # fewer (the last batch of a bucket), never more.
            assert b <= min_bs, f"batch {g}: {b} x {longest} > {max_tokens} above the floor {min_bs}"
            assert max_tokens // edges[buckets[0]] < min_bs
            floor_batches += 1
    if min_bs > 1 and max_tokens // 1024 < min_bs:
        assert floor_batches > 0, "the fixture should exercise the batch-size floor"


@pytest.mark.parametrize("shape_buckets", [0, 16])
def test_epochs_differ_and_same_seed_reproduces(shape_buckets):
    offsets, lengths = _dataset(n_samples=20_000)
    params = _params(shape_buckets=shape_buckets, max_tokens=1024)

    def flat(seed, epoch):
        plan = EpochPlan(offsets, lengths, params, seed=seed, epoch=epoch)
        return [plan.batch(g).tolist() for g in range(plan.num_batches)]

    e0 = flat(7, 0)
    assert flat(7, 0) == e0, "same (seed, epoch) must give the same plan on every rank"
    e1 = flat(7, 1)
    assert e1 != e0
    assert [x for b in e0 for x in b] != [x for b in e1 for x in b]
    assert flat(8, 0) != e0
    # The chunk order itself changes between epochs, not only the order inside windows: the chunks
    # feeding each epoch's first batch differ.
    chunks_of_first = {tuple(np.unique(np.searchsorted(offsets, flat(7, e)[0], side="right")).tolist())
                       for e in range(6)}
    assert len(chunks_of_first) > 1


@pytest.mark.parametrize("shape_buckets", [0, 16])
def test_plan_independent_of_world_size(shape_buckets):
    offsets, lengths = _dataset()
    plan = EpochPlan(offsets, lengths, _params(shape_buckets=shape_buckets), seed=1, epoch=0)
    global_order = [plan.batch(g).tolist() for g in range(plan.num_batches)]
    for world in WORLD_SIZES:
        per_rank = _rank_lists(plan, world)
        # Interleave the ranks' lists back: rank r's i-th batch is global batch i*world + r.
        for r, batches in enumerate(per_rank):
            for i, (ids, filler) in enumerate(batches):
                if not filler:
                    assert ids.tolist() == global_order[i * world + r]


@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("old_world,new_world", [(1, 3), (2, 1), (3, 8), (8, 2), (64, 3), (2, 64)])
@pytest.mark.parametrize("shape_buckets", [0, 16])
def test_resume_at_any_start_on_another_world_size(old_world, new_world, shape_buckets, streams):
    offsets, lengths = _dataset(n_samples=3000)
    params = _params(shape_buckets=shape_buckets, max_tokens=512, streams=streams)
    plan = EpochPlan(offsets, lengths, params, seed=9, epoch=4)
    G = plan.num_batches
    rounds = -(-G // old_world)
    for steps in sorted({0, 1, rounds // 3, rounds // 2, rounds - 1, rounds}):
        start = min(steps * old_world, G) if steps < rounds else G
        before = [plan.rank_batch(i, dp_rank=r, dp_world_size=old_world)
                  for r in range(old_world) for i in range(steps)]
        consumed = [ids for ids, filler in before if not filler]
        fresh = EpochPlan(offsets, lengths, params, seed=9, epoch=4)  # a restarted process rebuilds it
        after = _rank_lists(fresh, new_world, start=start)
        assert {len(b) for b in after} == {fresh.batches_per_rank(new_world, start)}
        # Exactly the remaining global batches, each once, in order per rank.
        remaining = sorted(tuple(ids.tolist()) for b in after for ids, f in b if not f)
        assert remaining == sorted(tuple(plan.batch(g).tolist()) for g in range(start, G) if not plan.is_filler(g))
        seen = np.concatenate(consumed + [ids for b in after for ids, f in b if not f])
        np.testing.assert_array_equal(np.sort(seen), np.arange(len(lengths)))


def test_arbitrary_start_not_multiple_of_world():
    offsets, lengths = _dataset(n_samples=2000)
    plan = EpochPlan(offsets, lengths, _params(), seed=4, epoch=0)
    G = plan.num_batches
    for start in range(0, G + 1, max(1, G // 13)):
        for world in WORLD_SIZES:
            got = sorted(tuple(ids.tolist()) for b in _rank_lists(plan, world, start) for ids, f in b if not f)
            assert got == sorted(tuple(plan.batch(g).tolist()) for g in range(start, G))


def test_padding_is_small_with_bucketing():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.exp(rng.normal(np.log(200), 0.8, 40_000)), 8, 1024).astype(np.int32)
    offsets = np.arange(0, 40_001, 1000, dtype=np.int64)
    plan = EpochPlan(offsets, lengths, PlanParams(max_tokens=8192, min_batch_size=8), seed=0, epoch=0)
    batches = [plan.batch(g) for g in range(plan.num_batches)]
    assert padding_fraction(lengths, batches, 1024) <= 0.03


def test_empty_and_tiny_inputs():
    offsets = np.array([0, 0, 3], np.int64)  # an empty chunk, then 3 samples
    lengths = np.array([5, 2000, 7], np.int32)
    plan = EpochPlan(offsets, lengths, _params(too_long="drop"), seed=0, epoch=0)
    got = sorted(int(x) for g in range(plan.num_batches) for x in plan.batch(g))
    assert got == [0, 2]
    per_rank = _rank_lists(plan, 64)
    assert {len(b) for b in per_rank} == {1}
    nothing = EpochPlan(np.array([0, 1], np.int64), np.array([5000], np.int32), _params(too_long="drop"),
                        seed=0, epoch=0)
    assert nothing.num_batches == 0 and _rank_lists(nothing, 3) == [[], [], []]


def test_invalid_params_named():
    with pytest.raises(ValueError, match="too_long"):
        PlanParams(max_tokens=10, too_long="cut")
    with pytest.raises(ValueError, match="positive"):
        PlanParams(max_tokens=0)


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 4), (2, 2), (3, 2), (8, 4), (64, 1)])
def test_streams_give_each_chunk_to_one_worker_of_one_rank(world, workers):
    """streams = ranks x workers (data.streams=auto): every chunk is read and decoded by exactly one
    worker of one rank per epoch, fillers included, also after a resume mid-epoch on the same world.
    Worker w of a rank produces its local batches i with i % workers == w (the loader's rule)."""
    offsets, lengths = _dataset(n_samples=40_000, rows_per_chunk=50)
    n_chunks = len(offsets) - 1
    plan = EpochPlan(offsets, lengths, _params(streams=world * workers, window_chunks=4), seed=3, epoch=0)
    for start in (0, world * (plan.batches_per_rank(world) // 3) + 1):
        owner: dict[int, tuple[int, int]] = {}
        for r in range(world):
            for i in range(plan.batches_per_rank(world, start)):
                for c in plan.window_chunks(start + r + i * world).tolist():
                    got = owner.setdefault(c, (r, i % workers))
                    assert got == (r, i % workers), f"chunk {c} read by rank/worker {got} and {(r, i % workers)}"
        if start == 0:
            assert len(owner) == n_chunks
    # One stream: every rank reads (nearly) every chunk, the read amplification streams remove.
    default = EpochPlan(offsets, lengths, _params(window_chunks=4), seed=3, epoch=0)
    assert len({c for i in range(default.batches_per_rank(world))
                for c in default.window_chunks(i * world).tolist()}) > 0.9 * n_chunks


@pytest.mark.parametrize("streams", [2, 8, 32])
def test_streams_are_balanced_so_fillers_are_few(streams):
    """Chunks are dealt by token count, so streams end close to each other: with ~25+ chunks per
    stream, fillers stay a few percent of the epoch's batches."""
    offsets, lengths = _dataset(n_samples=80_000, rows_per_chunk=100)
    plan = EpochPlan(offsets, lengths, _params(streams=streams, window_chunks=8), seed=5, epoch=1)
    fillers = plan.num_batches - plan.num_real_batches
    assert fillers / plan.num_batches < 0.06, (plan.stream_lengths, plan.num_real_batches)


def test_more_streams_than_chunks_still_covers_the_epoch_once():
    offsets, lengths = _dataset(n_samples=600, rows_per_chunk=100)
    plan = EpochPlan(offsets, lengths, _params(streams=64), seed=0, epoch=0)
    per_rank = _rank_lists(plan, 16)
    assert len({len(b) for b in per_rank}) == 1
    np.testing.assert_array_equal(np.sort(_real_ids(per_rank)), np.arange(600))


# ---------------------------------------------------------------- bounded shapes (data.shape_buckets)

def _lognormal(n: int, rows_per_chunk: int, seed: int = 0):
    """The GPU benchmark's distribution: log-normal lengths, median 200, sigma 0.8, clipped 8..1024."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(200), 0.8, n)), 8, 1024).astype(np.int32)
    return np.r_[np.arange(0, n, rows_per_chunk), n].astype(np.int64), lengths


@pytest.mark.parametrize("max_tokens", [8192, 65536])
def test_bounded_shapes_within_the_stated_bound_and_padding(max_tokens):
    """The documented default (docs/design.md, "Bounded shapes"): data.shape_buckets = 64 gives at
    most 64 distinct shapes, padding <= 4% on the benchmark distribution at a 64k budget, and every
    batch keeps the token budget (above the batch-size floor)."""
    offsets, lengths = _lognormal(80_000, 1024)
    params = PlanParams(max_tokens=max_tokens, min_batch_size=8, shape_buckets=64)
    for epoch in (0, 1):
        plan = EpochPlan(offsets, lengths, params, seed=3, epoch=epoch)
        assert len(plan.shapes) <= 64
        batches = [plan.batch(g) for g in range(plan.num_batches)]
        shapes = [plan.batch_shape(g) for g in range(plan.num_batches)]
        assert set(shapes) <= set(plan.shapes)
        for ids, (rows, length) in zip(batches, shapes):
            assert 1 <= len(ids) <= rows and int(lengths[ids].max()) <= length
            assert rows * length <= max_tokens or rows == params.min_batch_size
        assert padding_fraction(lengths, batches, 1024, shapes) <= 0.04
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(lengths)))


def test_bounded_only_the_last_batch_of_a_window_is_partial():
    """Partial batches are what the loader fills with dummy rows: one per window at most."""
    offsets, lengths = _dataset(n_samples=20_000, rows_per_chunk=200)
    plan = EpochPlan(offsets, lengths, _params(shape_buckets=24, max_tokens=512), seed=5, epoch=0)
    assert plan.num_windows > 1
    partial_per_window = {}
    for g in range(plan.num_batches):
        rows, _ = plan.batch_shape(g)
        w = plan._locate(g)[0]
        partial_per_window[w] = partial_per_window.get(w, 0) + (len(plan.batch(g)) < rows)
    assert max(partial_per_window.values()) <= 1
    assert sum(partial_per_window.values()) >= 1, "the fixture should produce a partial batch"


def test_bounded_shapes_depend_on_the_data_not_the_seed_or_epoch():
    """The shape set is a pure function of the dataset's lengths and the parameters: the same on
    every rank and epoch (a CUDA graph captured in epoch 0 is replayed in epoch 5); exact lengths
    are used when the data has fewer distinct lengths than shape_buckets."""
    offsets, lengths = _dataset()
    params = _params(shape_buckets=20)
    shapes = {tuple(EpochPlan(offsets, lengths, params, seed=s, epoch=e).shapes) for s in (1, 2) for e in (0, 3)}
    assert len(shapes) == 1
    (only,) = shapes
    assert only[-1][1] == 1024, "the last length class ends at the longest (clipped) length"
    few = np.array([16, 32, 32, 64, 16, 64] * 50, np.int32)
    plan = EpochPlan(np.array([0, 150, 300], np.int64), few, _params(shape_buckets=20), seed=0, epoch=0)
    assert [t for _, t in plan.shapes] == [16, 32, 64]


def test_exact_shapes_keep_their_fingerprint():
    """Adding shape_buckets must not change the fingerprint of exact-shape plans, or every
    checkpoint saved before it would refuse to resume ("plan changed")."""
    import hashlib
    import json
    from dataclasses import asdict
    exact = _params()
    old_style = asdict(exact)
    del old_style["shape_buckets"]
    assert exact.fingerprint() == hashlib.sha256(json.dumps(old_style, sort_keys=True).encode()).hexdigest()[:16]
    assert _params(shape_buckets=64).fingerprint() != exact.fingerprint()
    with pytest.raises(ValueError, match="shape_buckets"):
        _params(shape_buckets=-1)

"""`data.state_reset`: random resets of the carried LSTM state in lm stream mode (issue 21).

A failure here means the extra resets depend on something besides (data seed, epoch, chunk, global
row) — so a resumed run, another split of the rows over ranks, or a DataLoader worker would reset
other rows than the uninterrupted single-rank run —, land elsewhere than before a chunk's first
column, change the resets when the option is 0, reach the validation loader, or that a bad value is
accepted instead of refused naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from distlstm.config import ConfigError, DataConfig
from distlstm.data.loader.stream_loader import StreamLoader, build_stream_loader
from distlstm.data.plan.stream import StreamLayout, StreamParams, state_resets
from distlstm.data.shards.index import open_index
from tests._stream_data import doc_starts, documents, write_stream_parquet


@pytest.fixture
def index(tmp_path):
    docs = documents(30, seed=4, min_len=20, max_len=90)  # token = stream position
    write_stream_parquet(tmp_path / "data" / "s.parquet", docs, piece=16, rows_per_group=5)
    return open_index(str(tmp_path / "data" / "s.parquet"), cache_dir=tmp_path / "cache"), docs


def _loader(index, *, world=1, rank=0, batch_size=6, p=0.0, jitter=False, epochs=2) -> StreamLoader:
    return StreamLoader(index, StreamParams(batch_size=batch_size, bptt=5, jitter=jitter, state_reset=p), seed=7,
                        dp_rank=rank, dp_world_size=world, max_epochs=epochs, log=lambda msg: None)


def _resets(loader) -> list[np.ndarray]:
    return [b.reset.numpy().copy() for b in loader]


def test_draw_is_keyed_by_the_chunk_and_the_global_row():
    params = StreamParams(batch_size=4, bptt=5, state_reset=0.3)
    key = dict(seed=3, epoch=1, relayouts=0, offset=40, rows=64)
    every = state_resets(params, **key, mine=np.arange(64))
    np.testing.assert_array_equal(every, state_resets(params, **key, mine=np.arange(64)))
    # Any subset of rows (a rank's, in any order) gets exactly those rows' draws.
    for mine in (np.arange(16, 32), np.array([63, 0, 5])):
        np.testing.assert_array_equal(state_resets(params, **key, mine=mine), every[mine])
    for other in (dict(seed=4), dict(epoch=2), dict(offset=45), dict(relayouts=1)):
        assert not np.array_equal(state_resets(params, **{**key, **other}, mine=np.arange(64)), every), other
    # The rate is the probability (20,000 draws: 0.3 +- 0.015 at > 4 sigma).
    many = np.concatenate([state_resets(params, **{**key, "offset": o}, mine=np.arange(64)) for o in range(0, 1560, 5)])
    assert abs(many.mean() - 0.3) < 0.015
    assert not state_resets(StreamParams(batch_size=4, bptt=5), **key, mine=np.arange(64)).any()


def test_zero_gives_exactly_the_document_and_seam_resets(index):
    """state_reset=0 (the value StreamParams defaults to) resets where the loader did before the
    option: documents and seams, nothing else, and the plan fingerprint is the old one."""
    index, docs = index
    off = _loader(index, p=0.0)
    assert off.params == StreamParams(batch_size=6, bptt=5)
    old = hashlib.sha256(json.dumps({"batch_size": 6, "bptt": 5, "jitter": False}, sort_keys=True).encode())
    assert off.params.fingerprint() == old.hexdigest()[:16]
    starts = doc_starts(docs)
    for batch in off:
        layout = StreamLayout.initial(index.num_tokens, 6)
        pos, valid, seam = layout.positions(np.arange(6), batch.consumed - batch.inputs.shape[1], batch.inputs.shape[1])
        np.testing.assert_array_equal(batch.reset.numpy(), (seam | np.isin(pos - 1, starts)) & valid)


@pytest.mark.parametrize("jitter", [False, True])
def test_extra_resets_are_at_column_zero_on_top_of_the_document_ones(index, jitter):
    index, docs = index
    base, extra = _resets(_loader(index, jitter=jitter)), _resets(_loader(index, p=0.3, jitter=jitter))
    assert len(base) == len(extra)
    added = 0
    for a, b in zip(base, extra):
        assert (b >= a).all(), "every document / seam reset stays"
        assert not (b & ~a)[:, 1:].any(), "extra resets are only before a chunk's first column"
        added += int((b & ~a).sum())
    assert added > 0.1 * sum(len(a) for a in base), "rows were reset at about 0.3 of the chunks"


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_the_single_rank_resets(index, world):
    """6 rows on 1 rank == the same 6 rows split over 2 or 3 ranks, batch by batch."""
    index, _ = index
    one = _resets(_loader(index, p=0.3, jitter=True))
    split = [_resets(_loader(index, world=world, rank=r, batch_size=6 // world, p=0.3, jitter=True))
             for r in range(world)]
    assert all(len(s) == len(one) for s in split)
    for k, whole in enumerate(one):
        np.testing.assert_array_equal(np.concatenate([s[k] for s in split]), whole)


def test_resume_mid_epoch_and_workers_see_the_same_resets(index):
    index, _ = index
    full = _resets(_loader(index, world=2, rank=1, batch_size=3, p=0.3))
    first = _loader(index, world=2, rank=1, batch_size=3, p=0.3)
    it = iter(first)
    for _ in range(7):
        next(it)
    again = _loader(index, world=2, rank=1, batch_size=3, p=0.3)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = _resets(again)
    assert len(rest) == len(full) - 7
    for a, b in zip(rest, full[7:]):
        np.testing.assert_array_equal(a, b)
    workers = StreamLoader(index, StreamParams(batch_size=3, bptt=5, state_reset=0.3), seed=7, dp_rank=1,
                           dp_world_size=2, max_epochs=2, num_workers=1, log=lambda msg: None)
    for a, b in zip(_resets(workers), full):
        np.testing.assert_array_equal(a, b)


def test_the_key_is_validated_and_reaches_training_only(index):
    index, _ = index
    assert DataConfig().state_reset == 0.05
    for bad in (1.0, -0.1, 2, math.nan):
        with pytest.raises(ConfigError, match=r"data\.state_reset"):
            DataConfig(state_reset=bad)
    cfg = DataConfig(batch_size=3, bptt=5, num_workers=0, state_reset=0.2)
    kw = dict(dp_rank=0, dp_world_size=1, vocab_size=0, pin_memory=False, log=lambda msg: None)
    assert build_stream_loader(index, cfg, **kw).params.state_reset == 0.2
    assert build_stream_loader(index, cfg, split="valid", **kw).params.state_reset == 0.0

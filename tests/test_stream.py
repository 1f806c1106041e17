"""lm stream mode's data side: the stream layout as a pure function at 1..64 simulated ranks, and the
stream loader over real Parquet and tar shards.

A failure here means a stream-mode epoch trains some tokens twice or never, ranks run different
numbers of steps (a DDP hang), a target is predicted from the wrong input, a document's first token
is predicted from another document or a document starts from another one's LSTM state (no reset),
a resumed run does not continue with exactly the next chunk, or a resume on another number of ranks
repeats or skips tokens of the epoch in progress.
"""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from distlstm.data.shards.index import open_index
from distlstm.data.plan.stream import StreamLayout, StreamParams, chunk_length, merge_segments
from distlstm.data.loader.stream_loader import StreamLoader
from distlstm.tasks import IGNORE_INDEX
from tests._stream_data import doc_starts, documents, trained_positions, write_stream_parquet

WORLD_SIZES = (1, 2, 3, 8, 64)


def _walk(layout: StreamLayout, params: StreamParams, world: int, offset: int = 0, *, seed: int = 0,
          epoch: int = 0, relayouts: int = 0, steps: int | None = None):
    """{rank: [(positions, valid, seam) per step]} from `offset` on (all steps, or `steps`)."""
    chunks = layout.chunk_offsets(params, seed=seed, epoch=epoch, relayouts=relayouts, offset=offset)[:steps]
    out = {}
    for r in range(world):
        rows = np.arange(r * params.batch_size, (r + 1) * params.batch_size)
        out[r] = [layout.positions(rows, o, n) for o, n in chunks]
    return out


def _targets(walked) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.int64)] + [p[v] for steps in walked.values() for p, v, _ in steps])


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("jitter", [False, True])
def test_layout_trains_every_target_once_with_equal_steps(world, jitter):
    params = StreamParams(batch_size=3, bptt=7, jitter=jitter)
    num_tokens = 20_000 + world  # not a multiple of anything
    layout = StreamLayout.initial(num_tokens, params.batch_size * world)
    walked = _walk(layout, params, world)
    assert len({len(steps) for steps in walked.values()}) == 1, "ranks must run the same number of steps"
    np.testing.assert_array_equal(np.sort(_targets(walked)), np.arange(1, num_tokens))
    assert layout.row_len.max() - layout.row_len.min() <= 1
    # Along a row the positions are consecutive: the carried state sees the stream in order.
    rows = np.concatenate([np.concatenate([p for p, _, _ in steps], axis=1) for steps in walked.values()])
    valid = np.concatenate([np.concatenate([v for _, v, _ in steps], axis=1) for steps in walked.values()])
    for row, ok in zip(rows, valid):
        assert (np.diff(row[ok]) == 1).all()


def test_chunk_lengths_are_deterministic_and_bounded():
    params = StreamParams(batch_size=1, bptt=35, jitter=True)
    lengths = [chunk_length(params, seed=3, epoch=1, relayouts=0, offset=o) for o in range(0, 3500, 35)]
    again = [chunk_length(params, seed=3, epoch=1, relayouts=0, offset=o) for o in range(0, 3500, 35)]
    other = [chunk_length(params, seed=3, epoch=2, relayouts=0, offset=o) for o in range(0, 3500, 35)]
    assert lengths == again and lengths != other
    assert min(lengths) >= 5 and max(lengths) <= 55 and len(set(lengths)) > 5
    assert chunk_length(StreamParams(batch_size=1, bptt=35), seed=3, epoch=1, relayouts=0, offset=70) == 35


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 3), (8, 64), (64, 3), (3, 3)])
def test_relayout_continues_with_no_target_repeated_or_skipped(old_world, new_world):
    """Run k steps on one world size, re-lay the rest out over another, then again on a third: the
    targets trained before and after are the stream's, each exactly once; seams reset the state."""
    params = StreamParams(batch_size=2, bptt=5)
    num_tokens = 30001
    first = StreamLayout.initial(num_tokens, params.batch_size * old_world)
    before = _walk(first, params, old_world, steps=9)
    offset = sum(n for _, n in first.chunk_offsets(params, seed=0, epoch=0, relayouts=0)[:9])
    second = StreamLayout(first.remaining(offset), params.batch_size * new_world)
    middle = _walk(second, params, new_world, steps=2)
    third = StreamLayout(second.remaining(10), params.batch_size * 2)
    after = _walk(third, params, 2)
    got = np.concatenate([_targets(before), _targets(middle), _targets(after)])
    np.testing.assert_array_equal(np.sort(got), np.arange(1, num_tokens))
    # Wherever a row's positions jump, the layout marks a seam (the carried state must be zeroed).
    for walked in (middle, after):
        for steps in walked.values():
            assert steps, "the test wants steps in every layout"
            p = np.concatenate([s[0] for s in steps], axis=1)
            v = np.concatenate([s[1] for s in steps], axis=1)
            seam = np.concatenate([s[2] for s in steps], axis=1)
            jumps = np.zeros_like(v)
            jumps[:, 1:] = (p[:, 1:] != p[:, :-1] + 1) & v[:, 1:]
            assert not (jumps & ~seam).any()


def test_merge_segments_joins_continuations_and_drops_empties():
    got = merge_segments(np.array([[1, 5], [5, 9], [9, 9], [12, 14], [14, 20], [30, 31]]))
    np.testing.assert_array_equal(got, [[1, 9], [12, 20], [30, 31]])


# ------------------------------------------------------------------------------------------ the loader


def _loader(index, world: int, rank: int, *, batch_size: int = 3, bptt: int = 5, **kw) -> StreamLoader:
    return StreamLoader(index, StreamParams(batch_size=batch_size, bptt=bptt), seed=0, dp_rank=rank,
                        dp_world_size=world, max_epochs=1, log=kw.pop("log", lambda msg: None), **kw)


def _check_batch(batch, starts: set) -> np.ndarray:
    """The batch's trained targets, after checking inputs, ignored document starts and resets
    (tokens are stream positions: see tests/_stream_data.py)."""
    x, y, reset = batch.inputs.numpy(), batch.targets.numpy(), batch.reset.numpy()
    valid = np.arange(x.shape[1])[None, :] < batch.lengths.numpy()[:, None]
    real = y != IGNORE_INDEX
    assert (x[real] == y[real] - 1).all(), "a target's input must be the token just before it"
    first_token = np.isin(x, list(starts)) & valid
    assert reset[first_token].all(), "the state must be zeroed before a document's first token"
    predicts_first = np.isin(x + 1, list(starts)) & valid
    assert not real[predicts_first].any(), "a document's first token must not be predicted from another"
    assert real[valid & ~predicts_first].all(), "every other position is trained"
    # Any other reset is where the row's stream jumps (a row or segment start).
    jump = np.ones_like(valid)
    jump[:, 1:] = x[:, 1:] != x[:, :-1] + 1
    assert not (reset & ~first_token & ~jump).any() and not (reset & ~valid).any()
    return y[real]


@pytest.fixture
def stream_index(tmp_path):
    docs = documents(40, seed=1, max_len=50)
    write_stream_parquet(tmp_path / "data" / "s.parquet", docs, piece=16, rows_per_group=5)
    return open_index(str(tmp_path / "data" / "s.parquet"), cache_dir=tmp_path / "cache"), docs


@pytest.mark.parametrize("world", [1, 2, 5])
def test_loader_trains_each_position_once_and_never_across_documents(stream_index, world):
    index, docs = stream_index
    starts = set(doc_starts(docs).tolist())
    got, steps = [], set()
    for rank in range(world):
        batches = list(_loader(index, world, rank))
        steps.add(len(batches))
        got += [_check_batch(b, starts) for b in batches]
    assert len(steps) == 1
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), trained_positions(docs))


def test_data_without_flags_is_one_document_per_row(tmp_path):
    docs = documents(12, seed=2, min_len=3, max_len=20)
    write_stream_parquet(tmp_path / "d" / "x.parquet", docs, piece=1000, with_flags=False)
    index = open_index(str(tmp_path / "d" / "x.parquet"), cache_dir=tmp_path / "cache")
    got = np.concatenate([_check_batch(b, set(doc_starts(docs).tolist())) for b in _loader(index, 1, 0)])
    np.testing.assert_array_equal(np.sort(got), trained_positions(docs))


def test_loader_resumes_on_the_next_chunk_exactly(stream_index):
    index, _ = stream_index
    full = [b.targets.numpy() for b in _loader(index, 2, 1)]
    first = _loader(index, 2, 1)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    again = _loader(index, 2, 1)
    again.load_state_dict(state)
    rest = [b.targets.numpy() for b in again]
    assert len(rest) == len(full) - 4
    for a, b in zip(rest, full[4:]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("old_world, new_world, new_batch", [(2, 1, 3), (2, 5, 3), (3, 2, 3), (2, 3, 2)])
def test_elastic_resume_skips_and_repeats_no_token(stream_index, old_world, new_world, new_batch):
    """3 rows per rank on `old_world` ranks for 3 steps, then `new_batch` rows per rank on `new_world`
    ranks to the end of the epoch (2 x 3 -> 3 x 2: the same 6 rows, so no re-layout)."""
    index, docs = stream_index
    starts = set(doc_starts(docs).tolist())
    got, messages = [], []
    old = [_loader(index, old_world, r) for r in range(old_world)]
    for ld in old:
        it = iter(ld)
        got += [_check_batch(next(it), starts) for _ in range(3)]
    state = json.loads(json.dumps(old[0].state_dict()))
    for r in range(new_world):
        ld = _loader(index, new_world, r, batch_size=new_batch, log=messages.append)
        ld.load_state_dict(state)
        got += [_check_batch(b, starts) for b in ld]
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), trained_positions(docs))
    again = "continues at the same position" if old_world * 3 == new_world * new_batch else "laid out again"
    assert again in messages[0] and "starts from zero" in messages[0]


def test_workers_yield_the_same_batches_in_order(stream_index):
    """A worker process gives the batches the loading process gives; more than one is not used (each
    would read every chunk of the rank's rows again)."""
    index, _ = stream_index
    plain = list(_loader(index, 2, 0))
    loader = _loader(index, 2, 0, num_workers=2)
    assert loader.num_workers == 1
    workers = list(loader)
    assert len(plain) == len(workers)
    for a, b in zip(plain, workers):
        for field in ("inputs", "targets", "lengths", "reset"):
            np.testing.assert_array_equal(getattr(a, field).numpy(), getattr(b, field).numpy())


def test_tar_shards_read_document_starts_from_the_sidecar(tmp_path):
    from distlstm.data.prep.prep import build_parser, run
    docs = ["one two three four five six seven\n" * 3, "eight nine ten\n", "eleven twelve\n" * 4]
    (tmp_path / "t.txt").write_text("\n".join(docs))
    for fmt in ("tar", "parquet"):
        run(build_parser().parse_args(["--text", str(tmp_path / "t.txt"), "--doc-per", "blank-line",
                                       "--seq-len", "8", "--valid-fraction", "0", "--format", fmt, "--quiet",
                                       "--out", str(tmp_path / fmt)]))
    got = {}
    for fmt in ("tar", "parquet"):
        index = open_index(str(tmp_path / fmt / "train"), cache_dir=tmp_path / "cache")
        got[fmt] = [(b.inputs.numpy(), b.targets.numpy(), b.reset.numpy()) for b in _loader(index, 1, 0, batch_size=2)]
        # Three documents: two resets inside rows besides the rows' starts.
        assert sum(int(r[:, 1:].sum()) for _, _, r in got[fmt]) == 2
    for a, b in zip(got["tar"], got["parquet"]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    side = next((tmp_path / "tar" / "train").glob("*.idx.json"))
    assert sum(json.loads(side.read_text())["doc_start"]) == 3
    with tarfile.open(next((tmp_path / "tar" / "train").glob("*.tar"))) as tf:
        assert len([m for m in tf.getmembers()]) == len(json.loads(side.read_text())["keys"])



def test_a_sidecar_that_cannot_be_read_stops_instead_of_dropping_the_document_starts(tmp_path):
    """Only a shard without a sidecar (or a sidecar without flags) reads as one document per row; a
    sidecar that fails to download or parse is an error, not silently different state resets."""
    from distlstm.data.errors import BadSampleError
    from distlstm.data.loader.stream_loader import TokenStore
    from distlstm.data.prep.prep import build_parser, run
    from tests._http_server import HttpServer
    (tmp_path / "t.txt").write_text("one two three four five six\n\nseven eight nine ten\n")
    run(build_parser().parse_args(["--text", str(tmp_path / "t.txt"), "--doc-per", "blank-line", "--tokenizer",
                                   "whitespace", "--seq-len", "3", "--valid-fraction", "0", "--format", "tar",
                                   "--quiet", "--out", str(tmp_path / "d")]))
    server = HttpServer.start(tmp_path)
    try:
        index = open_index(server.url("d/train/train-00000.tar"), cache_dir=tmp_path / "cache")
        index.retries = 0
        assert TokenStore(index)._decode(0)[2].tolist() == [True, False, False, True, False]
        server.fail_once("d/train/train-00000.tar.idx.json", "503", times=5)
        with pytest.raises(BadSampleError, match="idx.json"):
            TokenStore(index)._decode(0)
    finally:
        server.stop()
    side = tmp_path / "d" / "train" / "train-00000.tar.idx.json"
    side.write_text(side.read_text()[:-5])
    index = open_index(str(tmp_path / "d" / "train"), cache_dir=tmp_path / "cache2", verify="none")
    with pytest.raises(BadSampleError, match="idx.json"):
        TokenStore(index)._decode(0)

def test_windows_layout_data_reads_each_row_as_a_document_and_says_so(tmp_path, capsys):
    from distlstm.data.prep.prep import build_parser, run
    from distlstm.data.loader.stream_loader import build_stream_loader
    from distlstm.config import DataConfig
    (tmp_path / "t.txt").write_text("abcdefgh" * 100)
    run(build_parser().parse_args(["--text", str(tmp_path / "t.txt"), "--lm-layout", "windows", "--seq-len", "8",
                                   "--valid-fraction", "0", "--quiet", "--out", str(tmp_path / "w")]))
    index = open_index(str(tmp_path / "w" / "train"), cache_dir=tmp_path / "cache")
    said = []
    loader = build_stream_loader(index, DataConfig(batch_size=3, bptt=4), dp_rank=0, dp_world_size=1, vocab_size=0,
                                 pin_memory=False, log=said.append, max_epochs=1)
    assert "independent windows" in said[0] and "--lm-layout stream" in said[0]
    # Each window's first token is a document start, so the token the windows share is a target once.
    targets = sum(int((b.targets != IGNORE_INDEX).sum()) for b in loader)
    assert targets == 800 - 1
    # Counting an epoch's steps (the lr schedule of a train.max_epochs run) says nothing: the note
    # comes once, through the run's log, when the loader is built.
    from distlstm.run.build import total_steps
    from distlstm.config import Config, ModelConfig, TrainConfig
    from distlstm.distributed.world import detect_world
    cfg = Config(model=ModelConfig(task="lm"), data=DataConfig(batch_size=3, bptt=4),
                 train=TrainConfig(max_steps=0, max_epochs=2))
    assert total_steps(cfg, index, detect_world({})) == 2 * 75  # 100 rows of 9 tokens: 3 rows of 300 targets
    assert "independent windows" not in capsys.readouterr().out


def test_too_few_targets_for_the_rows_is_a_clear_error(tmp_path):
    write_stream_parquet(tmp_path / "d" / "x.parquet", documents(2, min_len=3, max_len=4))
    index = open_index(str(tmp_path / "d" / "x.parquet"), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="fewer than its 40 rows .*lower data.batch_size"):
        _loader(index, 2, 0, batch_size=20)


def test_switching_lm_mode_between_checkpoint_and_resume_is_a_clear_error(stream_index):
    """A stream-mode data position resumed by the windows loader (and the reverse) names
    data.lm_mode instead of failing on a missing key."""
    from distlstm.config import DataConfig
    from distlstm.data.loader.batch_loader import build_loader
    index, _ = stream_index
    index.label_column = None
    windows = build_loader(index, DataConfig(lm_mode="windows", num_workers=0, seed=0), task="lm", dp_rank=0, dp_world_size=1,
                           vocab_size=0, num_classes=0, pin_memory=False, run_dir=None, max_epochs=1)
    stream = _loader(index, 1, 0)
    next(iter(stream))
    with pytest.raises(ValueError, match="data.lm_mode"):
        windows.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    with pytest.raises(ValueError, match="data.lm_mode"):
        _loader(index, 1, 0).load_state_dict(json.loads(json.dumps(windows.state_dict())))

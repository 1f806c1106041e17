"""Bad data through the real loader, under both `data.on_bad_sample` policies.

A failure here means a corrupt shard or invalid sample either crashes a run with a message that does
not say which shard, row/key and problem, or (with `skip`) is dropped silently: not counted in
`Batch.num_skipped`, not written to the quarantine file, or dropped in a way that changes one rank's
number of steps (a DDP hang at the end of the epoch). It also covers the data.too_long rules and
empty shards. Every case runs with a timeout: a bad shard must never hang the loader.
"""

from __future__ import annotations

import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from webdataset import TarWriter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _loader_worker as lw  # noqa: E402

from distlstm.data.errors import BadSampleError  # noqa: E402
from distlstm.data.shards.index import DatasetIndex, open_index  # noqa: E402
from distlstm.data.plan.epoch import EpochPlan  # noqa: E402
from distlstm.data.shards.tar import write_sidecar  # noqa: E402

pytestmark = pytest.mark.timeout(60)

ROWS = 40  # per shard; three shards, the middle one (ids 40..79) carries the problem


@dataclass
class Case:
    index: DatasetIndex
    bad: set[int]              # global sample ids that must be skipped
    match: list[str]           # regexes the error message must contain
    task: str = "classify"


# ---------------------------------------------------------------------------------------------- writers


def _pq(path: Path, tokens, labels, *, tokens_type=pa.list_(pa.int32()), label_type=pa.int64()) -> None:
    columns = {"tokens": pa.array(tokens, type=tokens_type)}
    if labels is not None:
        columns["label"] = pa.array(labels, type=label_type)
    pq.write_table(pa.table(columns), path, row_group_size=20)


def _clean_rows(seed: int):
    seqs, labels = lw.sample_data(ROWS, seed=seed, max_len=40)
    return [s.tolist() for s in seqs], labels.tolist()


def _parquet_dataset(tmp_path: Path, middle=None, **kw) -> Path:
    """Shards 0 and 2 clean; shard 1 from `middle(tokens, labels)` (or clean)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for s in range(3):
        tokens, labels = _clean_rows(seed=s)
        if s == 1 and middle is not None:
            tokens, labels, kw = middle(tokens, labels)
        _pq(folder / f"train-{s:05d}.parquet", tokens, labels, **(kw if s == 1 else {}))
    return folder


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def _tar_dataset(tmp_path: Path, edit=None, features: bool = False) -> Path:
    """Three tar shards with sidecar indexes (as prep writes them); `edit(i, sample)` changes shard 1."""
    folder = tmp_path / "tar"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for s in range(3):
        path = folder / f"train-{s:05d}.tar"
        keys, lengths = [], []
        with TarWriter(str(path), encoder=False, mtime=0.0) as w:
            for i in range(ROWS):
                n = int(rng.integers(1, 40))
                seq = rng.normal(size=(n, 3)).astype(np.float32) if features else rng.integers(1, 90, n).astype(np.int32)
                sample = {"__key__": f"s{s}-{i:04d}", ("features.npy" if features else "tokens.npy"): _npy(seq),
                          "cls": str(int(rng.integers(0, 4))).encode()}
                if s == 1 and edit is not None:
                    edit(i, sample)
                w.write(sample)
                keys.append(sample["__key__"])
                lengths.append(n)
        write_sidecar(str(path), keys, lengths, path.stat().st_size)
    return folder


def _index(folder: Path, tmp_path: Path) -> DatasetIndex:
    return open_index(str(folder), cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- cases


def case_parquet_truncated(tmp_path):
    folder = _parquet_dataset(tmp_path)
    index = _index(folder, tmp_path)
    # The file is damaged after indexing (a partial re-copy): the loader finds out when it reads.
    shard = folder / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return Case(index, set(range(40, 80)), [r"train-00001\.parquet", r"row group \d", "cannot be read"])


def case_tar_truncated(tmp_path):
    folder = _tar_dataset(tmp_path)
    shard = folder / "train-00001.tar"
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.6)])
    # Indexed from the sidecar, so the truncation is only visible to the reader.
    return Case(_index(folder, tmp_path), set(range(40, 80)),
                [r"train-00001\.tar", "after member s1-00", "truncated or corrupt tar"])


def case_parquet_wrong_schema(tmp_path):
    def strings(tokens, labels):
        return [[str(t) for t in row] for row in tokens], labels, {"tokens_type": pa.list_(pa.string())}
    return Case(_index(_parquet_dataset(tmp_path, strings), tmp_path), set(range(40, 80)),
                [r"train-00001\.parquet", "schema", r"column 'tokens' is list<.*string>", "expected list<int32"])


def case_parquet_missing_label_column(tmp_path):
    return Case(_index(_parquet_dataset(tmp_path, lambda t, l: (t, None, {})), tmp_path), set(range(40, 80)),
                [r"train-00001\.parquet", "schema", "no column 'label'"])


def case_parquet_null_label(tmp_path):
    def nulls(tokens, labels):
        labels = list(labels)
        labels[3] = labels[25] = None
        return tokens, labels, {}
    return Case(_index(_parquet_dataset(tmp_path, nulls), tmp_path), {43, 65},
                [r"train-00001\.parquet", "row (3|25)", "null in 'tokens' or 'label'"])


def case_tar_missing_label(tmp_path):
    def drop_cls(i, sample):
        if i in (5, 31):
            del sample["cls"]
    return Case(_index(_tar_dataset(tmp_path, drop_cls), tmp_path), {45, 71},
                [r"train-00001\.tar", "key s1-00(05|31)", r"missing label \.cls"])


def case_tar_shard_without_labels(tmp_path):
    # No sample of the shard has a .cls: only knowing the task tells this apart from an lm shard.
    return Case(_index(_tar_dataset(tmp_path, lambda i, s: s.pop("cls")), tmp_path), set(range(40, 80)),
                [r"train-00001\.tar", r"key s1-00\d\d", r"missing label \.cls"])


def case_parquet_nan_features(tmp_path):
    folder = tmp_path / "feat"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for s in range(3):
        rows = [rng.normal(size=(int(rng.integers(1, 30)), 3)).astype(np.float32) for _ in range(ROWS)]
        if s == 1:
            rows[7][0, 1] = np.nan
            rows[30][-1, 2] = np.inf
        _pq(folder / f"train-{s:05d}.parquet", [r.tolist() for r in rows], rng.integers(0, 4, ROWS).tolist(),
            tokens_type=pa.list_(pa.list_(pa.float32())))
    index = open_index(str(folder), sequence_column="tokens", cache_dir=tmp_path / "cache")
    return Case(index, {47, 70}, [r"train-00001\.parquet", "row (7|30)", "NaN or infinite feature value"])


def case_tar_nan_features(tmp_path):
    def nan(i, sample):
        if i == 12:
            arr = np.load(io.BytesIO(sample["features.npy"]))
            arr[0, 0] = np.nan
            sample["features.npy"] = _npy(arr)
    return Case(_index(_tar_dataset(tmp_path, nan, features=True), tmp_path), {52},
                [r"train-00001\.tar", "key s1-0012", "NaN or inf"])


def case_label_out_of_range(tmp_path):
    def big(tokens, labels):
        labels = list(labels)
        labels[0], labels[39] = 9, -1
        return tokens, labels, {}
    return Case(_index(_parquet_dataset(tmp_path, big), tmp_path), {40, 79},
                [r"train-00001\.parquet", "row (0|39)", r"label outside \[0, 4\)"])


def case_token_out_of_range(tmp_path):
    def big(tokens, labels):
        tokens = [list(t) for t in tokens]
        tokens[11][-1] = 100_000
        return tokens, labels, {}
    return Case(_index(_parquet_dataset(tmp_path, big), tmp_path), {51},
                [r"train-00001\.parquet", "row 11", r"token id outside \[0, 100\)"])


def case_parquet_null_token_inside(tmp_path):
    # Issue 20 class 8: a null item inside a list<int32> row, not a null row: pyarrow gives numpy a NaN
    # there, and a cast to int made it token id -9223372036854775808.
    def holes(tokens, labels):
        tokens = [list(t) for t in tokens]
        tokens[4][1] = tokens[33][0] = None
        return tokens, labels, {}
    return Case(_index(_parquet_dataset(tmp_path, holes), tmp_path), {44, 73},
                [r"train-00001\.parquet", "row (4|33)", r"'tokens' holds a null at position [01] \(row group [01]\)"])


def case_parquet_null_feature(tmp_path):
    folder = tmp_path / "feat"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for s in range(3):
        rows = [rng.normal(size=(int(rng.integers(2, 30)), 3)).tolist() for _ in range(ROWS)]
        if s == 1:
            rows[9][1][2] = None
        _pq(folder / f"train-{s:05d}.parquet", rows, rng.integers(0, 4, ROWS).tolist(),
            tokens_type=pa.list_(pa.list_(pa.float32())))
    index = open_index(str(folder), sequence_column="tokens", cache_dir=tmp_path / "cache")
    return Case(index, {49}, [r"train-00001\.parquet", "row 9", r"'tokens' holds a null at position 1 \(row group 0\)"])


CASES = [case_parquet_truncated, case_tar_truncated, case_parquet_wrong_schema, case_parquet_missing_label_column,
         case_parquet_null_label, case_tar_missing_label, case_tar_shard_without_labels, case_parquet_nan_features,
         case_tar_nan_features, case_label_out_of_range, case_token_out_of_range, case_parquet_null_token_inside,
         case_parquet_null_feature]


# ---------------------------------------------------------------------------------------------- policies


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("make_case", CASES, ids=lambda f: f.__name__[5:])
def test_error_names_shard_where_and_problem(tmp_path, make_case, workers):
    case = make_case(tmp_path)
    loader = lw.make_loader(None, None, index=case.index, task=case.task, workers=workers, max_epochs=1,
                            on_bad_sample="error", run_dir=tmp_path / "run")
    with pytest.raises(BadSampleError) as info:
        lw.take(loader, 10_000)
    message = str(info.value)
    for pattern in case.match:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    assert "fix:" in message


@pytest.mark.parametrize("make_case", CASES, ids=lambda f: f.__name__[5:])
def test_skip_keeps_steps_counts_and_quarantines(tmp_path, make_case):
    case = make_case(tmp_path)
    run_dir = tmp_path / "run"
    world = 2
    # Rank 1 reads through a DataLoader worker, rank 0 in process: both paths must skip the same way.
    loaders = [lw.make_loader(None, None, index=case.index, task=case.task, rank=r, world=world, workers=r,
                              max_epochs=1, on_bad_sample="skip", run_dir=run_dir) for r in range(world)]
    out = [lw.take(ld, 10_000) for ld in loaders]
    plan = EpochPlan(case.index.chunk_offsets, case.index.sample_lengths(), loaders[0].params, seed=loaders[0].seed, epoch=0)
    assert [len(o) for o in out] == [plan.batches_per_rank(world)] * world, "skipping changed a rank's step count"
    kept = [i for o in out for b in o if b["weight"] for i in b["ids"]]
    assert len(kept) == len(set(kept))
    assert set(kept) == set(range(case.index.num_samples)) - case.bad
    assert sum(b["skipped"] for o in out for b in o) == len(case.bad), "num_skipped must count each bad sample once"
    files = [run_dir / "quarantine" / f"rank{r:05d}.jsonl" for r in range(world)]
    records = [json.loads(line) for f in files if f.is_file() for line in f.read_text().splitlines()]
    assert sorted(rec["sample_id"] for rec in records) == sorted(case.bad)
    for rec in records:
        text = f"shard {rec['shard']}: {rec['where']}: {rec['problem']}"
        assert rec["epoch"] == 0 and re.search(r"train-00001\.(parquet|tar)", rec["shard"])
        assert re.search(case.match[-1], text), text


# ---------------------------------------------------------------------------------------------- index time


def test_parquet_unreadable_at_index_time_names_shard(tmp_path):
    folder = _parquet_dataset(tmp_path)
    shard = folder / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(BadSampleError, match=r"train-00001\.parquet: file: not a readable Parquet file"):
        _index(folder, tmp_path)


def test_tar_truncated_without_sidecar_fails_at_index_time(tmp_path):
    folder = _tar_dataset(tmp_path)
    shard = folder / "train-00001.tar"
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.6)])
    (folder / "train-00001.tar.idx.json").unlink()
    with pytest.raises(BadSampleError, match=r"train-00001\.tar: after member s1-\d+\.\w+: truncated or corrupt tar"):
        _index(folder, tmp_path)


# ---------------------------------------------------------------------------------------------- empty shards


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("fmt", ["parquet", "tar"])
def test_empty_shard_contributes_nothing(tmp_path, policy, fmt):
    if fmt == "parquet":
        folder = _parquet_dataset(tmp_path, lambda t, l: ([], [], {}))
    else:
        folder = _tar_dataset(tmp_path)
        with TarWriter(str(folder / "train-00001.tar"), encoder=False, mtime=0.0):
            pass
        write_sidecar(str(folder / "train-00001.tar"), [], [], 0)
    index = _index(folder, tmp_path)
    assert index.num_samples == 2 * ROWS
    loaders = [lw.make_loader(None, None, index=index, rank=r, world=2, max_epochs=1, on_bad_sample=policy,
                              run_dir=tmp_path / "run") for r in range(2)]
    out = [lw.take(ld, 10_000) for ld in loaders]
    assert len(out[0]) == len(out[1])
    kept = sorted(i for o in out for b in o if b["weight"] for i in b["ids"])
    assert kept == list(range(2 * ROWS)) and sum(b["skipped"] for o in out for b in o) == 0
    assert not (tmp_path / "run" / "quarantine").exists()


def test_only_empty_shards_is_an_error(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    _pq(folder / "train-00000.parquet", [], [])
    loader = lw.make_loader(None, None, index=_index(folder, tmp_path), max_epochs=1)
    with pytest.raises(ValueError, match="the plan has no batches: the dataset is empty"):
        lw.take(loader, 10)


# ---------------------------------------------------------------------------------------------- too long


def _long_dataset(tmp_path):
    def long(tokens, labels):
        tokens = [list(t) for t in tokens]
        tokens[17] = list(range(1, 91))  # 90 > max_length 64
        tokens[33] = list(range(1, 65))  # exactly max_length: fine
        return tokens, labels, {}
    return _index(_parquet_dataset(tmp_path, long), tmp_path)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_too_long_error_names_shard_and_row(tmp_path, policy):
    index = _long_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"train-00001\.parquet: row 17: length 90 exceeds data\.max_length=64 "
                                         r"\(1 samples in all\)"):
        lw.make_loader(None, None, index=index, too_long="error", on_bad_sample=policy)


def test_too_long_drop_and_truncate(tmp_path):
    index = _long_dataset(tmp_path)
    world = 2
    for too_long in ("drop", "truncate"):
        loaders = [lw.make_loader(None, None, index=index, rank=r, world=world, max_epochs=1, too_long=too_long)
                   for r in range(world)]
        batches = [b for ld in loaders for b in _iterate(ld)]
        assert len(batches) % world == 0
        ids = [i for b in batches if b.weight for i in b.sample_ids.tolist()]
        expected = set(range(3 * ROWS)) - ({57} if too_long == "drop" else set())
        assert sorted(ids) == sorted(expected)
        assert all(int(b.lengths.max()) <= 64 and b.inputs.shape[1] <= 64 for b in batches)
        for b in batches:
            hits = (b.sample_ids == 57).nonzero()
            if len(hits) and too_long == "truncate":
                row = int(hits[0, 0])
                assert int(b.lengths[row]) == 64 and b.inputs[row].tolist() == list(range(1, 65))


def _iterate(loader):
    it = iter(loader)
    out = list(it)
    it.close()
    return out


@pytest.mark.timeout(240)
def test_null_token_in_lm_stream_mode_is_reported_as_null_by_the_trainer(tmp_path):
    """Issue 20 class 8, as a user meets it: raw Parquet with one null token, lm (stream mode). The one
    error line names the file, row, row group and "null", not token id -9223372036854775808."""
    import os
    import subprocess
    rows = [[int(t) for t in np.random.default_rng(i).integers(1, 50, 200)] for i in range(40)]
    rows[13][7] = None
    pq.write_table(pa.table({"tokens": pa.array(rows, pa.list_(pa.int32()))}), tmp_path / "train.parquet",
                   row_group_size=10)
    proc = subprocess.run([sys.executable, "-m", "distlstm.train", "--data.train", str(tmp_path / "train.parquet"),
                           "--model.task", "lm", "--model.vocab_size", "50", "--model.hidden_size", "16",
                           "--train.max_steps", "3", "--train.eval_every", "0", "--log.progress", "false",
                           "--log.tensorboard", "false", "--train.run_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=200, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1",
                               "DISTLSTM_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "9223372036854775808" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error == [f"error: rank 0: shard {tmp_path / 'train.parquet'}: row 13: 'tokens' holds a null at "
                     f"position 7 (row group 1), not a value; fix: fix the data (data.on_bad_sample=skip is not "
                     f"available with data.lm_mode=stream)"], proc.stderr[-3000:]

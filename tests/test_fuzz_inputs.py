"""Random mutations of a real prepared dataset and a real exported model (issue 20's fuzz test).

A manifest (and its vocab.json / labels.json) written by `distlstm.prep`, and a folder written by
`python -m distlstm.export`, are mutated at random: a JSON value replaced (by a huge, negative or
fractional number, a path outside, a URL, another type), a key removed, a list emptied or repeated,
the text cut short, bytes flipped, the safetensors header's length forged, a file removed. Then the
dataset is opened and read as training reads it (index, every chunk, the vocabulary copied into a
run folder), or the folder is given to `distlstm.load`.

Each attempt must end either in success or in one of the project's user errors
(`distlstm.errors.USER_ERRORS`: one line naming what is wrong); never in another exception (a
traceback for the user), never hang (each attempt has an alarm), and never read outside the
dataset: a canary folder beside it holds a valid shard and vocabulary, which no Python-level open
may touch, whose bytes must not reach the run folder, and no successfully opened index may name.

Bounded for CI: DISTLSTM_FUZZ_EXAMPLES attempts per target (default 60) from a fixed seed; set
DISTLSTM_FUZZ_SEED to search elsewhere. A failure prints the seed and the mutations to replay it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distlstm
from distlstm.checkpoint.artifacts import copy_data_files
from distlstm.data.prep import prep
from distlstm.data.shards.index import open_index
from distlstm.errors import USER_ERRORS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("DISTLSTM_FUZZ_EXAMPLES", "60"))
SEED = int(os.environ.get("DISTLSTM_FUZZ_SEED", "20"))
ALARM_S = 30
CANARY = b"CANARY-7f3a9c"
pytestmark = pytest.mark.timeout(900)

# Every path a Python-level open() touches while an attempt runs (pyarrow's native opens are not
# seen; the index's shard list and the canary's bytes cover those).
_opened: list[str] | None = None


def _audit(event: str, args) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


class Hung(BaseException):
    pass


@contextlib.contextmanager
def attempt_guard():
    global _opened

    def ring(signum, frame):
        raise Hung(f"no answer within {ALARM_S} s")
    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(ALARM_S)
    _opened = []
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        _opened = None


# ---------------------------------------------------------------------------------------------- mutations


def _values(rng: random.Random, outside: Path) -> list:
    return [None, True, 0, -1, 1.5, 2 ** 31, 2 ** 62, 2 ** 64, -2 ** 63, math.inf, math.nan, "", "x" * 5000,
            [], {}, [1, 2], {"a": 1}, "../../outside/canary.parquet", str(outside / "canary.parquet"),
            f"file://{outside / 'canary.parquet'}", "../outside/vocab.json", str(outside / "vocab.json"),
            "http://127.0.0.1:1/x.parquet", "s3://bucket/x.parquet", "train-00000.parquet",
            "/dev/zero", "/proc/self/environ", "..", ".", "\x00", rng.randint(-10, 10 ** 6)]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def mutate_json(text: str, rng: random.Random, outside: Path) -> tuple[str, str]:
    """(mutated text, what was done)."""
    kind = rng.random()
    if kind < 0.1:
        cut = rng.randrange(len(text))
        return text[:cut], f"cut at {cut}"
    if kind < 0.15:
        i = rng.randrange(len(text))
        return text[:i] + chr(rng.randrange(32, 0x3000)) + text[i + 1:], f"char {i} replaced"
    try:
        obj = json.loads(text)
    except ValueError:  # cut by an earlier mutation: cut it again
        cut = rng.randrange(len(text) or 1)
        return text[:cut], f"cut at {cut}"
    path = rng.choice([p for p in _paths(obj) if p] or [()]) if isinstance(obj, (dict, list)) and obj else None
    if path is None or not path:
        return json.dumps(rng.choice(_values(rng, outside))), "replaced whole"
    path = rng.choice([p for p in _paths(obj) if p])
    parent, key = _get(obj, path[:-1]), path[-1]
    op = rng.random()
    if op < 0.2 and isinstance(parent, dict):
        del parent[key]
        done = f"deleted {path}"
    elif op < 0.3 and isinstance(parent[key], list):
        parent[key] = parent[key] * rng.choice([0, 2, 300])
        done = f"{path} repeated or emptied"
    else:
        value = rng.choice(_values(rng, outside))
        parent[key] = value
        done = f"{path} = {str(value)[:60]!r}"
    return json.dumps(obj), done


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.random()
    if kind < 0.3:
        cut = rng.randrange(len(data))
        return data[:cut], f"cut at {cut}"
    if kind < 0.5:
        header = rng.choice([0, 1, 7, 2 ** 62, 2 ** 64 - 1, len(data), len(data) - 8, rng.randrange(2 ** 32)])
        return header.to_bytes(8, "little") + data[8:], f"header length {header}"
    if kind < 0.6:
        return data + os.urandom(rng.randrange(1, 4096)), "junk appended"
    data = bytearray(data)
    hits = [rng.randrange(min(len(data), rng.choice([64, 512, len(data)]))) for _ in range(rng.randint(1, 8))]
    for i in hits:
        data[i] = rng.randrange(256)
    return bytes(data), f"bytes {hits} changed"


def mutate_folder(folder: Path, files: list[str], rng: random.Random, outside: Path) -> list[str]:
    """1-3 mutations of the files in `folder`; returns what was done."""
    done = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(files)
        path = folder / name
        if not path.exists():
            continue
        if rng.random() < 0.08:
            path.unlink()
            done.append(f"{name}: removed")
        elif name.endswith(".json"):
            text, what = mutate_json(path.read_text(), rng, outside)
            path.write_text(text)
            done.append(f"{name}: {what}")
        else:
            data, what = mutate_bytes(path.read_bytes(), rng)
            path.write_bytes(data)
            done.append(f"{name}: {what}")
    return done


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A prepared lm dataset (manifest, vocab.json), a prepared classify dataset with string labels
    (labels.json), a trained-and-exported lm model, and the canary folder."""
    tmp = tmp_path_factory.mktemp("fuzz_inputs")
    text = (ROOT / "examples" / "shakespeare.txt").read_text()[:20000]
    (tmp / "t.txt").write_text(text)
    prep.run(prep.build_parser().parse_args(["--text", str(tmp / "t.txt"), "--task", "lm", "--tokenizer", "char",
                                             "--seq-len", "64", "--rows-per-group", "16", "--valid-fraction", "0.1",
                                             "--split", "tail", "--out", str(tmp / "lm"), "--quiet"]))
    rows = [{"tokens": [1 + (i * 7 + j) % 30 for j in range(3 + i % 9)], "label": ["cat", "dog", "eel"][i % 3]}
            for i in range(120)]
    (tmp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prep.run(prep.build_parser().parse_args(["--jsonl", str(tmp / "c.jsonl"), "--tokens-field", "tokens",
                                             "--label-field", "label", "--task", "classify", "--rows-per-group",
                                             "16", "--valid-fraction", "0", "--out", str(tmp / "cls"), "--quiet"]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DISTLSTM_CACHE": str(tmp / "cache")}
    for cmd in (["distlstm.train", "--data.train", str(tmp / "lm" / "train"), "--data.valid", str(tmp / "lm" / "valid"),
                 "--model.task", "lm", "--model.hidden_size", "16", "--model.embed_size", "8", "--train.max_steps",
                 "3", "--train.eval_every", "0", "--log.progress", "false", "--log.tensorboard", "false",
                 "--train.run_dir", str(tmp / "run")],
                ["distlstm.export", str(tmp / "run"), "--format", "safetensors", "--out", str(tmp / "exported")]):
        proc = subprocess.run([sys.executable, "-m", *cmd], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    outside = tmp / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"tokens": pa.array([[61, 61, 61]] * 17, pa.list_(pa.int32())),
                             "label": pa.array([0] * 17, pa.int64())}), outside / "canary.parquet")
    (outside / "vocab.json").write_text(json.dumps({"version": 1, "tokenizer": "char",
                                                    "tokens": ["<unk>", CANARY.decode()]}))
    (outside / "labels.json").write_text(json.dumps({"version": 1, "labels": [CANARY.decode()]}))
    return tmp


def _fail_unless_user_error(exc: BaseException, context: str) -> None:
    if isinstance(exc, Hung):
        pytest.fail(f"hung: {context}")
    if not isinstance(exc, USER_ERRORS):
        pytest.fail(f"not a user error: {type(exc).__name__}: {exc}\n{context}\n"
                    + "".join(traceback.format_exception(exc))[-3000:])


def _no_outside_reads(outside: Path, context: str) -> None:
    touched = [p for p in (_opened or []) if os.path.realpath(p).startswith(str(outside.resolve()))]
    assert not touched, f"read outside the dataset: {touched[:3]}\n{context}"


def _attempt(action, outside: Path, context: str, outcomes: dict[str, int], ok: str) -> bool:
    """Run `action()` under the hang guard, checking it read nothing in `outside`; count the outcome
    (`ok`, or the user error's class name) in `outcomes`. True when it succeeded; anything that is
    not a user error fails the test."""
    try:
        with attempt_guard():
            try:
                action()
            finally:
                _no_outside_reads(outside, context)
    except BaseException as exc:  # noqa: BLE001 - the point is what kind it is
        if isinstance(exc, AssertionError):
            raise
        _fail_unless_user_error(exc, context)
        outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        return False
    outcomes[ok] = outcomes.get(ok, 0) + 1
    return True


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dataset,task", [("lm", "lm"), ("cls", "classify")])
def test_mutated_dataset_opens_or_fails_as_a_user_error_never_outside(originals, tmp_path, dataset, task):
    rng = random.Random(f"{SEED}-{dataset}")
    outside = originals / "outside"
    outcomes: dict[str, int] = {}
    for n in range(EXAMPLES):
        data = tmp_path / f"case{n}"
        shutil.copytree(originals / dataset, data / dataset)
        shutil.copytree(outside, data / "outside")  # beside the dataset: what "../outside" reaches
        split = data / dataset / "train"
        names = ["train/manifest.json"] * 4 + [n for n in ("vocab.json", "labels.json") if (data / dataset / n).exists()]
        names += [f"train/{p.name}" for p in split.glob("*.parquet")][:1]
        done = mutate_folder(data / dataset, names, rng, data / "outside")
        context = f"seed {SEED}, {dataset} case {n}: {done}"
        run_dir = data / "run"
        run_dir.mkdir()
        opened = []

        def open_and_read():
            index = open_index(str(split), task=task, cache_dir=tmp_path / "cache")
            for c in range(index.num_chunks):
                index.read_chunk(c, task)
            copy_data_files(index, run_dir)
            opened.append(index)

        if _attempt(open_and_read, data / "outside", context, outcomes, "opened"):
            [index] = opened
            root = str((data / dataset).resolve())
            named = [s for s in index.shards if not os.path.realpath(s).startswith(root)]
            assert not named, f"index names shards outside the dataset: {named}\n{context}"
        for p in run_dir.iterdir():
            assert CANARY not in p.read_bytes(), f"{p.name} holds bytes from outside the dataset\n{context}"
        shutil.rmtree(data)
    print(f"{dataset}: {outcomes}")
    assert outcomes.get("opened") and len(outcomes) > 1, outcomes  # the mutations do reach both ends


def test_mutated_export_loads_or_fails_as_a_user_error(originals, tmp_path):
    rng = random.Random(f"{SEED}-export")
    names = ["config.json"] * 3 + ["model.safetensors"] * 3 + ["vocab.json"]
    outcomes: dict[str, int] = {}
    for n in range(EXAMPLES):
        folder = tmp_path / f"case{n}" / "exported"
        shutil.copytree(originals / "exported", folder)
        shutil.copytree(originals / "outside", folder.parent / "outside")
        done = mutate_folder(folder, names, rng, folder.parent / "outside")
        context = f"seed {SEED}, export case {n}: {done}"
        _attempt(lambda: distlstm.load(folder), folder.parent / "outside", context, outcomes, "loaded")
        shutil.rmtree(folder.parent)
    print(f"export: {outcomes}")
    assert outcomes.get("loaded") and len(outcomes) > 1, outcomes

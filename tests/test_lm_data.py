"""Language-model data across splits (issue 21): one vocabulary for splits prepped from separate
files, split/model vocabulary mismatches refused before step 1, prep's output root as data.train.

A failure here means a user's validation split silently uses other token ids than training, a
mismatch surfaces only after a whole epoch with an error that blames the data, or prep's own
output folder is refused as training data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from distlstm.data.prep import prep

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TEXT = "the cat sat on the mat\nthe dog sat on the log\n" * 40
VALID_TEXT = "a dog sat on a cat\nthe zebra sat\n" * 20  # other frequencies, one unseen word


def _prep(*args: str) -> dict:
    return prep.run(prep.build_parser().parse_args([*args, "--quiet"]))


def _ids(split: Path) -> list[int]:
    shards = json.loads((split / "manifest.json").read_text())["shards"]
    return [t for s in shards for row in pq.read_table(split / s["path"]).column("tokens").to_pylist() for t in row]


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTLSTM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "distlstm.train", "--model.task", "lm", "--model.hidden_size", "16",
           "--model.embed_size", "8", "--data.batch_size", "2", "--data.bptt", "8", "--log.progress", "false",
           "--log.tensorboard", "false", "--checkpoint.at_end", "false", "--train.run_dir", str(tmp_path / "run"),
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def _text_preps(tmp_path: Path, *valid_args: str) -> tuple[Path, Path]:
    (tmp_path / "train.txt").write_text(TRAIN_TEXT)
    (tmp_path / "valid.txt").write_text(VALID_TEXT)
    _prep("--text", str(tmp_path / "train.txt"), "--tokenizer", "whitespace", "--seq-len", "16",
          "--valid-fraction", "0", "--out", str(tmp_path / "a"))
    _prep("--text", str(tmp_path / "valid.txt"), "--tokenizer", "whitespace", "--seq-len", "16",
          "--valid-fraction", "0", "--out", str(tmp_path / "b"), *valid_args)
    return tmp_path / "a", tmp_path / "b"


def test_prep_reuses_a_vocabulary(tmp_path):
    """prep --vocab: the valid file's words get the training vocabulary's ids (an unseen word <unk>)."""
    a, b = _text_preps(tmp_path, "--vocab", str(tmp_path / "a" / "vocab.json"))
    tokens = json.loads((a / "vocab.json").read_text())["tokens"]
    assert (b / "vocab.json").read_text() == (a / "vocab.json").read_text()
    stoi = {t: i for i, t in enumerate(tokens)}
    expected = [stoi.get(w, 0) for line in VALID_TEXT.splitlines() for w in line.split() + ["<eos>"]]
    assert _ids(b / "train") == expected and 0 in expected  # "zebra" and "a" are not in training: <unk>
    manifest = json.loads((b / "train" / "manifest.json").read_text())
    assert manifest["vocab_size"] == len(tokens)
    # The pair trains and validates (the vocabulary check below lets shared vocabularies through).
    proc = _train(tmp_path, "--data.train", str(a / "train"), "--data.valid", str(b / "train"),
                  "--train.max_steps", "2", "--train.eval_every", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A vocabulary of another tokenizer is refused, naming the flag to pass.
    bad = subprocess.run([sys.executable, "-m", "distlstm.prep", "--text", str(tmp_path / "valid.txt"),
                          "--tokenizer", "char", "--vocab", str(a / "vocab.json"), "--out", str(tmp_path / "c")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode != 0 and "--tokenizer whitespace" in bad.stderr and "Traceback" not in bad.stderr


def test_split_vocabulary_mismatch_fails_before_step_1(tmp_path):
    """Token ids: valid's ids beyond the train manifest's vocab_size -> refused before training,
    naming --model.vocab_size (not "fix the data" after an epoch); text: two vocab.json -> --vocab."""
    for name, top in (("train", 50), ("valid", 80)):
        rows = [{"ids": [(i * 7 + j) % top for j in range(40)]} for i in range(30)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        _prep("--jsonl", str(tmp_path / f"{name}.jsonl"), "--tokens-field", "ids", "--task", "lm", "--seq-len", "16",
              "--valid-fraction", "0", "--out", str(tmp_path / name))
    args = ["--data.train", str(tmp_path / "train" / "train"), "--data.valid", str(tmp_path / "valid" / "train"),
            "--train.max_steps", "1000", "--train.eval_every", "0"]
    proc = _train(tmp_path, *args)
    assert proc.returncode != 0
    assert "--model.vocab_size 80" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "[train] step" not in proc.stdout + proc.stderr  # refused before any step
    assert _train(tmp_path, *args[:-4], "--train.max_steps", "2", "--train.eval_every", "0",
                  "--model.vocab_size", "80", "--train.run_dir", str(tmp_path / "run2")).returncode == 0

    (tmp_path / "text").mkdir()
    a, b = _text_preps(tmp_path / "text")  # no --vocab: each has its own vocabulary
    proc = _train(tmp_path, "--data.train", str(a / "train"), "--data.valid", str(b / "train"),
                  "--train.max_steps", "1000", "--train.run_dir", str(tmp_path / "run3"))
    assert proc.returncode != 0 and "--vocab" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_prep_output_root_is_training_data(tmp_path):
    """--data.train OUT (prep's --out): trains on OUT/train, validates on OUT/valid, says so."""
    (tmp_path / "t.txt").write_text(TRAIN_TEXT)
    out = tmp_path / "out"
    _prep("--text", str(tmp_path / "t.txt"), "--tokenizer", "whitespace", "--seq-len", "16", "--split", "tail",
          "--valid-fraction", "0.2", "--out", str(out))
    proc = _train(tmp_path, "--data.train", str(out), "--train.max_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    said = [line for line in log.splitlines() if "prepared dataset" in line]
    assert len(said) == 1 and f"{out}/train" in said[0] and f"{out}/valid" in said[0], log[-2000:]
    assert "[valid] step 2" in log
    saved = (tmp_path / "run" / "config.toml").read_text()
    assert f'train = "{out}/train"' in saved and f'valid = "{out}/valid"' in saved

"""Raw Parquet files without a manifest: what the data itself tells the run (no label column for
lm, the vocabulary from the token statistics, the feature width from a fixed_size_list column).

A failure means a user with a plain Parquet file of token lists cannot train a language model on it
without hand-writing a manifest (the run asks for a label column lm never uses, or for sizes the
file already holds), or that a size read from the data is wrong: too small a vocabulary rejects
real tokens, a wrong feature width builds a model that cannot read the data.
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distlstm.config import ConfigError, load_config
from distlstm.run.build import resolve_config
from distlstm.data.shards.dims import DataDims
from distlstm.data.shards.index import open_index

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model.hidden_size", "32", "--model.embed_size", "16", "--data.max_tokens", "1024", "--log.progress",
        "false", "--train.eval_every", "0", "--data.num_workers", "0"]


def counting_sequences(n: int, vocab: int, seed: int) -> list[np.ndarray]:
    """Arithmetic progressions mod `vocab`: the next token follows from the last two, so an LSTM
    learns them quickly (a falling perplexity shows the tokens and targets line up)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start, step, length = rng.integers(0, vocab), rng.integers(1, 4), rng.integers(8, 30)
        out.append(((start + step * np.arange(length)) % vocab).astype(np.int32))
    return out


def write_tokens(path: Path, seqs, **kw) -> Path:
    pq.write_table(pa.table({"tokens": pa.array(seqs, pa.list_(pa.int32()))}), path, **kw)
    return path


def run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTLSTM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "distlstm.train", "--train.run_dir", str(tmp_path / "run"), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_token_only_parquet_file_trains_as_lm_with_no_manifest(tmp_path):
    """Only `--model.task lm` describes the data: no label column, no manifest, no vocab size."""
    train = write_tokens(tmp_path / "train.parquet", counting_sequences(600, 40, seed=0), row_group_size=100)
    valid_seqs = counting_sequences(60, 40, seed=1)
    valid_seqs[0] = np.array([5, 44, 2], np.int32)  # the largest id is in the validation split only
    valid = write_tokens(tmp_path / "valid.parquet", valid_seqs)
    proc = run_train(tmp_path, "--data.train", str(train), "--data.valid", str(valid), "--model.task", "lm",
                     "--train.max_steps", "40", "--optim.lr", "1e-2", *FAST)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "model.vocab_size=45: largest token id + 1 in the Parquet statistics of 2 shard(s)" in proc.stdout
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["model"]
    assert (saved["task"], saved["input"], saved["vocab_size"]) == ("lm", "tokens", 45)
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    # Every validation token but the first of each sample is predicted (the samples are whole).
    assert final["valid_items"] == sum(len(s) - 1 for s in valid_seqs)
    assert final["valid_perplexity"] < 20, final  # uniform over 45 ids would be 45


def test_token_statistics_missing_is_a_clear_error(tmp_path):
    train = write_tokens(tmp_path / "t.parquet", counting_sequences(50, 10, seed=0), write_statistics=False)
    proc = run_train(tmp_path, "--data.train", str(train), "--model.task", "lm", *FAST)
    assert proc.returncode == 2
    assert "model.vocab_size is unknown" in proc.stderr and "set --model.vocab_size" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fixed_size_list_features_give_the_input_size(tmp_path):
    """list<fixed_size_list<float, 3>> in a 'features' column: input=features and input_size=3 with
    no flag; only the class count is given."""
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(int(rng.integers(4, 20)), 3)).astype(np.float32) for _ in range(400)]
    labels = [int(s[:, 0].sum() > 0) for s in seqs]
    typ = pa.list_(pa.list_(pa.float32(), 3))
    table = pa.table({"features": pa.array([s.tolist() for s in seqs], typ), "label": pa.array(labels, pa.int64())})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=100)
    proc = run_train(tmp_path, "--data.train", str(tmp_path / "f.parquet"), "--model.num_classes", "2",
                     "--train.max_steps", "5", *FAST)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["model"]
    assert (saved["input"], saved["input_size"], saved["vocab_size"]) == ("features", 3, 0)


def test_data_dims_read_the_footers(tmp_path):
    """Largest id over row groups (empty and null-only groups included), unknown without statistics,
    and no width for plain (not fixed-size) feature lists."""
    seqs = [np.array([], np.int32), np.array([], np.int32), np.array([3, 9], np.int32), np.array([7], np.int32)]
    write_tokens(tmp_path / "a.parquet", seqs, row_group_size=2)
    write_tokens(tmp_path / "b.parquet", [np.array([11, 2], np.int32)])
    both = open_index(str(tmp_path / "{a,b}.parquet"), cache_dir=tmp_path / "cache", task="lm")
    assert both.label_column is None
    assert DataDims(both).vocab_size == 12 and DataDims(both).input_size == 0
    write_tokens(tmp_path / "c.parquet", [np.array([1, 2], np.int32)], write_statistics=False)
    assert DataDims(open_index(str(tmp_path / "c.parquet"), cache_dir=tmp_path / "cache")).vocab_size == 0
    plain = pa.table({"features": pa.array([[[0.5, 1.0]]], pa.list_(pa.list_(pa.float32()))), "label": [1]})
    pq.write_table(plain, tmp_path / "p.parquet")
    index = open_index(str(tmp_path / "p.parquet"), cache_dir=tmp_path / "cache")
    assert index.sequence_column == "features" and DataDims(index).input_size == 0
    with pytest.raises(ConfigError, match="model.input_size is unknown.*set --model.input_size"):
        resolve_config(load_config(None, ["--model.num_classes", "2"]), index)


def test_a_classify_index_still_reads_labels(tmp_path):
    """The task decides the label column: lm reads none, the others keep 'label'."""
    table = pa.table({"tokens": pa.array([[1, 2]], pa.list_(pa.int32())), "label": [0]})
    pq.write_table(table, tmp_path / "x.parquet")
    assert open_index(str(tmp_path / "x.parquet"), cache_dir=tmp_path / "c", task="classify").label_column == "label"
    assert open_index(str(tmp_path / "x.parquet"), cache_dir=tmp_path / "c", task="lm").label_column is None

"""Label columns of every shape reach the model aligned with their samples.

A failure means regression with several targets cannot train on shards prep wrote, or a null row
in a tag column shifts the tags of every later sample (silently wrong training data).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distlstm.config import DataConfig
from distlstm.data.shards.index import open_index
from distlstm.data.loader.batch_loader import build_loader

ROOT = Path(__file__).resolve().parents[1]


def test_vector_regression_targets_prep_then_train(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"tokens": rng.integers(1, 20, rng.integers(3, 12)).tolist()} for _ in range(300)]
    for r in rows:
        r["y"] = [float(np.mean(r["tokens"])), float(len(r["tokens"]))]
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    env = {**os.environ, "DISTLSTM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    prep = subprocess.run([sys.executable, "-m", "distlstm.prep", "--jsonl", str(src), "--tokens-field", "tokens",
                           "--label-field", "y", "--task", "regress", "--out", str(tmp_path / "ds"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr[-2000:]
    index = open_index(str(tmp_path / "ds" / "train"), cache_dir=tmp_path / "cache")
    loader = build_loader(index, DataConfig(num_workers=0), task="regress", dp_rank=0, dp_world_size=1,
                          vocab_size=0, num_classes=0, pin_memory=False, run_dir=None, max_epochs=1)
    for batch in loader:
        assert batch.targets.shape == (len(batch.lengths), 2)
        # The second target is the sample's length: it must match the row it came with.
        assert np.allclose(batch.targets[:, 1].numpy(), batch.lengths.numpy())
    run = subprocess.run([sys.executable, "-m", "distlstm.train", "--data.train", str(tmp_path / "ds" / "train"),
                          "--model.task", "regress", "--model.num_targets", "2", "--train.max_steps", "5",
                          "--train.run_dir", str(tmp_path / "run"), "--log.progress", "false"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_null_tag_row_does_not_shift_later_tags(tmp_path):
    tokens = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 1]]
    tags = [[1, 1, 1], None, [2, 3, 2, 3], [0, 3]]
    pq.write_table(pa.table({"tokens": pa.array(tokens, pa.list_(pa.int32())),
                             "tags": pa.array(tags, pa.list_(pa.int32()))}), tmp_path / "t.parquet")
    index = open_index(str(tmp_path / "t.parquet"), label_column="tags", cache_dir=tmp_path / "cache")
    cfg = DataConfig(num_workers=0, on_bad_sample="skip")
    loader = build_loader(index, cfg, task="tag", dp_rank=0, dp_world_size=1, vocab_size=20, num_classes=4,
                          pin_memory=False, run_dir=tmp_path, max_epochs=1)
    seen = {}
    for batch in loader:
        for r, sid in enumerate(batch.sample_ids.tolist()):
            seen[sid] = batch.targets[r, :int(batch.lengths[r])].tolist()
    assert seen == {0: [1, 1, 1], 2: [2, 3, 2, 3], 3: [0, 3]}

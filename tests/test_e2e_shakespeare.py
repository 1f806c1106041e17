"""End to end on real text: `python -m distlstm.prep` on tiny Shakespeare, then 2-rank training
through torchrun on CPU, for both shard formats.

A failure means the path a new user follows (prep their text, train on the shards, several
processes) is broken somewhere between the two tools. Skips when ../shared/data is absent.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not TEXT.is_file(), reason=f"{TEXT} is absent")
@pytest.mark.parametrize("fmt", ["parquet", "tar"])
def test_prep_then_torchrun_two_ranks(tmp_path, fmt):
    env = {**os.environ, "DISTLSTM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "shakespeare"
    prep = subprocess.run([sys.executable, "-m", "distlstm.prep", "--text", str(TEXT), "--task", "lm",
                           "--tokenizer", "char", "--seq-len", "64", "--split", "tail", "--valid-fraction", "0.1",
                           "--format", fmt, "--shard-size-mb", "1", "--rows-per-group", "256", "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["vocab_size"] >= 60 and manifest["num_samples"] > 10_000
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", "-m", "distlstm.train",
                           "--data.train", str(out / "train"), "--data.valid", str(out / "valid"),
                           "--model.task", "lm", "--model.hidden_size", "64", "--model.embed_size", "32",
                           "--data.max_tokens", "2048", "--train.max_steps", "60", "--optim.lr", "1e-2",
                           "--train.eval_every", "0", "--train.eval_max_batches", "10", "--log.every_steps", "10",
                           "--log.progress", "false", "--train.run_dir", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "torchrun, 2 ranks" in proc.stdout
    final = json.loads((run_dir / "final.json").read_text())
    # Uniform guessing over the ~65 characters is perplexity 65; 60 small steps get well below it.
    assert final["valid_perplexity"] < 20, final
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0], losses

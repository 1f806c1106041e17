"""A run written by the code before the layout moved (HEAD 2df030e: flat modules) still loads,
evaluates and resumes. tests/data/run-2df030e was made by that commit with

    python -m distlstm.train --train.run_dir /tmp/oldrun --data.cache_dir /tmp/oldcache \
        --data.synthetic_samples 2000 --model.hidden_size 8 --model.embed_size 8 --train.max_steps 4 \
        --checkpoint.every_steps 2 --checkpoint.keep_last 1 --train.eval_every 0 \
        --log.tensorboard false --log.progress false --data.num_workers 0

(the embedded synthetic dataset is regenerated from its seed, so only the run folder is committed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import distlstm
from distlstm.checkpoint.codec import tree_hash

OLD_RUN = Path(__file__).parent / "data" / "run-2df030e"
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--data.synthetic_samples", "2000", "--model.hidden_size", "8", "--model.embed_size", "8",
         "--checkpoint.every_steps", "2", "--checkpoint.keep_last", "1", "--train.eval_every", "0",
         "--log.tensorboard", "false", "--log.progress", "false", "--data.num_workers", "0"]


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    return run


def _cli(module: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def test_old_run_loads_with_the_same_weights(old_run):
    final = json.loads((old_run / "final.json").read_text())
    for checkpoint in (None, "final", "latest", "step-000004"):
        model, vocab, cfg = distlstm.load(old_run, checkpoint=checkpoint)
        assert tree_hash(model) == final["param_hash"], checkpoint
        assert cfg.model.hidden_size == 8 and vocab is None
    model, _, _ = distlstm.load(old_run / "checkpoints" / "step-000004")
    assert tree_hash(model) == final["param_hash"]


def test_old_run_evaluates_to_its_recorded_loss(old_run, tmp_path):
    final = json.loads((old_run / "final.json").read_text())
    proc = _cli("distlstm.evaluate", old_run, "--checkpoint", "step-000004", "--data.cache_dir", tmp_path / "cache",
                "--name", "check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((old_run / "eval-check.json").read_text())
    assert record["step"] == 4 and record["loss"] == pytest.approx(final["valid_loss"], abs=1e-6)


def test_old_run_resumes_where_it_stopped(old_run, tmp_path):
    proc = _cli("distlstm.train", "--train.run_dir", old_run, "--data.cache_dir", tmp_path / "cache",
                "--train.max_steps", "6", *FLAGS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout, proc.stdout[-3000:]
    assert json.loads((old_run / "final.json").read_text())["step"] == 6

"""Gradient equivalence: accumulation and data parallelism must not change the gradient.

A failure means the loss is normalised per micro-batch or per rank instead of by the global item
count, or that no_sync/DDP averaging is mis-applied: training would then silently depend on
accum_steps and on the number of GPUs. Real processes (torchrun, gloo on CPU), float64, so the
tolerance is tight.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


def run_step(tmp_path: Path, *, nproc: int, accum: int, task: str, one_batch: bool = False,
             batches: int = 4, bucket_mb: float = 25.0) -> dict:
    out = tmp_path / f"grads-{nproc}-{accum}-{task}-{one_batch}-{bucket_mb}.pt"
    worker = [str(ROOT / "tests" / "_step_worker.py"), "--accum", str(accum), "--task", task,
              "--batches", str(batches), "--bucket-mb", str(bucket_mb), "--out", str(out)] + \
        (["--one-batch"] if one_batch else [])
    if nproc == 1:
        cmd = [sys.executable] + worker
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--standalone"] + worker
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).norm() / max(b[name].norm(), 1e-30)
        assert err < rtol, f"{name}: relative difference {err:.2e}"
        assert b[name].norm() > 0, f"{name}: zero gradient, the comparison would be vacuous"


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_accumulation_equals_one_big_batch(tmp_path, task):
    accumulated = run_step(tmp_path, nproc=1, accum=4, task=task)
    big = run_step(tmp_path, nproc=1, accum=1, task=task, one_batch=True)
    assert_close(accumulated, big)


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_two_ranks_with_accumulation_equal_one_rank(tmp_path, task):
    two_ranks = run_step(tmp_path, nproc=2, accum=2, task=task)
    one_rank = run_step(tmp_path, nproc=1, accum=1, task=task, one_batch=True)
    assert_close(two_ranks, one_rank)


def test_ddp_static_graph_and_small_buckets_keep_the_gradient(tmp_path):
    """train.accum_steps=1 turns DDP's static_graph on (ddp_static_graph=auto); tiny buckets split
    the gradients over many all-reduces. Neither may change the gradient."""
    two_ranks = run_step(tmp_path, nproc=2, accum=1, task="lm", batches=2, bucket_mb=0.001)
    one_rank = run_step(tmp_path, nproc=1, accum=1, task="lm", batches=2, one_batch=True)
    assert_close(two_ranks, one_rank)


def run_stream_step(tmp_path: Path, *, nproc: int, global_rows: int = 6, state_reset: float = 0.0) -> dict:
    from tests._stream_data import documents, write_stream_parquet
    data = tmp_path / "stream" / "s.parquet"
    if not data.exists():
        write_stream_parquet(data, documents(40, seed=9, min_len=5, max_len=40, vocab=40), piece=13, rows_per_group=6)
    out = tmp_path / f"stream-grads-{nproc}-{state_reset}.pt"
    worker = [str(ROOT / "tests" / "_stream_worker.py"), "--data", str(data), "--cache", str(tmp_path / "cache"),
              "--global-rows", str(global_rows), "--state-reset", str(state_reset), "--out", str(out)]
    cmd = [sys.executable] + worker if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
        *worker]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("state_reset", [0.0, 0.4])
def test_two_rank_stream_gradients_equal_one_rank(tmp_path, state_reset):
    """lm stream mode: 2 ranks x 3 rows equal 1 rank x 6 rows, in the second step (the LSTM state
    carried across chunks and steps; documents reset it, and with data.state_reset random chunk
    starts, drawn per global row), with accumulation over 2 chunks."""
    assert_close(run_stream_step(tmp_path, nproc=2, state_reset=state_reset),
                 run_stream_step(tmp_path, nproc=1, state_reset=state_reset))


def test_per_micro_batch_normalisation_would_be_caught(tmp_path):
    """The batches differ in size, so averaging per micro-batch gives a different gradient: the
    equivalence above is not vacuous."""
    from tests._step_worker import make_batches
    batches = make_batches("classify", 4)
    sizes = [len(b.lengths) for b in batches]
    assert len(set(sizes)) == 4

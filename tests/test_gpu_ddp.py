"""The multi-rank path on one GPU (opt-in: skipped without CUDA; bench/gpu_check.sh runs it as its
`ddp` part). Through the real CLI:

- DDP forced on in one process (`--train.ddp on`) over NCCL: CUDA graphs (after DDP's warm-up
  iterations) against eager, same batches; a bidirectional model (host lengths that DDP must not
  move to the GPU: issue 18, defect 3);
- two torchrun ranks sharing one GPU over gloo: `train.cuda_graphs=auto` stays off (gloo's
  all-reduce cannot be captured: defect 4) and the run matches one process with accum_steps 2.

A failure means a user with one node of GPUs would hit it at step 1 or get other numbers than the
eager path. On CPU the same commands (without graphs) are covered by tests/test_train.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model.hidden_size", "64", "--data.synthetic_samples", "2000", "--log.progress", "false",
          "--train.eval_every", "0", "--data.max_tokens", "2048", "--data.shape_buckets", "8",
          "--train.device", "cuda", "--data.num_workers", "1", "--train.precision", "fp32"]


def train(tmp_path: Path, run: str, *args: str, nproc: int = 1) -> tuple[Path, str]:
    run_dir = tmp_path / run
    env = {**os.environ, "DISTLSTM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    proc = subprocess.run(launcher + ["-m", "distlstm.train", "--train.run_dir", str(run_dir), *COMMON, *args],
                          env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return run_dir, proc.stdout


def params(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_close(a: dict, b: dict, tol: float) -> None:
    for name in a:
        err = float((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12))
        assert err < tol, f"{name}: relative difference {err:.2e}"


def test_one_rank_nccl_ddp_graphs_match_eager(tmp_path):
    steps = ["--train.max_steps", "40", "--train.ddp", "on", "--train.backend", "nccl"]
    eager, _ = train(tmp_path, "eager", *steps, "--train.cuda_graphs", "off")
    graphed, out = train(tmp_path, "graphed", *steps, "--train.cuda_graphs", "on")
    assert "ddp: DistributedDataParallel over 1 rank" in out
    summary = [line for line in out.splitlines() if line.startswith("cuda graphs:") and "replayed" in line]
    assert summary and " 0 steps replayed" not in summary[-1], out[-3000:]
    # cuDNN may pick other algorithms inside a capture: close, not bit-equal.
    assert_close(params(eager), params(graphed), 1e-4)


def test_one_rank_nccl_ddp_bidirectional_trains(tmp_path):
    run_dir, out = train(tmp_path, "bidir", "--train.max_steps", "10", "--train.ddp", "on", "--train.backend", "nccl",
                         "--model.bidirectional", "true")
    assert "ddp: DistributedDataParallel over 1 rank" in out
    assert json.loads((run_dir / "final.json").read_text())["step"] == 10


def test_two_gloo_ranks_on_one_gpu_match_one_process(tmp_path):
    common = ["--train.max_steps", "8", "--train.backend", "gloo"]
    two, out = train(tmp_path, "two", *common, nproc=2)
    assert "torchrun, 2 ranks" in out and "cuda graphs: off" in out, out[-3000:]
    one, _ = train(tmp_path, "one", *common, "--train.accum_steps", "2", "--train.backend", "auto")
    assert_close(params(one), params(two), 1e-4)

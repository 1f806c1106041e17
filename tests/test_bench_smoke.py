"""Smoke run of bench/gpu_e2e.py, the GPU measurement of issue 8, at tiny sizes on CPU.

A failure means the benchmark a GPU session runs in one go (bench/gpu_check.sh) is broken before
anyone gets a GPU to run it, or that without CUDA it would print verdicts instead of "not measured".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_e2e_tiny_runs_and_says_not_measured_without_cuda(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_e2e.py"), "--tiny", "--samples", "500", "--steps", "12",
                           "--random-batches", "2", "--wordlm-steps", "12", "--wordlm-bare-steps", "5", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    ragged = results["ragged"]
    for row in ("distlstm eager", "distlstm cuda graphs"):
        assert ragged[row]["steps"] == 12 and ragged[row]["steady"]["tokens_per_s"] > 0
    assert ragged["bare sorted"]["padding"] < ragged["bare random 256"]["padding"]
    assert results["wordlm"]["textbook fp32"] > 0 and results["wordlm"]["textbook bf16"] > 0
    assert len(results["checks"]) == 5
    if not torch.cuda.is_available():
        assert all(c["verdict"].startswith("not measured") for c in results["checks"])
        assert "PASS" not in proc.stdout and "FAIL" not in proc.stdout

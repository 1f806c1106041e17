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
                           "--random-batches", "2", "--log-every", "3", "--wordlm-steps", "12", "--wordlm-bare-steps", "5", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    ragged = results["ragged"]
    for row in ("distlstm eager", "distlstm cuda graphs"):
        steady = ragged[row]["steady"]
        assert ragged[row]["steps"] == 12 and steady["tokens_per_s"] > 0
        # A wall-clock rate over the steps after the first half (12 // 2), from the records'
        # timestamps: records every 3 steps, so the span starts at the record of step 6.
        assert steady["steps"] == 6 and steady["seconds"] > 0
    # Graphs on and off are compared on the same batches (same shapes), and the bare loop trains on
    # those batches too (issue 18, item 8): not on a batching of its own.
    assert ragged["same batches"] is True
    assert ragged["bare same batches"]["batches"] == 12
    assert ragged["bare same batches"]["padding"] < ragged["bare random 256"]["padding"]
    wordlm = results["wordlm"]
    assert "--data.lm_mode stream" in wordlm["distlstm stream"]["command"]
    assert wordlm["distlstm stream"]["steady"]["tokens_per_s"] > 0 and wordlm["textbook fp32"] > 0
    checks = {c["check"]: c for c in results["checks"]}
    assert len(checks) == 7 and "distlstm cuda graphs / distlstm eager, same batches" in checks
    assert "word LM, stream mode: distlstm / textbook fp32 loop" in checks
    if not torch.cuda.is_available():
        assert all(c["verdict"].startswith("not measured") for c in results["checks"])
        assert "PASS" not in proc.stdout and "FAIL" not in proc.stdout

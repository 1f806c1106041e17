"""DataLoader workers start and train under every multiprocessing start method.

Python 3.14 makes forkserver the default on Linux (fork before it); spawn is what macOS and CUDA
users pick. A failure means that under that start method the workers die at start ("DataLoader
worker exited unexpectedly": a worker's parent is the forkserver there, not the training process,
which `workers._die_with_parent` must allow for) or that something a worker needs does not survive
being pickled to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One interpreter for the three methods (torch is imported once); each trains 2 steps with 1 worker
# (batch loader, the embedded classify data) and 2 steps of lm stream mode with its worker.
SCRIPT = textwrap.dedent("""
    import multiprocessing, sys
    from distlstm.train import main
    from distlstm.data.prep import prep
    tmp = sys.argv[1]
    with open(f"{tmp}/lm.txt", "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 400)
    prep.main(["--text", f"{tmp}/lm.txt", "--seq-len", "32", "--rows-per-group", "16", "--out", f"{tmp}/lm",
               "--quiet"])
    small = ["--model.hidden_size", "16", "--model.embed_size", "8", "--log.progress", "false",
             "--train.eval_every", "0", "--train.max_steps", "2", "--data.num_workers", "1",
             "--checkpoint.at_end", "false", "--log.tensorboard", "false"]
    for method in ("fork", "spawn", "forkserver"):
        multiprocessing.set_start_method(method, force=True)
        assert main(small + ["--train.run_dir", f"{tmp}/run-{method}", "--data.synthetic_samples", "300"]) == 0
        assert main(small + ["--train.run_dir", f"{tmp}/lm-{method}", "--data.train", f"{tmp}/lm/train",
                             "--data.valid", f"{tmp}/lm/valid", "--model.task", "lm",
                             "--data.batch_size", "4", "--data.bptt", "8"]) == 0
        print("trained", method, flush=True)
""")


@pytest.mark.timeout(240)
def test_workers_train_under_fork_spawn_and_forkserver(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DISTLSTM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=220, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("trained")] == [
        "trained fork", "trained spawn", "trained forkserver"], out[-4000:]
    assert "exited unexpectedly" not in out

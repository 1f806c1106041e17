"""`python -m distlstm.export` is atomic and never writes where it must not (issue 20 class 5).

A failure here means a stopped export (SIGTERM from a scheduler or a timeout, SIGKILL) leaves a
folder that `distlstm.load` accepts although its model was never checked, an earlier export is lost
before the new one succeeded, or `--out` pointing into a run's checkpoints writes into them. Every
export is a real subprocess, stopped with a real signal while it writes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distlstm

from tests._zygote import run as zygote_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def env(cache: Path) -> dict:
    return {**os.environ, "DISTLSTM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cli(module: str, *args, cache: Path, **kw) -> subprocess.CompletedProcess:
    """`python -m module args`, forked from the test zygote (tests/_zygote.py)."""
    return zygote_run([sys.executable, "-m", module, *map(str, args)], env=env(cache), timeout=240, **kw)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small finished run of the embedded default task, with its checkpoint at step 4."""
    tmp = tmp_path_factory.mktemp("export")
    run_dir = tmp / "run"
    proc = cli("distlstm.train", "--model.hidden_size", "16", "--data.synthetic_samples", "400",
               "--data.max_tokens", "512", "--train.max_steps", "4", "--train.eval_every", "0",
               "--log.progress", "false", "--log.tensorboard", "false", "--train.run_dir", run_dir, cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, tmp / "cache"


def loadable(folder: Path) -> list[Path]:
    """Every folder under `folder` (itself included) that distlstm.load accepts."""
    found = []
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        try:
            distlstm.load(path)
        except (ValueError, OSError):
            continue
        found.append(path)
    return found


def export_stopped(run_dir: Path, out: Path, cache: Path, sig: int) -> subprocess.CompletedProcess:
    """Start an onnx export and send `sig` as soon as its partial folder holds the weights (the
    ONNX graph and the round-trip check still to come)."""
    proc = subprocess.Popen([sys.executable, "-m", "distlstm.export", str(run_dir), "--format", "onnx",
                             "--out", str(out)], env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.partial-*/model.safetensors")):
        assert proc.poll() is None, f"export ended before it was signalled: {proc.communicate()}"
        assert time.monotonic() < deadline, "export never started writing"
        time.sleep(0.005)
    os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigterm_during_export_leaves_nothing_load_accepts_and_keeps_the_earlier_export(run, tmp_path):
    pytest.importorskip("onnxruntime")
    run_dir, cache = run
    out = tmp_path / "exported"
    stopped = export_stopped(run_dir, tmp_path / "fresh", cache, signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "export stopped by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a stopped export left files behind"

    first = cli("distlstm.export", run_dir, "--format", "safetensors", "--out", out, cache=cache)
    assert first.returncode == 0, first.stderr
    before = digest(out)
    stopped = export_stopped(run_dir, out, cache, signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert digest(out) == before, "the earlier export changed although the new one was stopped"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert loadable(tmp_path) == [out]


def test_sigkill_during_export_leaves_a_partial_folder_load_refuses(run, tmp_path):
    pytest.importorskip("onnxruntime")
    run_dir, cache = run
    out = tmp_path / "exported"
    export_stopped(run_dir, out, cache, signal.SIGKILL)
    assert not out.exists()
    [partial] = tmp_path.iterdir()
    assert partial.name.startswith(".exported.partial-") and (partial / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="unfinished export"):
        distlstm.load(partial)
    assert loadable(tmp_path) == []
    again = cli("distlstm.export", run_dir, "--format", "onnx", "--out", out, cache=cache)
    assert again.returncode == 0, again.stderr
    assert loadable(tmp_path) == [out] and (out / "model.onnx").is_file()


def test_a_new_export_replaces_an_earlier_one_only_after_success(run, tmp_path):
    run_dir, cache = run
    out = tmp_path / "exported"
    assert cli("distlstm.export", run_dir, "--format", "torchscript", "--out", out, cache=cache).returncode == 0
    assert (out / "model.torchscript.pt").is_file()
    before = digest(out)
    failed = cli("distlstm.export", run_dir, "--format", "safetensors", "--out", out, "--atol", "-1", cache=cache)
    assert failed.returncode == 2 and "nothing was written to the --out folder" in failed.stderr, failed.stderr
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert cli("distlstm.export", run_dir, "--format", "safetensors", "--out", out, cache=cache).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no stale .pt


@pytest.mark.parametrize("where", ["checkpoints", "step", "file", "other_folder"])
def test_out_that_export_must_not_write_is_refused_in_one_line(run, tmp_path, where):
    run_dir, cache = run
    [step] = sorted((run_dir / "checkpoints").glob("step-*"))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    out, flag_fix = {"checkpoints": (run_dir / "checkpoints" / "exported", "a folder of its own"),
                     "step": (step, "a folder of its own"),
                     "file": (tmp_path / "file", "give --out a folder"),
                     "other_folder": (other, "a new or empty folder")}[where]
    before = digest(run_dir), digest(tmp_path)
    proc = cli("distlstm.export", run_dir, "--format", "safetensors", "--out", out, cache=cache)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out} ") and flag_fix in lines[0], proc.stderr
    assert (digest(run_dir), digest(tmp_path)) == before

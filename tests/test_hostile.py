"""Hostile conditions around a whole run: planted checkpoint files, stop signals to every process,
two runs in one directory, a full disk, Ctrl-C (issue 11, items 1-3, 10 and 11).

A failure here means an attacker who can write the run directory gets code executed at the next
resume, a preempted job loses its checkpoint because a DataLoader worker died of the signal meant
for the job, two runs started in one run directory destroy each other's checkpoints, a failed save
or Ctrl-C ends in a traceback, or a bad checkpoint stops the resume instead of falling back to the
previous valid one. Every run is a real subprocess (tests/_resume_util.py injects the fault at a
chosen step), with a timeout; the data are the embedded synthetic set.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from distlstm.checkpoint.manager import CheckpointManager, verify_checkpoint
from distlstm.checkpoint.guard import KEY_ENV, SIGNATURE
from distlstm.run.rundir import LOCK_NAME, RunDirLocked, RunLock, me
from tests.test_resume import final, launch, ok, preempted, resumed_step, tracebacks, valid_checkpoints

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]

BASE = ["--data.synthetic_samples", "1000", "--model.hidden_size", "32", "--data.max_tokens", "1024",
        "--train.eval_every", "0", "--log.progress", "false", "--log.tensorboard", "false",
        "--log.every_steps", "4", "--model.dropout", "0.1", "--data.num_workers", "1", "--train.eval_max_batches", "2"]
STEPS = 16
RUN = BASE + ["--train.max_steps", str(STEPS), "--checkpoint.every_steps", "4"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def clean(workdir) -> dict:
    """The uninterrupted single-process run that interrupted-and-resumed ones must reproduce."""
    run_dir = workdir / "runs" / "clean"
    ok(launch(run_dir, RUN))
    return final(run_dir)


# ---------------------------------------------------------------- 1 + 10: planted checkpoint files


class _Payload:
    """Unpickling this runs `code` (what an attacker would put into a checkpoint file)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _rewrite(step_dir: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and update MANIFEST.json to match, as anyone with write access can."""
    (step_dir / name).write_bytes(data)
    manifest = json.loads((step_dir / "MANIFEST.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))


def plant_metadata(step_dir: Path, marker: Path) -> None:
    """A .metadata that is the real DCP metadata plus an attribute whose unpickling creates `marker`:
    with plain pickle.load it runs, then loads like the genuine file (nothing looks wrong)."""
    metadata = pickle.loads((step_dir / ".metadata").read_bytes())
    metadata.note = _Payload(f"open({str(marker)!r}, 'w').close()")
    _rewrite(step_dir, ".metadata", pickle.dumps(metadata))


def plant_rank_state(step_dir: Path, marker: Path) -> None:
    """A rank-00000.pt holding a pickled callable: torch.load(weights_only=True) refuses it."""
    path = step_dir / "rank-00000.pt"
    state = torch.load(path, weights_only=True)
    state["evil"] = _Payload(f"open({str(marker)!r}, 'w').close()")
    torch.save(state, path)
    _rewrite(step_dir, "rank-00000.pt", path.read_bytes())


def test_planted_checkpoint_files_never_run_and_resume_falls_back(workdir, clean):
    """Items 1 and 10: step 16's .metadata carries a pickle payload and step 12's rank state a pickled
    callable, each with MANIFEST.json updated to match. The restart runs neither, says why it skips
    them, resumes from step 8 and still ends with the uninterrupted run's parameters."""
    run_dir = workdir / "runs" / "planted"
    ok(launch(run_dir, RUN))
    ckpts = run_dir / "checkpoints"
    marker_md, marker_pt = workdir / "pwned-metadata", workdir / "pwned-pt"
    plant_metadata(ckpts / "step-000016", marker_md)
    plant_rank_state(ckpts / "step-000012", marker_pt)
    (run_dir / "final.json").unlink()  # so that the restart trains again

    run = ok(launch(run_dir, RUN))
    assert not marker_md.exists() and not marker_pt.exists(), "a planted checkpoint file ran its payload"
    assert re.search(r"skipping \S+step-000016: \S+\.metadata: refused: refers to builtins\.exec", run.out), run.out
    assert re.search(r"skipping \S+step-000012: rank-00000\.pt does not load with torch\.load\(weights_only=True\)",
                     run.out), run.out
    assert resumed_step(run) == 8, run.out[-3000:]
    assert final(run_dir)["param_hash"] == clean["param_hash"]


def test_manifest_signing_refuses_unsigned_and_mis_signed(tmp_path, monkeypatch):
    """DISTLSTM_CHECKPOINT_KEY: a checkpoint signed with the key loads; with another key, unsigned, or
    with MANIFEST.json edited after signing it is invalid (so load_latest falls back past it)."""
    model = torch.nn.Linear(3, 2)
    state = {"model": model, "optim": None, "extra": {}, "rank_state": {}}
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1, log=lambda m: None)
    mgr.save(1, state)  # unsigned: no key yet
    monkeypatch.setenv(KEY_ENV, "k1")
    mgr.save(2, state)
    mgr.save(3, state)
    step = lambda n: tmp_path / f"step-{n:06d}"  # noqa: E731
    assert (step(2) / SIGNATURE).is_file() and not (step(1) / SIGNATURE).exists()
    assert verify_checkpoint(step(2)) == []
    assert "not signed" in verify_checkpoint(step(1))[0]
    manifest = json.loads((step(3) / "MANIFEST.json").read_text())
    manifest["note"] = "edited"
    (step(3) / "MANIFEST.json").write_text(json.dumps(manifest))
    assert "does not match MANIFEST.json" in verify_checkpoint(step(3))[0]
    monkeypatch.setenv(KEY_ENV, "k2")
    assert "does not match MANIFEST.json" in verify_checkpoint(step(2))[0]
    monkeypatch.setenv(KEY_ENV, "k1")
    loaded = CheckpointManager(tmp_path, rank=0, world_size=1, log=lambda m: None).load_latest(state)
    assert loaded["step"] == 2


def test_metadata_entries_that_would_unpickle_bytes_are_refused(tmp_path):
    """A BytesStorageMetadata entry makes DCP torch.load(weights_only=False) the bytes it points at
    (a second way to run code); a storage entry may not point outside the checkpoint either."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    model = torch.nn.Linear(3, 2)
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1, log=lambda m: None)
    for step, edit in ((1, "bytes"), (2, "path")):
        path = mgr.save(step, {"model": model, "optim": None, "extra": {}, "rank_state": {}})
        metadata = pickle.loads((path / ".metadata").read_bytes())
        if edit == "bytes":
            metadata.state_dict_metadata["model.weight"] = BytesStorageMetadata()
        else:
            for info in metadata.storage_data.values():
                info.relative_path = "../../etc/passwd"
        _rewrite(path, ".metadata", pickle.dumps(metadata))
    assert "BytesStorageMetadata" in verify_checkpoint(tmp_path / "step-000001")[0]
    assert "outside the checkpoint" in verify_checkpoint(tmp_path / "step-000002")[0]


# ---------------------------------------------------------------- 2: SIGTERM to every process


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_every_process_commits_and_resumes_bit_exact(workdir, nproc, clean):
    """Item 2: SIGTERM to the whole process group (1 process: `kill -TERM -<pgid>`; torchrun: every
    process of the job, torchrun included, as scancel does) with one DataLoader worker per rank.
    The workers ignore it, the trainer commits a checkpoint at the step boundary, and the restart
    continues bit-exactly."""
    if nproc == 1:
        reference = clean
    else:
        ref_dir = workdir / "runs" / "clean-2"
        ok(launch(ref_dir, RUN, nproc=2))
        reference = final(ref_dir)
    run_dir = workdir / "runs" / f"sigterm-all-{nproc}"
    target = "group" if nproc == 1 else "job"
    first = preempted(launch(run_dir, RUN, nproc=nproc, fault={"action": "signal", "sig": "SIGTERM", "step": 6,
                                                             "rank": 0, "target": target}), nproc=nproc)
    assert "preempted (SIGTERM): checkpoint committed at step 6" in first.out, first.out[-4000:]
    assert "DataLoader worker" not in first.out, first.out[-4000:]
    assert not (run_dir / "final.json").exists()
    second = ok(launch(run_dir, RUN, nproc=nproc))
    assert resumed_step(second) == 6, second.out[-3000:]
    assert final(run_dir)["param_hash"] == reference["param_hash"], "resumed run diverged from the clean one"


# ---------------------------------------------------------------- 11: Ctrl-C


def test_ctrl_c_commits_a_checkpoint_and_exits_130_in_one_line(workdir):
    """Item 11: SIGINT (to the process group, as a terminal sends it) stops at the next step boundary
    with a valid checkpoint and exit 130, one line, no KeyboardInterrupt traceback (resuming from it
    is the SIGTERM test's). A second Ctrl-C exits at once, without a checkpoint."""
    run_dir = workdir / "runs" / "ctrl-c"
    first = launch(run_dir, RUN, fault={"action": "signal", "sig": "SIGINT", "step": 6, "target": "group"})
    assert first.rc == 130, first.out[-3000:]
    assert "Traceback" not in first.out and "KeyboardInterrupt" not in first.out, first.out[-3000:]
    assert first.out.strip().splitlines()[-1].startswith("interrupted (SIGINT): checkpoint committed at step 6 ")
    assert [p.name for p in valid_checkpoints(run_dir)] == ["step-000004", "step-000006"]

    twice = workdir / "runs" / "ctrl-c-twice"
    run = launch(twice, RUN, fault={"action": "signal", "sig": "SIGINT", "step": 6, "target": "group", "times": 2})
    assert run.rc == 130, run.out[-3000:]
    assert "interrupted again: exiting now, without a checkpoint" in run.out and "Traceback" not in run.out
    assert [p.name for p in valid_checkpoints(twice)] == ["step-000004"]


# ---------------------------------------------------------------- 3: two runs, one run directory


def test_second_run_in_a_locked_run_dir_refuses_fast_and_the_first_completes(workdir):
    """Item 3: run A pauses at step 5 while run B starts in the same directory with another config.
    B exits non-zero within seconds, naming A; A then finishes with its own config.toml, every
    checkpoint valid and its metrics in order."""
    run_dir = workdir / "runs" / "locked"
    ready, go = workdir / "locked.ready", workdir / "locked.go"
    result = {}
    first = threading.Thread(target=lambda: result.update(a=launch(run_dir, RUN, fault={
        "action": "pause", "step": 5, "ready": str(ready), "go": str(go)})))
    first.start()
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline and first.is_alive():
            time.sleep(0.05)
        assert ready.exists(), "run A never reached step 5"
        # Not through launch(): its cleanup kills every process of the run directory, run A included.
        env = {**os.environ, "DISTLSTM_CACHE": str(workdir / "cache"), "PYTHONPATH": str(ROOT)}
        env.pop("DISTLSTM_TEST_FAULT", None)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "distlstm.train", "--train.run_dir", str(run_dir), *BASE,
                                 "--train.max_steps", "3", "--optim.lr", "0.007"],
                                env=env, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        go.touch()
        first.join(timeout=200)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert elapsed < 30, f"the second run took {elapsed:.0f}s to give up"
    assert re.search(rf"run directory {re.escape(str(run_dir))} is in use by pid \d+ on host \S+, started ",
                     second.stderr), second.stderr[-2000:]
    ok(result["a"])
    assert final(run_dir)["step"] == STEPS
    assert "lr = 0.003" in (run_dir / "config.toml").read_text()
    assert [p.name for p in valid_checkpoints(run_dir)] == ["step-000008", "step-000012", "step-000016"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)), f"metrics of two runs interleaved: {steps}"
    assert not (run_dir / LOCK_NAME).exists(), "the lock outlived the run"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_rules(tmp_path, monkeypatch):
    """A lock left by a dead process on this host, or by an earlier attempt of the same job (a SLURM
    requeue on another node), is taken over with a message; a lock from another host is refused,
    and so is one held by a live process."""
    lock_file = tmp_path / LOCK_NAME
    mine = me()
    messages: list[str] = []

    def attempt(holder: dict) -> RunLock:
        lock_file.write_text(json.dumps(holder))
        lock = RunLock(tmp_path)
        lock.acquire(messages.append)
        return lock

    attempt({**mine, "pid": _dead_pid(), "pid_start": "1"}).release()
    assert "that process is gone" in messages[-1] and not lock_file.exists()

    other_host = {**mine, "host": "node-b." + socket.gethostname(), "boot_id": "x", "pid": 1, "job": None}
    with pytest.raises(RunDirLocked, match="in use by pid 1 on host node-b"):
        attempt(other_host)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    attempt({**other_host, "job": "SLURM_JOB_ID=4242"}).release()
    assert "an earlier attempt of this job" in messages[-1]

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from distlstm.run.rundir import _process_start
        with pytest.raises(RunDirLocked, match=f"in use by pid {live.pid} "):
            attempt({**mine, "pid": live.pid, "pid_start": _process_start(live.pid)})
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- 10: a full disk during a save


def test_failed_save_is_one_line_and_the_restart_resumes(workdir):
    """Item 10: from step 5 on no file may grow past 64 KiB (RLIMIT_FSIZE: writes fail with EFBIG, as
    with ENOSPC on a full disk), so the step-8 save fails inside DCP with a CheckpointException (a
    BaseException). The run stops with one line naming the step and the error, not a 22-frame
    traceback, and the restart resumes from step 4."""
    run_dir = workdir / "runs" / "disk-full"
    run = launch(run_dir, RUN, fault={"action": "fsize", "step": 5, "bytes": 65536})
    assert run.rc == 2, run.out[-3000:]
    assert not tracebacks(run.out, killed=False), run.out[-3000:]
    line = next(x for x in run.out.splitlines() if x.startswith("error: "))
    assert re.search(r"checkpoint for step 8 was not committed .*rank 0: OSError: \[Errno 27\] File too large", line), line
    assert "start the same command again" in line
    again = ok(launch(run_dir, RUN))
    assert resumed_step(again) == 4

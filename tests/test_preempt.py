"""Preemption: a signal becomes a clean stop on the same step on every rank, then a requeue.

A failure here means a preempted job loses its work (no stop at a step boundary), hangs (ranks
disagree about stopping and one waits in a collective forever), requeues when the user cancelled, or
exits 0 so that a wrapper or scheduler takes a stopped run for a finished one.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distlstm.distributed.preempt import EXIT_PREEMPTED, PreemptionHandler
from distlstm.distributed.world import SINGLE

ROOT = Path(__file__).resolve().parents[1]

# A stand-in trainer: every "step" sleeps, prints, then asks whether all ranks agree to stop.
LOOP = textwrap.dedent("""
    import sys, time
    from distlstm.distributed.preempt import PreemptionHandler
    from distlstm.distributed.world import detect_world, init_process_group, destroy_process_group
    world = detect_world()
    init_process_group(world, backend="gloo", timeout_s=60)
    handler = PreemptionHandler().install()
    for step in range(1, 3000):
        time.sleep(0.01)
        print(f"step {step}", flush=True)
        if handler.agreed_stop(world):
            print(f"stopped {step} {handler.signal_name}", flush=True)
            break
    destroy_process_group()
""")


def start(env_extra, stdout):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD"))}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", LOOP], env=env, stdout=stdout, text=True)


def signal_after(proc, step, sig=signal.SIGUSR1):
    """Read proc's stdout until it printed `step`, then send `sig`; return the remaining output."""
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.strip() == f"step {step}":
            os.kill(proc.pid, sig)
            break
    out, _ = proc.communicate(timeout=60)
    return lines + out.splitlines()


def stopped_at(lines):
    stops = [line for line in lines if line.startswith("stopped")]
    assert len(stops) == 1, lines[-5:]
    _, step, name = stops[0].split()
    return int(step), name


@pytest.mark.timeout(120)
def test_single_process_stops_at_next_step_boundary():
    proc = start({}, subprocess.PIPE)
    lines = signal_after(proc, 3)
    assert proc.returncode == 0
    step, name = stopped_at(lines)
    assert name == "SIGUSR1" and 3 <= step < 3000
    # The flag is checked right after each step: the last step printed is the stop step.
    assert lines[-2:] == [f"step {step}", f"stopped {step} SIGUSR1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_ranks_agree_when_only_rank1_is_signalled(tmp_path):
    base = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))
    with open(tmp_path / "rank0.out", "w") as out0:
        rank0 = start(dict(base, RANK="0", LOCAL_RANK="0"), out0)
        rank1 = start(dict(base, RANK="1", LOCAL_RANK="1"), subprocess.PIPE)
        try:
            lines1 = signal_after(rank1, 20)
            rank0.wait(timeout=60)
        finally:
            for p in (rank0, rank1):
                p.kill() if p.poll() is None else None
    assert rank0.returncode == 0 and rank1.returncode == 0
    step1, name1 = stopped_at(lines1)
    step0, name0 = stopped_at((tmp_path / "rank0.out").read_text().splitlines())
    assert step0 == step1 >= 20
    assert (name0, name1) == ("None", "SIGUSR1")  # rank 0 stopped only by agreement


def test_handler_only_records_and_uninstall_restores():
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.agreed_stop(SINGLE)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.agreed_stop(SINGLE) and handler.signal_name == "SIGUSR1"  # first wins
    assert signal.getsignal(signal.SIGUSR1) is previous


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A `scontrol` on PATH that logs its arguments; exits with $FAKE_SCONTROL_RC."""
    calls = tmp_path / "calls"
    script = tmp_path / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit ${{FAKE_SCONTROL_RC:-0}}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    return lambda: calls.read_text().splitlines() if calls.exists() else []


def handler_got(sig):
    handler = PreemptionHandler()
    handler.received = sig
    return handler


@pytest.mark.parametrize("sig,env,expect_requeue", [
    (signal.SIGUSR1, {"SLURM_JOB_ID": "77"}, True),
    (signal.SIGUSR1, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, True),
    (signal.SIGUSR1, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"}, False),  # cap reached
    (signal.SIGUSR1, {}, False),                                                  # not SLURM
    (signal.SIGTERM, {"SLURM_JOB_ID": "77"}, False),                              # scancel
    (None, {"SLURM_JOB_ID": "77"}, False),                                        # another rank
])
def test_requeue_decision(fake_scontrol, sig, env, expect_requeue):
    messages = []
    assert handler_got(sig).requeue(2, messages.append, env=env) is expect_requeue
    assert fake_scontrol() == (["requeue 77"] if expect_requeue else [])
    assert messages and messages[-1].startswith("preempt: ")


def test_requeue_reports_scontrol_failure(fake_scontrol, monkeypatch):
    monkeypatch.setenv("FAKE_SCONTROL_RC", "1")
    messages = []
    assert not handler_got(signal.SIGUSR1).requeue(3, messages.append, env={"SLURM_JOB_ID": "9"})
    assert "exited 1" in messages[-1]


# A real trainer (tests/_resume_util.py sends the signal to itself during a chosen step).
TRAIN = ["--data.synthetic_samples", "400", "--model.hidden_size", "16", "--data.max_tokens", "512",
         "--train.eval_every", "0", "--log.progress", "false", "--log.tensorboard", "false",
         "--data.num_workers", "0", "--train.max_steps", "8", "--checkpoint.every_steps", "100"]


def train(run_dir, env_extra=None, fault=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD", "LOCAL_RANK",
                                                                        "MASTER_", "DISTLSTM_TEST_FAULT"))}
    env.update(env_extra or {}, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               DISTLSTM_CACHE=str(run_dir.parent / "cache"))
    if fault:
        env["DISTLSTM_TEST_FAULT"] = json.dumps(fault)
    return subprocess.run([sys.executable, str(ROOT / "tests" / "_resume_util.py"), "--train.run_dir", str(run_dir),
                           *TRAIN], env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig,slurm", [("SIGTERM", False), ("SIGUSR1", True)])
def test_preempted_run_exits_75_then_the_same_command_finishes_with_0(tmp_path, fake_scontrol, sig, slurm):
    """A stop signal mid-run commits a checkpoint and exits EXIT_PREEMPTED (75), not 0: a wrapper or
    scheduler must not take it for finished. Under SLURM (SLURM_JOB_ID, a `scontrol` on PATH) SIGUSR1
    still requeues the job before that exit; the same command then resumes and exits 0."""
    run_dir = tmp_path / "run"
    env = {"SLURM_JOB_ID": "77", "PATH": os.environ["PATH"]} if slurm else {}
    first = train(run_dir, env, fault={"action": "signal", "sig": sig, "step": 3})
    out = first.stdout + first.stderr
    assert first.returncode == EXIT_PREEMPTED == 75, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert f"preempted ({sig}): checkpoint committed at step 3" in out and "exit status 75" in out, out[-3000:]
    assert not (run_dir / "final.json").exists()
    assert fake_scontrol() == (["requeue 77"] if slurm else [])
    if slurm:
        assert "preempt: requeued job 77" in out, out[-3000:]
    second = train(run_dir, env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "resumed from" in second.stdout and "at step 3" in second.stdout, second.stdout[-3000:]
    assert json.loads((run_dir / "final.json").read_text())["step"] == 8

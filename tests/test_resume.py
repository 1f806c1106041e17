"""Interrupted training resumes as if it had never stopped: through the real CLI, 1 process and torchrun.

A failure here means a preempted, killed or restarted job does not continue the run it belongs to:
a resumed run ends with different parameters than an uninterrupted one (an RNG stream, the data
position, the LR schedule, optimizer state or a checkpoint's content is not restored exactly), a
run resumed on a different number of ranks repeats or skips samples of the epoch in progress or
forgets what it learned, a SIGKILL at an unlucky moment (mid-save, mid-delete) leaves no loadable
checkpoint behind, or the death of one rank hangs the job instead of failing it (or restarting it).

Faults are injected by tests/_resume_util.py at a chosen step or code point (see its docstring), so
the tests are deterministic: a signal goes through the real handler, a SIGKILL is a real SIGKILL.
Every run is a subprocess in its own session with a timeout; the session is killed afterwards, which
also ends the DataLoader workers a SIGKILLed trainer leaves behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from distlstm.checkpoint.manager import verify_checkpoint
from distlstm.distributed.preempt import EXIT_PREEMPTED
from tests._zygote import zygote

ROOT = Path(__file__).resolve().parents[1]
UTIL = ROOT / "tests" / "_resume_util.py"
NUM_SAMPLES = 1000  # --data.synthetic_samples: the train split's sample ids are 0..999

# Everything that makes resuming hard at once: dropout (RNG), accumulation, DataLoader workers
# (prefetch beyond the checkpoint), bf16 autocast, two LSTM layers.
HARD = ["--data.synthetic_samples", str(NUM_SAMPLES), "--model.hidden_size", "32", "--data.max_tokens", "1024",
        "--train.eval_every", "0", "--log.progress", "false", "--log.tensorboard", "false", "--log.every_steps", "1",
        "--train.accum_steps", "2", "--data.num_workers", "2", "--model.dropout", "0.1", "--model.num_layers", "2",
        "--train.precision", "bf16"]
# One process: a checkpoint every step, written in the background (async: committed during the next
# save), and only the newest kept, so most moments of a run are inside a save or a retention delete.
ONE_STEPS = 96
ONE = HARD + ["--train.max_steps", str(ONE_STEPS), "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "1",
             "--checkpoint.async_save", "true"]
# Two ranks: 4 global batches per step (2 ranks x accum 2). A higher lr, so that the loss has fallen
# well below the untrained ln(4) ~ 1.39 by the stop (the continuity check needs the difference).
# An epoch is 37 steps' worth of micro-batches per rank (73 batches: the last round has a filler), so
# step 46 is in epoch 2 with 36 of its 73 batches consumed; a 1-rank resume needs 19 more steps.
TWO_STEPS, TWO_STOP = 72, 46
TWO = HARD + ["--optim.lr", "2e-2", "--train.max_steps", str(TWO_STEPS), "--checkpoint.every_steps", "8",
              "--log.sample_ids", "true"]


@dataclass
class Run:
    rc: int
    out: str
    elapsed: float


def launch(run_dir: Path, args: list[str], *, nproc: int = 1, fault: dict | None = None,
           torchrun_args: tuple[str, ...] = (), env_extra: dict | None = None, timeout: float = 180,
           fresh: bool = False) -> Run:
    """One training process (or one torchrun) on `run_dir` (`<workdir>/runs/<name>`, so that all runs share
    `<workdir>/cache`, the synthetic dataset); output goes to a log file beside it. One process is forked
    from the test zygote (tests/_zygote.py: the same entry point and argv, without the ~2 s of interpreter
    start) unless `fresh`; torchrun is always a fresh interpreter."""
    env = {**os.environ, "DISTLSTM_CACHE": str(run_dir.parent.parent / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DISTLSTM_TEST_FAULT"):
        env.pop(key, None)
    if fault:
        env["DISTLSTM_TEST_FAULT"] = json.dumps(fault)
    env.update(env_extra or {})
    one = nproc == 1 and not torchrun_args
    # --standalone (c10d rendezvous on a free port), as launch/slurm/train-1node.sbatch does.
    cmd = [sys.executable] if one else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *torchrun_args]
    cmd += [str(UTIL), "--train.run_dir", str(run_dir), *args]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    logs = sorted(run_dir.parent.glob(f"{run_dir.name}.*.log"))
    log = run_dir.parent / f"{run_dir.name}.{len(logs):03d}.log"
    start = time.monotonic()
    forks = zygote(env) if one and not fresh else None
    if forks is not None:
        child = forks.launch(cmd[1:], env=env, cwd=os.getcwd(), stdout=str(log))
        try:
            rc = child.wait(timeout)
        finally:
            kill_leftovers(child.pid, run_dir)
            if rc is None:
                child.wait()
    else:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                kill_leftovers(proc.pid, run_dir)
                proc.wait()
    text = log.read_text()
    if rc is None:
        pytest.fail(f"{run_dir.name} (nproc {nproc}, fault {fault}) hung for {timeout}s:\n{text[-4000:]}")
    return Run(rc, text, time.monotonic() - start)


def kill_leftovers(session: int, run_dir: Path) -> None:
    """SIGKILL what a launch left running: its session (a trainer and its DataLoader workers), and
    every process with `run_dir` as an argument, since torchrun starts each worker in a session of
    its own and a SIGKILLed worker leaves its forked DataLoader workers behind."""
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(run_dir) in cmdline.read_bytes().decode(errors="replace").split("\0"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # gone meanwhile, or not ours to read
    # A SIGKILL takes effect a moment later: until the DataLoader workers have exited, the run.lock
    # descriptor they inherited still holds the lock, and the next launch would find the run in use.
    deadline = time.monotonic() + 10
    while in_session(session) and time.monotonic() < deadline:
        time.sleep(0.01)


def in_session(session: int) -> bool:
    """Whether a process of `session` is still exiting or alive: not a zombie, or a zombie leader whose
    other threads are still exiting (they hold its file descriptors, the run.lock among them)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # after "pid (comm)": state, ppid, pgrp, session, ..., num_threads (field 20 of proc(5))
        if int(fields[3]) == session and (fields[0] != "Z" or int(fields[17]) > 1):
            return True
    return False


def ok(run: Run) -> Run:
    assert run.rc == 0, f"exit {run.rc}:\n{run.out[-5000:]}"
    assert "Traceback" not in run.out, run.out[-5000:]
    return run


def preempted(run: Run, *, nproc: int = 1) -> Run:
    """A run stopped by SIGTERM / SIGUSR1 with its checkpoint committed: exit EXIT_PREEMPTED (75), no
    traceback. Under torchrun every worker exits 75 and torchrun itself exits 1, with its own report
    (ChildFailedError naming the workers' exit codes, or SignalException when torchrun was signalled
    too): the only tracebacks allowed."""
    if nproc == 1:
        assert run.rc == EXIT_PREEMPTED, f"exit {run.rc}:\n{run.out[-5000:]}"
        assert "Traceback" not in run.out, run.out[-5000:]
        return run
    assert run.rc == 1, f"exit {run.rc}:\n{run.out[-5000:]}"
    # The first worker to exit 75 makes torchrun's agent SIGTERM the others (-15) after the
    # checkpoint every rank committed together: what resumes is checked by the caller.
    # When torchrun itself was signalled too (scancel, `kill -TERM -<pgid>`), it raises SignalException
    # and shuts the workers down without reporting their exit codes: the workers' own "preempted"
    # line and the resume are what show the checkpoint.
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", run.out))
    assert codes <= {str(EXIT_PREEMPTED), "-15"}, run.out[-5000:]
    assert str(EXIT_PREEMPTED) in codes or "SignalException" in run.out, run.out[-5000:]
    ours = re.sub(r"Traceback \(most recent call last\):.*?(ChildFailedError|SignalException)", "", run.out,
                  flags=re.S)
    assert "Traceback" not in ours, run.out[-5000:]
    return run


def tracebacks(out: str, *, killed: bool) -> list[str]:
    """The tracebacks in a run's output. After a SIGKILL of the trainer, one from a DataLoader worker's
    fd-sharing thread (multiprocessing/resource_sharer.py: its peer vanished mid-handshake) is noise
    of the kill itself, printed just before the session is killed; anything else is a real error."""
    found = re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*.*", out)
    return [t for t in found if not (killed and "multiprocessing/resource_sharer.py" in t.splitlines()[1])]


def final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final.json").read_text())


def resumed_step(run: Run) -> int | None:
    m = re.search(r"^resumed from \S+ at step (\d+)", run.out, re.M)
    return int(m.group(1)) if m else None


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def valid_checkpoints(run_dir: Path) -> list[Path]:
    """Committed (named exactly step-N, not .tmp or .deleting) and passing verification."""
    ckpts = run_dir / "checkpoints"
    found = ckpts.glob("step-*") if ckpts.is_dir() else []
    return sorted(p for p in found if re.fullmatch(r"step-\d+", p.name) and not verify_checkpoint(p))


# ---------------------------------------------------------------- shared runs (module scope)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def clean_one(workdir) -> dict:
    """The uninterrupted single-process run every single-process resume must reproduce."""
    run_dir = workdir / "runs" / "clean-one"
    ok(launch(run_dir, ONE, fresh=True))  # a fresh interpreter: the zygote's launches must match it
    return final(run_dir)


@pytest.fixture(scope="module")
def clean_two(workdir) -> dict:
    run_dir = workdir / "runs" / "clean-two"
    ok(launch(run_dir, TWO, nproc=2))
    return final(run_dir)


@pytest.fixture(scope="module")
def stopped_two(workdir) -> Path:
    """2 ranks, SIGUSR1 to rank 1 only during step TWO_STOP (mid-epoch): both ranks agree to stop
    after that step, commit a checkpoint for it and exit 75 (torchrun: 1). Tests resume from copies of it."""
    run_dir = workdir / "runs" / "stopped-two"
    run = preempted(launch(run_dir, TWO, nproc=2, fault={"action": "signal", "sig": "SIGUSR1", "step": TWO_STOP,
                                                         "rank": 1}), nproc=2)
    assert f"checkpoint committed at step {TWO_STOP}" in run.out, run.out[-3000:]
    assert not (run_dir / "final.json").exists()
    assert [p.name for p in valid_checkpoints(run_dir)][-1] == f"step-{TWO_STOP:06d}"
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- 1. bit-exact resume


def test_one_process_sigterm_then_resume_is_bit_exact(clean_one, workdir):
    run_dir = workdir / "runs" / "sigterm-one"
    stop = 7
    first = preempted(launch(run_dir, ONE, fault={"action": "signal", "sig": "SIGTERM", "step": stop}))
    assert f"preempted (SIGTERM): checkpoint committed at step {stop}" in first.out, first.out[-3000:]
    assert not (run_dir / "final.json").exists()
    second = ok(launch(run_dir, ONE))
    assert resumed_step(second) == stop, second.out[-3000:]
    got = final(run_dir)
    assert got["step"] == ONE_STEPS
    assert got["param_hash"] == clean_one["param_hash"], "resumed run diverged from the uninterrupted one"


def test_two_ranks_signal_then_resume_is_bit_exact(clean_two, stopped_two, workdir):
    run_dir = copy_run(stopped_two, workdir / "runs" / "resumed-two")
    run = ok(launch(run_dir, TWO, nproc=2))
    assert resumed_step(run) == TWO_STOP and "saved by 2 ranks, now 2" in run.out, run.out[-3000:]
    got = final(run_dir)
    assert got["step"] == TWO_STEPS
    assert got["param_hash"] == clean_two["param_hash"], "resumed 2-rank run diverged from the uninterrupted one"


# ---------------------------------------------------------------- 2. elastic: 2 ranks -> 1 or 3


def sample_log(run_dir: Path) -> dict[int, Counter]:
    """epoch -> how often each sample id was consumed, over every rank's audit file."""
    per_epoch: dict[int, Counter] = {}
    for path in sorted((run_dir / "samples").glob("rank*.txt")):
        for line in path.read_text().splitlines():
            _, epoch, *ids = map(int, line.split())
            per_epoch.setdefault(epoch, Counter()).update(ids)
    return per_epoch


@pytest.mark.parametrize("nproc", [1, 3])
def test_elastic_resume_consumes_every_sample_once_and_keeps_the_loss(stopped_two, nproc, workdir):
    """Saved on 2 ranks mid-epoch, resumed on `nproc` to the end of that epoch (--train.max_epochs:
    not part of the plan or the LR schedule). Over the stopped run's steps plus the resumed run's,
    every epoch, the one in progress included, consumed each sample id exactly once."""
    run_dir = copy_run(stopped_two, workdir / "runs" / f"elastic-{nproc}")
    loader = json.loads((run_dir / "checkpoints" / f"step-{TWO_STOP:06d}" / "extra.json").read_text())["loader"]
    epoch, consumed = loader["epoch"], loader["consumed"]
    assert epoch >= 1 and consumed > 0, f"the stop should be mid-epoch, after a full one: {loader}"
    before = train_records(run_dir)

    run = ok(launch(run_dir, [*TWO, "--train.max_epochs", str(epoch + 1)], nproc=nproc))
    assert resumed_step(run) == TWO_STOP and f"saved by 2 ranks, now {nproc}" in run.out, run.out[-3000:]
    assert final(run_dir)["stopped"] == "finished"

    # Filler batches (weight 0, which keep ranks in lockstep at an epoch's end) are not in the log.
    seen = sample_log(run_dir)
    assert sorted(seen) == list(range(epoch + 1)), f"epochs in the audit log: {sorted(seen)}"
    everything = set(range(NUM_SAMPLES))
    for e, counts in seen.items():
        twice = sorted(i for i, c in counts.items() if c > 1)
        missing = sorted(everything - set(counts))
        extra = sorted(set(counts) - everything)
        when = f"resumed on {nproc} ranks at global batch {consumed}" if e == epoch else "before the stop"
        assert not twice and not missing and not extra, (
            f"epoch {e} ({when}): {len(twice)} ids consumed twice {twice[:10]}, {len(missing)} never "
            f"{missing[:10]}, unknown {extra[:10]}")

    # The loss continues: the first step after the resume is within the noise of the steps before
    # the stop (mean + 3 standard deviations of the last 10 logged losses; the per-step loss jumps
    # around a lot at this batch size), and nowhere near the untrained loss (ln 4 ~ 1.39).
    after = train_records(run_dir)[len(before):]
    assert before[-1]["step"] == TWO_STOP and after[0]["step"] == TWO_STOP + 1, (before[-1], after[0])
    window = [r["loss"] for r in before[-10:]]
    untrained = statistics.mean(r["loss"] for r in before[:3])
    bound = statistics.mean(window) + 3 * statistics.stdev(window)
    first = after[0]["loss"]
    assert first <= bound, f"first loss after resume {first:.3f} > {bound:.3f} (last losses {window})"
    assert first < untrained - 0.2, f"first loss after resume {first:.3f} is back near the untrained {untrained:.3f}"


# ---------------------------------------------------------------- 3. SIGKILL at random moments


def kill_plan(rng: random.Random, n: int) -> list[dict]:
    """n SIGKILLs: mid-step, at a point inside a save or a retention delete, or after a random delay."""
    points = ["small_files", "shards", "manifest", "latest", "retire", "rmtree"]
    plan = []
    for _ in range(n):
        kind = rng.choice(["step", "point", "point", "wall"])
        if kind == "step":
            plan.append({"action": "kill", "after_steps": rng.randint(1, 3)})
        elif kind == "point":
            plan.append({"action": "kill", "point": rng.choice(points), "count": rng.randint(1, 3)})
        else:
            plan.append({"action": "kill", "after_s": round(rng.uniform(0.0, 0.4), 3)})
    return plan


def test_sigkill_at_random_moments_always_resumes_from_a_valid_checkpoint(clean_one, workdir):
    """22 SIGKILLs with a seeded plan, then the end of the run: killed after its last checkpoint but
    before final.json, then killed while re-saving that step if it tries to. After every kill a valid
    checkpoint is on disk, every restart resumes from one, and the parameters at the end equal the
    uninterrupted run's."""
    run_dir = workdir / "runs" / "killed-one"
    kills_wanted = 22
    plan = kill_plan(random.Random(20240611), kills_wanted)
    plan += [{"action": "kill", "point": "finish"}, {"action": "kill", "point": "resave"}, None, None]
    history: list[str] = []
    kills, committed, last_resume = 0, False, 0
    for fault in plan:
        if (run_dir / "final.json").exists():
            break
        had_checkpoint = bool(valid_checkpoints(run_dir))
        run = launch(run_dir, ONE, fault=fault, timeout=120)
        history.append(f"{fault} -> exit {run.rc}, resumed at {resumed_step(run)}, {run.elapsed:.1f}s")
        where = "\n".join(history) + "\n" + run.out[-3000:]
        assert run.rc in (0, -signal.SIGKILL), where
        assert not tracebacks(run.out, killed=run.rc != 0), where
        if had_checkpoint:
            step = resumed_step(run)
            assert step is not None, f"a valid checkpoint was on disk but the restart did not resume:\n{where}"
            assert step >= last_resume, f"resumed at step {step}, an earlier restart had {last_resume}:\n{where}"
            last_resume = step
        kills += run.rc == -signal.SIGKILL
        left = valid_checkpoints(run_dir)
        committed = committed or bool(left)
        assert left or not committed, f"no valid checkpoint left after the kill: " \
            f"{sorted(p.name for p in (run_dir / 'checkpoints').iterdir())}\n{where}"
    where = "\n".join(history)
    assert kills >= 20, f"only {kills} runs were killed; the run finished too early:\n{where}"
    assert (run_dir / "final.json").exists(), f"the run never finished:\n{where}"
    got = final(run_dir)
    assert got["step"] == ONE_STEPS, where
    assert got["param_hash"] == clean_one["param_hash"], f"killed-and-resumed run diverged:\n{where}"


# ---------------------------------------------------------------- 4. a rank dies


RANK1_DIES = {"action": "kill", "step": 44, "rank": 1, "restart": 0}  # newest checkpoint then: step 40


def test_rank_death_fails_the_job_fast_and_names_the_rank(workdir):
    run_dir = workdir / "runs" / "rank-death"
    run = launch(run_dir, TWO, nproc=2, fault=RANK1_DIES, timeout=150)
    assert run.rc != 0, run.out[-3000:]
    assert run.elapsed < 90, f"torchrun took {run.elapsed:.0f}s to give up after rank 1 died"
    # torchrun's failure summary: "rank      : 1 (local_rank: 1)" / "exitcode  : -9 ... (SIGKILL)".
    summary = run.out[run.out.rfind("Root Cause"):] if "Root Cause" in run.out else run.out
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", run.out), summary[-3000:]
    assert not (run_dir / "final.json").exists()


@pytest.mark.parametrize("action", ["kill", "raise"])
def test_rank_death_with_a_torchrun_restart_resumes_bit_exact(clean_two, workdir, action):
    """A worker SIGKILLed, or one that raises, at step 44: torchrun restarts the group, which resumes
    from the step-40 checkpoint and ends with the clean run's parameters."""
    run_dir = workdir / "runs" / f"rank-death-restart-{action}"
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: by default the restarted workers share the agent's TCPStore
    # with the dead ones, whose gloo addresses are still in it under the same keys; a new rank can read
    # a stale one and fail in connectFullMesh ("Connection refused"), about half the time on torch 2.13
    # (pytorch/pytorch#135712). distlstm/distributed/world.py could instead prefix the store by restart count.
    run = launch(run_dir, TWO, nproc=2, fault={**RANK1_DIES, "action": action}, torchrun_args=("--max-restarts=1",),
                 env_extra={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, timeout=240)
    assert run.rc == 0, run.out[-5000:]
    assert resumed_step(run) == 40 and "saved by 2 ranks, now 2" in run.out, run.out[-3000:]
    got = final(run_dir)
    assert got["step"] == TWO_STEPS
    assert got["param_hash"] == clean_two["param_hash"], "the restarted job diverged from a clean 2-rank run"


# ---------------------------------------------------------------- 5. several plan streams (data.streams=auto)


@pytest.mark.slow
def test_elastic_resume_with_four_plan_streams_consumes_every_sample_once(workdir):
    """The synthetic set above has 2 row groups, so data.streams=auto plans one stream there. Here a
    raw Parquet set of 48 row groups: 2 ranks x 2 workers plan 4 streams (one reader per chunk),
    stop mid-epoch, and resume on 3 ranks x 1 worker, which does not divide 4. The checkpoint records
    the 4 streams, the epoch in progress finishes on that plan, and every sample is consumed once."""
    sys.path.insert(0, str(ROOT / "tests"))
    import _loader_worker as lw
    data = lw.write_parquet(workdir / "pq48", 1200, rows_per_group=25, shards=3, seed=7)
    args = ["--data.train", str(data), "--model.task", "classify", "--model.vocab_size", str(lw.VOCAB),
            "--model.num_classes", str(lw.NUM_CLASSES), "--model.hidden_size", "16", "--data.max_tokens", "512",
            "--train.max_epochs", "1", "--train.max_steps", "0", "--train.eval_every", "0",
            "--log.progress", "false", "--log.tensorboard", "false", "--log.sample_ids", "true"]
    run_dir = workdir / "runs" / "streams"
    stop = 8
    first = preempted(launch(run_dir, [*args, "--data.num_workers", "2"], nproc=2,
                             fault={"action": "signal", "sig": "SIGUSR1", "step": stop, "rank": 0}), nproc=2)
    assert "4 stream(s)" in first.out and f"checkpoint committed at step {stop}" in first.out, first.out[-3000:]
    loader = json.loads((run_dir / "checkpoints" / f"step-{stop:06d}" / "extra.json").read_text())["loader"]
    assert (loader["epoch"], loader["consumed"], loader["streams"]) == (0, 2 * stop, 4), loader
    second = ok(launch(run_dir, [*args, "--data.num_workers", "1"], nproc=3))
    assert resumed_step(second) == stop and "saved by 2 ranks, now 3" in second.out, second.out[-3000:]
    seen = sample_log(run_dir)
    assert sorted(seen) == [0]
    twice = sorted(i for i, c in seen[0].items() if c > 1)
    missing = sorted(set(range(1200)) - set(seen[0]))
    assert not twice and not missing, f"{len(twice)} ids consumed twice {twice[:10]}, {len(missing)} never {missing[:10]}"

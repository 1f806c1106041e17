"""Stress version of the kill test: SIGKILL `python -m distlstm.train` hundreds of times, resume each time.

    python tests/stress/kill_stress.py                  # 200 kills (about 15-20 minutes on 2 cores)
    python tests/stress/kill_stress.py --kills 20 --max-steps 600 --keep   # quick look, keep the run dirs

Not collected by pytest (no `test_` prefix); run it by hand before touching checkpoint or resume code.

What a failure means:
- "traceback": a restart crashed (e.g. it tripped over what a killed save left behind);
- "no resume": a checkpoint had been committed but the restart did not log `resumed from ...`;
- "exit code": a restart exited with an error of its own;
- "went back": a restart resumed from a step older than the one `latest` named when it started;
- "skipped committed": a kill left a `step-N` directory (the commit point) that fails verification;
- "param_hash": the killed-and-resumed run ended with different weights than an uninterrupted one,
  so resume is not exact (data position, optimizer, scheduler or RNG state lost or restored twice).

Each attempt runs in its own session, and the whole process group (trainer + DataLoader worker) gets
SIGKILL, as when a node dies. Kill moments are seeded: with probability `--startup-fraction` a uniform
moment during start-up (imports, indexing, checkpoint load), otherwise a uniform moment in the first
`--max-delay` seconds of training after the resume line (saves happen every step there, so this
lands in every phase of save/commit/retention).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--data.synthetic_samples", "1000", "--model.hidden_size", "32", "--data.max_tokens", "1024",
         "--train.eval_every", "0", "--log.progress", "false", "--checkpoint.every_steps", "1",
         "--checkpoint.keep_last", "1", "--checkpoint.resume", "auto"]
RESUMED = re.compile(r"^resumed from (\S+) at step (\d+)", re.M)
TRAINING = re.compile(r"^\[train\] step |^done: ", re.M)  # not the "[train]" table of the config dump
SKIPPED_COMMITTED = re.compile(r"^checkpoint: (skipping \S*step-\d+: |ignoring pointer).*$", re.M)


def snapshot_source(work: Path) -> Path:
    """Copy of the package the runs import: both runs must see the same code even if the checkout
    is edited while the stress test runs (it takes many minutes)."""
    src = work / "src"
    shutil.copytree(ROOT / "distlstm", src / "distlstm", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def env_for(work: Path) -> dict:
    return {**os.environ, "DISTLSTM_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(work / "src"), "PYTHONUNBUFFERED": "1"}


def command(run_dir: Path, max_steps: int) -> list[str]:
    return [sys.executable, "-m", "distlstm.train", "--train.run_dir", str(run_dir),
            "--train.max_steps", str(max_steps), *SMALL]


def committed_step(ckpt_dir: Path) -> int | None:
    """The step `latest` names (what a restart must resume from, or something newer)."""
    try:
        name = (ckpt_dir / "latest").read_text().strip()
    except FileNotFoundError:
        return None
    m = re.fullmatch(r"step-(\d+)", name)
    return int(m.group(1)) if m else None


def wait_for_commit(ckpt_dir: Path, before: int | None, proc: subprocess.Popen, timeout: float) -> float | None:
    """Seconds until `latest` names a step other than `before`; None if the process exits or time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if committed_step(ckpt_dir) not in (before, None):
            return time.monotonic() - start
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    return None


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def reference_hash(work: Path, max_steps: int) -> str:
    run_dir = work / "reference"
    proc = subprocess.run(command(run_dir, max_steps), env=env_for(work), cwd=work,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((run_dir / "final.json").read_text())["param_hash"]


def stress(work: Path, args: argparse.Namespace, current: list) -> tuple[dict, list[str]]:
    rng = random.Random(args.seed)
    run_dir = work / "stressed"
    ckpt_dir = run_dir / "checkpoints"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    stats = {"kills": 0, "startup_kills": 0, "training_kills": 0, "attempts": 0, "resumes": 0,
             "lost_steps_vs_newest_dir": 0, "final_step": None}
    startup_s = 5.0  # start to first new commit; refined from each attempt
    reported = 0
    while True:
        attempt = stats["attempts"]
        stats["attempts"] += 1
        expect = committed_step(ckpt_dir)
        newest = max((int(p.name[5:]) for p in ckpt_dir.glob("step-*") if re.fullmatch(r"step-\d+", p.name)),
                     default=None) if ckpt_dir.is_dir() else None
        out, err = logs / f"{attempt:04d}.out", logs / f"{attempt:04d}.err"
        last = stats["kills"] >= args.kills
        with open(out, "w") as fo, open(err, "w") as fe:
            fo.write(f"# kill_stress: attempt {attempt}, `latest` names step {expect}, newest step dir {newest}\n")
            fo.flush()
            proc = subprocess.Popen(command(run_dir, args.max_steps), env=env_for(work), cwd=work,
                                    stdout=fo, stderr=fe, start_new_session=True)
        current[0] = proc
        if last:
            rc = proc.wait(timeout=3600)
        else:
            if rng.random() < args.startup_fraction:
                # Anywhere in start-up: imports, dataset index, checkpoint verification and load,
                # DataLoader worker start, the first step and its save.
                time.sleep(rng.uniform(0, startup_s))
                phase = "startup_kills"
            else:
                # Training is under way once this attempt committed a checkpoint of its own.
                waited = wait_for_commit(ckpt_dir, expect, proc, timeout=120)
                if waited is not None:
                    startup_s = 0.8 * startup_s + 0.2 * waited
                    time.sleep(rng.uniform(0, args.max_delay))
                phase = "training_kills"
            rc = proc.poll()
            if rc is None:
                kill_group(proc)
                stats["kills"] += 1
                stats[phase] += 1
            else:
                kill_group(proc)  # reap a DataLoader worker the trainer may have left behind
        text, errtext = out.read_text(errors="replace"), err.read_text(errors="replace")
        where = f"attempt {attempt} ({out})"
        if "Traceback" in errtext or "Traceback" in text:
            problems.append(f"traceback: {where}: " + ((errtext or text).strip().splitlines() or [""])[-1][:300])
        for m in SKIPPED_COMMITTED.finditer(text):
            problems.append(f"skipped committed: {where}: {m.group(0)[:300]}")
        resumed = RESUMED.search(text)
        got_past_resume = resumed is not None or TRAINING.search(text) is not None
        if expect is not None and got_past_resume:
            if resumed is None:
                problems.append(f"no resume: {where}: `latest` named step {expect} but no 'resumed from' line")
            else:
                stats["resumes"] += 1
                step = int(resumed.group(2))
                if step < expect:
                    problems.append(f"went back: {where}: resumed at step {step}, `latest` named step {expect}")
                if newest is not None and step < newest:
                    stats["lost_steps_vs_newest_dir"] += newest - step
        if rc is not None and rc != 0 and rc != -signal.SIGKILL:
            problems.append(f"exit code {rc}: {where}: " + (errtext.strip().splitlines() or [""])[-1][:300])
        for line in problems[reported:]:
            print("PROBLEM", line, flush=True)
        reported = len(problems)
        if rc == 0:
            if not last:
                problems.append(f"finished after only {stats['kills']} kills: raise --max-steps "
                                f"(now {args.max_steps}) or lower --max-delay")
            final = json.loads((run_dir / "final.json").read_text())
            stats["final_step"] = final["step"]
            stats["param_hash"] = final["param_hash"]
            return stats, problems
        if last:
            problems.append(f"the final uninterrupted attempt failed with exit code {rc}: {where}")
            return stats, problems
        if args.verbose or stats["kills"] % 10 == 0:
            print(f"kills {stats['kills']}/{args.kills}  attempt {attempt}  latest step {committed_step(ckpt_dir)}  "
                  f"problems {len(problems)}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=200, help="SIGKILLs before the final uninterrupted attempt")
    p.add_argument("--max-steps", type=int, default=5000, help="train.max_steps of both runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--max-delay", type=float, default=0.5, help="latest kill, in seconds after the attempt's first commit")
    p.add_argument("--startup-fraction", type=float, default=0.2, help="share of kills aimed at start-up")
    p.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs of every attempt)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="distlstm-kill-stress-"))
    print(f"work dir {work}; {args.kills} kills, max_steps {args.max_steps}, seed {args.seed}", flush=True)
    t0 = time.monotonic()
    snapshot_source(work)
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                          text=True).stdout.strip()
    print(f"code: {ROOT}/distlstm at {head or 'unknown'} (copied to {work / 'src'})", flush=True)
    want = reference_hash(work, args.max_steps)
    print(f"reference (uninterrupted) param_hash {want} in {time.monotonic() - t0:.0f}s", flush=True)
    current: list = [None]  # the attempt running now, so an interrupted stress test leaves no trainer behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        stats, problems = stress(work, args, current)
    finally:
        if current[0] is not None and current[0].poll() is None:
            kill_group(current[0])
    got = stats.get("param_hash")
    if got is not None and got != want:
        problems.append(f"param_hash: killed-and-resumed run {got} != uninterrupted {want}")
    print(json.dumps({**stats, "reference_param_hash": want, "elapsed_s": round(time.monotonic() - t0)}, indent=1))
    for line in problems[:50]:
        print("PROBLEM", line)
    ok = not problems and stats["kills"] >= args.kills and got == want
    print(f"{'PASS' if ok else 'FAIL'}: {stats['kills']} kills ({stats['startup_kills']} in start-up, "
          f"{stats['training_kills']} in training), {stats['resumes']} resumes, {len(problems)} problem(s), "
          f"final param_hash {'==' if got == want else '!='} uninterrupted")
    if ok and not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

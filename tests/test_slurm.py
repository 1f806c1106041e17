"""The sbatch templates on a real single-node SLURM (launch/slurm/local-cluster.sh).

A failure here means a user's `sbatch launch/slurm/...` breaks: the job fails to start, ranks are
misdetected under srun, or a preempted job loses work / does not requeue / resumes to different
parameters than an uninterrupted run.

Needs root (the fixture installs and starts slurmctld, slurmd and munged). Skipped otherwise,
except with CI=true, where a cluster that cannot come up is a failure.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "launch" / "slurm" / "local-cluster.sh"
CPU_TEMPLATE = ROOT / "launch" / "slurm" / "train-cpu.sbatch"
needs_trainer = pytest.mark.skipif(importlib.util.find_spec("distlstm.train") is None,
                                   reason="distlstm.train (the trainer) does not exist yet")


def _unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the local SLURM cluster is unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(request):
    """Bring the local cluster up for this module; always tear it down, even after a failed up."""
    if os.geteuid() != 0:
        _unavailable("local SLURM cluster needs root")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        _unavailable("no SLURM installed and no apt-get to install it")
    request.addfinalizer(lambda: subprocess.run([str(CLUSTER), "down"], timeout=120))
    try:
        up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        _unavailable("local-cluster.sh up did not finish in 900 s")
    if up.returncode != 0:
        _unavailable(f"local-cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    conf = re.search(r"^export SLURM_CONF=(\S+)$", up.stdout, re.M)
    if conf is None:
        _unavailable(f"local-cluster.sh up printed no SLURM_CONF line:\n{up.stdout}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["SLURM_CONF"] = conf.group(1)
    return env


def sbatch(env, *args, cwd=ROOT):
    out = subprocess.run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"sbatch {args} failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_info(env, job_id) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(env, job_id, log: Path, timeout_s=600, until=("COMPLETED",)):
    """Poll scontrol until the job reaches a final state; the job's log goes in the message."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in final:
            break
        time.sleep(1)
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    assert info.get("JobState") in until, f"job {job_id}: {info.get('JobState')}\n{text[-4000:]}"
    return info, text


def test_trivial_job_completes(slurm, tmp_path):
    log = tmp_path / "hello.out"
    job = sbatch(slurm, "--ntasks=2", f"--output={log}", "--wrap", "srun hostname; echo hello-slurm")
    info, text = wait_job(slurm, job, log, timeout_s=120)
    assert info["ExitCode"] == "0:0" and "hello-slurm" in text


def run_cpu_template(env, tmp_path, name, *overrides):
    run_dir, log = tmp_path / name, tmp_path / f"{name}.out"
    job = sbatch({**env, "RUN_DIR": str(run_dir)}, "--ntasks=2", f"--job-name={name}",
                 f"--output={log}", CPU_TEMPLATE, "-", *overrides)
    return job, run_dir, log


TINY = ("--train.max_steps", "40", "--checkpoint.every_steps", "5", "--log.every_steps", "1")


@pytest.fixture(scope="module")
def reference_run(slurm, tmp_path_factory):
    """An uninterrupted 2-task run of the CPU template on the embedded default config."""
    job, run_dir, log = run_cpu_template(slurm, tmp_path_factory.mktemp("ref"), "ref", *TINY)
    info, text = wait_job(slurm, job, log)
    return info, text, run_dir


@needs_trainer
def test_cpu_template_two_tasks(reference_run):
    info, text, run_dir = reference_run
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert "world: slurm, 2 ranks" in text  # srun ranks detected, not two single processes
    for name in ("metrics.jsonl", "config.toml", "final.json"):
        assert (run_dir / name).exists(), f"{name} missing in {run_dir}; log:\n{text[-2000:]}"
    assert list((run_dir / "checkpoints").glob("step-*"))
    assert json.loads((run_dir / "final.json").read_text())["param_hash"]


def last_logged_step(metrics: Path) -> int:
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()
             if line.strip()] if metrics.exists() else []
    return max(steps, default=0)


@needs_trainer
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, reference_run, tmp_path):
    job, run_dir, log = run_cpu_template(slurm, tmp_path, "preempt", *TINY)
    deadline = time.monotonic() + 300
    while last_logged_step(run_dir / "metrics.jsonl") < 7:  # mid-training, past one checkpoint
        assert job_info(slurm, job).get("JobState") in ("PENDING", "RUNNING"), log.read_text(errors="replace")
        assert time.monotonic() < deadline, "training never reached step 7"
        time.sleep(0.5)
    # What SLURM does 120 s before the time limit (#SBATCH --signal=B:USR1@120), right now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=30)
    info, text = wait_job(slurm, job, log, timeout_s=600)
    assert info["Restarts"] == "1", text[-4000:]
    assert "batch: got SIGUSR1" in text and "preempt: requeued job" in text
    assert "start #1" in text  # the second run of the batch script, same job id and run dir
    final = json.loads((run_dir / "final.json").read_text())
    ref = json.loads((reference_run[2] / "final.json").read_text())
    assert final["param_hash"] == ref["param_hash"], "resumed run diverged from uninterrupted run"

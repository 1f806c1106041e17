"""Where a run lives when `train.run_dir` is not given, and what starting a finished run again does.

The directory is derived from the command, not the clock: `runs/<config name>-<8 hex digits>`, the
digits a hash of the whole config as given (every section, except the few options in NOT_HASHED
that change how a run executes or reports but not what it trains: run_dir, resume, progress bar,
worker and thread counts, timeout, the data checks data.verify and data.max_bad_fraction, so that
a run stopped by too many bad samples resumes with a raised limit). So the same command (same
config file and overrides) always names the same directory: after a stop, a crash or a preemption, starting it again resumes from the
newest valid checkpoint there (`checkpoint.resume=auto`). Any changed option names a new
directory, so two different experiments never share one.

A finished run (its `final.json` is written last) is never overwritten silently: starting the
same command again prints where its results are and exits without training. To continue a finished
run for more steps, name its directory with `--train.run_dir` and raise `--train.max_steps`.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from distlstm.config import Config, to_toml

# Options that change how a run executes or reports, not what it trains: left out of the hash, so
# e.g. `--log.progress false` or another worker count still finds (and resumes) the same run.
NOT_HASHED = {"train": ("run_dir", "threads", "timeout_s"), "checkpoint": ("resume",),
              "log": ("progress",), "data": ("num_workers", "prefetch_factor", "verify", "max_bad_fraction")}


def default_run_dir(cfg: Config, config_name: str = "default") -> str:
    defaults = Config()
    key = dataclasses.replace(cfg, **{
        section: dataclasses.replace(getattr(cfg, section),
                                     **{k: getattr(getattr(defaults, section), k) for k in keys})
        for section, keys in NOT_HASHED.items()})
    digest = hashlib.sha256(to_toml(key).encode()).hexdigest()[:8]
    return f"runs/{config_name}-{digest}"


def finished_message(cfg: Config, run_dir: Path) -> str | None:
    """A message when `run_dir` holds a finished run that this config would not train further."""
    try:
        final = json.loads((run_dir / "final.json").read_text())
    except (OSError, ValueError):
        return None
    step = int(final.get("step", 0))
    if cfg.train.max_steps and step < cfg.train.max_steps and final.get("stopped") == "finished":
        return None  # train.max_steps was raised: continue from the last checkpoint
    return (f"run directory {run_dir} already holds a finished run (step {step}, stopped: "
            f"{final.get('stopped', '?')}; results in {run_dir / 'final.json'}): nothing to train. To train "
            f"again, pass --train.run_dir with a new directory (or delete this one); to train it further, "
            f"pass --train.run_dir {run_dir} with a larger --train.max_steps")


# ---------------------------------------------------------------------------------------------- the run-directory lock
# One run per run directory: ``<run_dir>/run.lock`` names the process that owns the directory.
#
# Two runs writing one run directory destroy each other: each one's checkpoint retention deletes the
# other's checkpoints and ``.tmp`` commits, ``config.toml`` is overwritten and the metrics interleave.
# So the leader rank takes this lock before it writes anything, and a second run refuses to start.
#
# The lock file is created atomically with its content (written to a unique temporary name, then
# ``os.link``ed into place, which fails if the name exists, also on NFS), holds JSON naming the host,
# pid, process start time, boot id, job id and command, and is ``flock``ed while the run lives.
# A lock file that is already there is judged in this order:
#
# - its ``flock`` is held: a live run (on any host, where the filesystem's locks reach across hosts);
# - it names this host (same boot) and a process that is gone, or a pid now used by another process
#   (start time differs): stale, taken over with a message;
# - it names the same job (``SLURM_JOB_ID`` on a requeue, ``TORCHELASTIC_RUN_ID`` on a torchrun
#   restart): the previous attempt of this job, taken over with a message;
# - anything else, notably a lock from another host: refused, naming the holder; delete the file if
#   that run is known to be gone. A run killed with SIGKILL on node A and started again on node B as
#   a *new* job is the one case that needs this by hand.
#
# Guarantees on shared filesystems (see docs/design.md): two runs on the same host never share a
# directory. Across hosts, the atomic create refuses a second run whenever the first one's lock file
# exists, which holds on NFSv3+, Lustre and GPFS. What is not guaranteed: on a filesystem without
# working ``flock`` (ENOLCK, or local-only locks), two processes taking over the *same stale* lock at
# the same moment could both succeed; and a lock whose holder lost its node cannot be told from a live
# one on another host, so it is refused rather than taken over.


LOCK_NAME = "run.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}


class RunDirLocked(ValueError):
    """Another run owns the run directory (one line: who, since when, and what to do)."""


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read(Path("/proc/sys/kernel/random/boot_id")).strip()


def _process_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    if not stat:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]


def _job_id() -> str | None:
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def me() -> dict:
    """What this process writes into the lock file."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid), "boot_id": _boot_id(),
            "job": _job_id(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(sys.argv)[:300]}


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f", {holder['job']}" if holder.get("job") else ""))


def stale_reason(holder: dict, mine: dict) -> str | None:
    """Why the lock of `holder` may be taken over by `mine`; None if it must be respected."""
    same_host = holder.get("host") == mine["host"] and holder.get("boot_id") == mine["boot_id"]
    if same_host:
        start = _process_start(int(holder.get("pid") or 0)) if holder.get("pid") else None
        if start is None:
            return "that process is gone"
        if start != holder.get("pid_start"):
            return "that pid now belongs to another process"
    if holder.get("job") and holder.get("job") == mine["job"]:
        return f"an earlier attempt of this job ({mine['job']})"
    if holder.get("host") == mine["host"] and holder.get("boot_id") != mine["boot_id"]:
        return "the host rebooted since"
    return None


class RunLock:
    """The lock on one run directory, held by this process until `release()` (or exit)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, log: Callable[[str], object] = print) -> None:
        """Take the lock or raise RunDirLocked naming the holder."""
        mine = me()
        for _ in range(5):  # a holder releasing at this very moment: look again
            if self._create(mine):
                return
            fd = self._open_existing()
            if fd is None:
                continue
            content = _read_fd(fd)
            if not self._flock(fd):
                os.close(fd)
                raise self._refusal(content, "it is running (its lock is held)")
            holder = _parse(content)
            reason = stale_reason(holder, mine) if holder else "the lock file is empty or unreadable"
            if holder and holder.get("pid") == mine["pid"] and holder.get("host") == mine["host"]:
                reason = None  # this very process: a lock it did not release is still in use
            if reason is None:
                os.close(fd)
                raise self._refusal(content, "it may still be running")
            if not _still_linked(fd, self.path):
                os.close(fd)
                continue
            _overwrite(fd, mine)
            self._fd = fd
            _held.add(self)
            log(f"run directory {self.path.parent}: taking over the lock of {describe(holder or {})}: {reason}")
            return
        raise RunDirLocked(f"run directory {self.path.parent}: could not take {self.path} (it keeps changing); "
                           "is another run starting there?")

    def _create(self, mine: dict) -> bool:
        """Create the lock file with our content in one step; False if it already exists."""
        tmp = self.path.with_name(f".{LOCK_NAME}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(mine))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_RDWR)
        # A second run may hold the flock for a moment while it reads our content (it then refuses).
        for _ in range(100):
            if self._flock(fd):
                break
            time.sleep(0.01)
        self._fd = fd
        _held.add(self)
        return True

    def _open_existing(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None

    @staticmethod
    def _flock(fd: int) -> bool:
        """True if we hold the flock now (or the filesystem has none to offer); False if someone holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return True  # no flock here: the content alone decides (see the module docstring)
            raise

    def _refusal(self, content: str, why: str) -> RunDirLocked:
        holder = _parse(content)
        who = describe(holder) if holder else "another process"
        return RunDirLocked(f"run directory {self.path.parent} is in use by {who}: {why}; use another "
                            f"--train.run_dir, or wait for that run to end (if it is gone, delete {self.path})")

    def release(self) -> None:
        """Remove the lock file if it is still ours, then drop the flock. Idempotent."""
        fd, self._fd = self._fd, None
        _held.discard(self)
        if fd is None:
            return
        try:
            if _still_linked(fd, self.path) and (_parse(_read_fd(fd)) or {}).get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass  # the run directory went away: nothing to clean
        finally:
            os.close(fd)


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _parse(content: str) -> dict | None:
    try:
        holder = json.loads(content)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _overwrite(fd: int, mine: dict) -> None:
    data = json.dumps(mine).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _still_linked(fd: int, path: Path) -> bool:
    """The file behind `fd` is still the one at `path` (not unlinked by a holder that released)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


_held: set[RunLock] = set()


@atexit.register
def release_all() -> None:
    """Release every lock this process holds (the end of `main`, and at interpreter exit)."""
    for lock in list(_held):
        lock.release()


def lock_run_dir(run_dir: Path, *, is_leader: bool, group=None, log: Callable[[str], object] = print) -> None:
    """The leader takes the lock; every rank raises RunDirLocked if it could not (the verdict is
    broadcast on `group`, None in one process, so no rank is left waiting in a collective)."""
    verdict = None
    if is_leader:
        try:
            RunLock(run_dir).acquire(log)
        except RunDirLocked as exc:
            verdict = str(exc)
    if group is not None:
        import torch.distributed as dist

        box = [verdict]
        dist.broadcast_object_list(box, src=0, group=group)
        verdict = box[0]
    if verdict is not None:
        raise RunDirLocked(verdict)

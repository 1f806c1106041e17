"""Stop cleanly when the scheduler says time is up, on the same step on every rank.

The signal handler only records the signal. Saving or calling a collective inside a handler
runs at an arbitrary bytecode boundary, possibly inside another collective or a half-written
checkpoint, and hangs or corrupts the job. The trainer instead calls `agreed_stop(world)` at every
step boundary; one all_reduce(MAX) of the flag makes every rank see the stop on the same step,
even when the signal reached only some ranks (or reached them a step apart).

Exit status: a run stopped by SIGTERM or SIGUSR1 (any rank) after committing its checkpoint exits
`EXIT_PREEMPTED` (75, EX_TEMPFAIL in sysexits.h: "temporary failure, run it again"), so that a
wrapper or scheduler can tell it from a finished run (0), a user error (2) or a crash (1, or killed
by a signal); Ctrl-C exits 130 as a shell expects. The same command again resumes it.

SIGUSR1 is the "time is nearly up" signal (`#SBATCH --signal=B:USR1@120`, forwarded to the
training processes by launch/slurm/*.sbatch, because torchrun does not forward it). SIGTERM is
what SLURM sends on scancel, preemption and at the time limit. SIGINT (Ctrl-C) stops the same way
(a checkpoint, then exit 130); a second Ctrl-C exits at once, without one. The stop signals reach
DataLoader workers too when they go to the whole process group; workers ignore them
(`distlstm.data.loader.workers.worker_init`), so the trainer decides.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Callable, Mapping

import torch

from distlstm.distributed.world import World

EXIT_PREEMPTED = 75
"""The exit status of a run stopped by SIGTERM / SIGUSR1 with its checkpoint committed."""
EXIT_INTERRUPTED = 130
"""The exit status of a run stopped by Ctrl-C (SIGINT), checkpoint committed or not (128 + SIGINT)."""


class PreemptionHandler:
    """Usage (every rank):

        handler = PreemptionHandler(); handler.install()
        for step in ...:
            train_step(...)
            if handler.agreed_stop(world):
                save checkpoint (collective); barrier
                if world.is_leader: handler.requeue(max_requeues, log.info)
                break
        handler.uninstall()
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: int | None = None  # first signal number seen on this rank
        self._previous: dict[int, object] = {}
        self._interrupts = 0

    def _on_signal(self, signum, frame) -> None:
        # Only set the flag: no locks, no collectives (see module docstring); os.write is safe here.
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # a second Ctrl-C: the user does not want to wait for the step
                os.write(2, b"\ninterrupted again: exiting now, without a checkpoint "
                            b"(the last committed one is kept)\n")
                os._exit(EXIT_INTERRUPTED)
            if os.isatty(2):
                os.write(2, b"\ninterrupt: saving a checkpoint after this step "
                            b"(Ctrl-C again to exit now without one)\n")
        if self.received is None:
            self.received = signum

    @property
    def interrupted(self) -> bool:
        """This rank's stop came from Ctrl-C (exit 130, as a shell expects, and no requeue)."""
        return self.received == signal.SIGINT

    @property
    def requested(self) -> bool:
        """This rank got a signal (other ranks may not have; use agreed_stop to decide)."""
        return self.received is not None

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def install(self) -> "PreemptionHandler":
        """Must be called from the main thread (a Python rule for signal handlers)."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def agreed_stop(self, world: World, *, device: torch.device | None = None) -> bool:
        """Whether any rank was signalled. Collective: every rank must call it at the same step.

        `device` is where the flag tensor lives; it must be a cuda device for nccl (default:
        the current cuda device under nccl, cpu otherwise).
        """
        if not world.is_distributed:
            return self.requested
        import torch.distributed as dist

        if device is None:
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self, max_requeues: int, log: Callable[[str], None],
                env: Mapping[str, str] = os.environ) -> bool:
        """Put this SLURM batch job back in the queue so it resumes from the newest checkpoint.

        Call on the leader only, after the checkpoint is committed and all ranks passed a
        barrier: SLURM kills the running job as soon as the requeue is accepted. Requeues only
        after SIGUSR1 (time nearly up): SIGTERM means scancel (the user wants it gone) or
        preemption (SLURM requeues a --requeue job itself).
        """
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            log("preempt: not a SLURM job; not requeueing")
            return False
        if self.received != signal.SIGUSR1:
            log(f"preempt: stopped by {self.signal_name or 'another rank'}, not SIGUSR1; "
                "not requeueing (SLURM requeues preempted --requeue jobs itself)")
            return False
        try:
            restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
        except ValueError:
            log(f"preempt: SLURM_RESTART_COUNT={env['SLURM_RESTART_COUNT']!r} is not an integer; "
                "not requeueing")
            return False
        if restarts >= max_requeues:
            log(f"preempt: job {job_id} already restarted {restarts} times (cap {max_requeues}); "
                "not requeueing; resubmit it to continue from the last checkpoint")
            return False
        cmd = ["scontrol", "requeue", job_id]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            log(f"preempt: '{' '.join(cmd)}' failed: {err}")
            return False
        if res.returncode != 0:
            log(f"preempt: '{' '.join(cmd)}' exited {res.returncode}: {res.stderr.strip()}")
            return False
        log(f"preempt: requeued job {job_id} (restart {restarts + 1} of at most {max_requeues})")
        return True

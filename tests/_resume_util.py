"""`python -m distlstm.train` with a fault injected at a chosen moment (helper for tests/test_resume.py).

    python tests/_resume_util.py [train args ...]              # one process
    torchrun ... tests/_resume_util.py [train args ...]         # every rank

The fault comes from the environment, so the training command line stays byte-identical to an
uninterrupted run's (the LR schedule and the data plan depend on it):

    DISTLSTM_TEST_FAULT='{"action": "signal", "sig": "SIGUSR1", "step": 7, "rank": 0}'
        send SIGUSR1 to this process while it runs optimizer step 7 (1-based, counted across
        restarts: the trainer's step counter), as a scheduler would at an arbitrary moment
    DISTLSTM_TEST_FAULT='{"action": "kill", "step": 7, "rank": 1, "restart": 0}'
        SIGKILL this process in the middle of step 7 (after backward, before the optimizer step);
        "restart" limits it to torchrun's first attempt (TORCHELASTIC_RESTART_COUNT)
    DISTLSTM_TEST_FAULT='{"action": "raise", "step": 7, "rank": 1, "restart": 0}'
        raise an exception in step 7 (a crashing worker, as opposed to a killed one)
    DISTLSTM_TEST_FAULT='{"action": "kill", "after_steps": 2}'
        SIGKILL in the middle of the 2nd optimizer step this process runs (whatever step it resumed at)
    DISTLSTM_TEST_FAULT='{"action": "kill", "after_s": 0.3}'
        SIGKILL 0.3 s after this process starts its first step, wherever it is then (a step, a save,
        a retention delete, the final evaluation); a timer thread, as good as an outside `kill -9`
    DISTLSTM_TEST_FAULT='{"action": "kill", "point": "manifest", "count": 2}'
        SIGKILL the 2nd time this process reaches a point inside the checkpoint code (see POINTS)
    DISTLSTM_TEST_FAULT='{"action": "signal", "sig": "SIGTERM", "step": 7, "target": "group"}'
        as "signal", but to this process's whole process group (its DataLoader workers too), as
        `kill -TERM -<pgid>` does; "target": "job" signals every process of the run (every process
        with the run directory on its command line: torchrun, each rank, their DataLoader workers),
        as scancel or srun do; both from a separate `kill` process; "times": 2 sends it twice
    DISTLSTM_TEST_FAULT='{"action": "pause", "step": 5, "ready": "/path/a", "go": "/path/b"}'
        at step 5, create the file `ready`, then wait (up to 120 s) until the file `go` exists
    DISTLSTM_TEST_FAULT='{"action": "fsize", "step": 5, "bytes": 4096}'
        from step 5 on, no file this process writes may grow beyond 4096 bytes (RLIMIT_FSIZE; writes
        fail with EFBIG, as they fail with ENOSPC on a full disk)

The signal goes through the real handler (distlstm.distributed.preempt) and SIGKILL is SIGKILL: only *when*
it happens is chosen here, which makes the tests deterministic instead of racing a timer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

# Where a kill inside a save or a retention leaves the checkpoint directory:
POINTS = {
    "small_files": "step-N.tmp exists and is empty (a save just started)",
    "shards": "every file of step-N.tmp written, MANIFEST.json not yet",
    "manifest": "MANIFEST.json about to be written into step-N.tmp (the last step before the commit)",
    "latest": "step-N committed (renamed), the 'latest' pointer still names the previous checkpoint",
    "retire": "an old checkpoint renamed to .deleting, nothing of it removed yet",
    "rmtree": "an old checkpoint's .deleting directory half removed",
    "resave": "a save of a step that already has a checkpoint set the old one aside (.deleting), "
              "the new one not yet renamed into place",
    "finish": "training and its last checkpoint done, final.json and model.pt not yet written",
}


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _send(sig: int, target: str) -> None:
    """Signal this process, or (from a separate `kill` process, as a shell, srun or scancel would:
    torch's DataLoader workers exit quietly on a SIGTERM sent by their own parent) its process group
    or every process of the run."""
    if target == "self":
        os.kill(os.getpid(), sig)
        return
    if target == "group":
        targets = ["--", f"-{os.getpgrp()}"]
    elif target == "job":
        run_dir = sys.argv[sys.argv.index("--train.run_dir") + 1]
        targets = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if run_dir in cmdline.read_bytes().decode(errors="replace").split("\0"):
                    targets.append(cmdline.parent.name)
            except OSError:
                pass  # gone meanwhile
    else:
        raise SystemExit(f"_resume_util: unknown signal target {target!r}")
    import subprocess
    subprocess.run(["kill", "-s", signal.Signals(sig).name.removeprefix("SIG"), *targets], check=False)


def install(fault: dict) -> None:
    from distlstm.checkpoint import manager as checkpoint
    from distlstm.run import trainer

    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if fault.get("rank", rank) != rank or fault.get("restart", attempt) != attempt:
        return

    if "step" in fault or "after_steps" in fault or "after_s" in fault:
        original, ran = trainer.Trainer.forward_backward, {"n": 0}

        def forward_backward(self, micro_batches, *args, **kwargs):
            original(self, micro_batches, *args, **kwargs)
            ran["n"] += 1
            if "after_s" in fault:
                if ran["n"] == 1:
                    threading.Thread(target=lambda: (time.sleep(fault["after_s"]), _die()), daemon=True).start()
                return
            # state.step counts completed steps; this one is not complete yet.
            if self.state.step + 1 == fault.get("step") or ran["n"] == fault.get("after_steps"):
                if fault["action"] == "kill":
                    _die()
                if fault["action"] == "raise":
                    raise RuntimeError(f"injected failure at step {self.state.step + 1}")
                if fault["action"] == "pause":
                    Path(fault["ready"]).touch()
                    deadline = time.monotonic() + 120
                    while not Path(fault["go"]).exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    return
                if fault["action"] == "fsize":
                    import resource
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a dead process
                    resource.setrlimit(resource.RLIMIT_FSIZE, (fault["bytes"], fault["bytes"]))
                    return
                for _ in range(fault.get("times", 1)):
                    _send(getattr(signal, fault.get("sig", "SIGUSR1")), fault.get("target", "self"))
                    time.sleep(0.1)  # the handler runs (a second signal sent at once would merge with the first)

        trainer.Trainer.forward_backward = forward_backward
        return

    point, seen = fault["point"], {"n": 0}
    if point not in POINTS:
        raise SystemExit(f"_resume_util: unknown point {point!r}; one of {sorted(POINTS)}")

    def reached(name: str) -> bool:
        if name != point:
            return False
        seen["n"] += 1
        return seen["n"] == fault.get("count", 1)

    def wrap(owner, attr, before=None, after=None):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            if before and reached(before(*args)):
                _die()
            result = original(*args, **kwargs)
            if after and reached(after):
                _die()
            return result

        setattr(owner, attr, wrapper)

    mgr = checkpoint.CheckpointManager
    wrap(mgr, "_write_small_files", before=lambda *a: "small_files")
    wrap(mgr, "_write_shards", after="shards")
    file_points = {checkpoint.MANIFEST: "manifest", f"{checkpoint.LATEST}.tmp": "latest"}
    wrap(checkpoint, "_write_file", before=lambda path, data: file_points.get(Path(path).name))

    retire = mgr._retire

    def _retire(self, path, remove=True):
        retire(self, path, remove)
        if not remove and reached("resave"):
            _die()

    mgr._retire = _retire

    from distlstm import train
    finish = train.finish

    def finish_then_maybe_die(*args, **kwargs):
        if reached("finish"):
            _die()
        return finish(*args, **kwargs)

    train.finish = finish_then_maybe_die

    def rmtree(path, ignore_errors=False):
        import shutil
        if reached("retire"):
            _die()
        if reached("rmtree"):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for p in files[: max(1, len(files) // 2)]:
                p.unlink()
            _die()
        shutil.rmtree(path, ignore_errors=ignore_errors)

    checkpoint.shutil = type("shutil_shim", (), {"rmtree": staticmethod(rmtree)})


def main() -> int:
    fault = os.environ.get("DISTLSTM_TEST_FAULT")
    if fault:
        install(json.loads(fault))
    from distlstm.train import main as train_main
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

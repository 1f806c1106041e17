"""The process group of one command, set up once (`session`), and how a command ends on bad input
(`run_command`): every command (train, evaluate, predict, generate, export) goes through both.

    def run(argv):
        cfg = ...
        with session(cfg) as s:      # one process, or every rank under torchrun / srun
            ... s.world, s.device, s.group, s.log ...
        return 0

    def main(argv=None):
        return run_command(run, argv)

A user error (`distlstm.errors.USER_ERRORS`: bad config, data, paths, I/O) ends the command with
one `error:` line and exit status 2, naming the rank when it happened inside a session; with
`--train.debug` the traceback is shown instead. Ctrl-C outside the trainer's own handler exits 130.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from distlstm.config import Config, ConfigError
from distlstm.distributed.parallel import control_group
from distlstm.distributed.world import (World, default_backend, default_device, destroy_process_group, detect_world,
                                        init_process_group)
from distlstm.errors import USER_ERRORS, message

DEBUG_HINT = "(--train.debug shows the traceback)"


@dataclass
class Session:
    world: World
    device: torch.device
    backend: str
    group: Any
    """The control group: gloo for small host-side agreements (distributed/parallel.py)."""
    log: Callable[[str], Any]
    """print on the leader, nothing elsewhere."""


@contextlib.contextmanager
def session(cfg: Config) -> Iterator[Session]:
    """The process group for a command (train.device, train.backend, train.threads, train.timeout_s).
    An error leaving the block is marked with this rank (and train.debug), for `run_command`; the
    group is torn down with a barrier only after success (after a failure another rank may be gone)."""
    world = detect_world()
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available; use --train.device cpu")
    device = default_device(world) if cfg.train.device != "cpu" else torch.device("cpu")
    backend = default_backend(device) if cfg.train.backend == "auto" else cfg.train.backend
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    init_process_group(world, backend=backend, timeout_s=cfg.train.timeout_s, device=device,
                       alone=cfg.train.ddp == "on")
    log = (lambda msg: print(msg, flush=True)) if world.is_leader else (lambda msg: None)
    ok = False
    try:
        yield Session(world, device, backend, control_group(backend), log)
        ok = True
    except BaseException as exc:
        exc.distlstm_rank = world.rank  # type: ignore[attr-defined]
        exc.distlstm_debug = cfg.train.debug  # type: ignore[attr-defined]
        raise
    finally:
        destroy_process_group(barrier=ok)


def run_command(body: Callable[[list[str]], int], argv: list[str] | None, *,
                interrupted: str = "interrupted") -> int:
    """`body(argv)`'s exit status; a user error as one line (exit 2), Ctrl-C as `interrupted` (130)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return body(argv)
    except USER_ERRORS as exc:  # ConfigError is a ValueError; DCP's CheckpointException is listed there
        if getattr(exc, "distlstm_debug", False):
            raise
        rank = getattr(exc, "distlstm_rank", None)
        if rank is None:
            print(f"error: {message(exc)}", file=sys.stderr)
        else:
            print(f"error: rank {rank}: {message(exc)}\n{DEBUG_HINT}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if getattr(exc, "distlstm_debug", False):
            raise
        print(interrupted, file=sys.stderr)
        return 130

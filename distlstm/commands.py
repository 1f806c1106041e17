"""What the after-training commands (evaluate, predict, generate, export) share: the command line
(a run directory, the command's own flags, `--SECTION.KEY VALUE` overrides of the run's saved
config), the process group under torchrun, and the weights of the checkpoint asked for.

None of them writes into the run directory except evaluate's `eval-<name>.json`: the run's config,
metrics, checkpoints and weights stay as training left them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distlstm.config import Config, ConfigError
from distlstm.distributed.world import World

CHECKPOINT_HELP = ("which weights: final (the run's model.safetensors), latest, best (checkpoint.keep_best), "
                   "step-N, or a checkpoint path; default: final if the run finished, else latest")
OVERRIDES_HELP = ("Any --SECTION.KEY VALUE option overrides the run's saved config, e.g. --data.valid, "
                  "--data.max_tokens, --train.device cpu, --train.precision (python -m distlstm.train --help "
                  "lists them all).")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments, `--section.key value` overrides): the dotted options are taken
    out first, so their values are never mistaken for the command's positional arguments."""
    own, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and "." in name:
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(argv[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, overrides


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m distlstm.{prog}", description=description, epilog=OVERRIDES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the training run directory (or, for generate/export, a checkpoint or "
                               "exported folder)")
    return p


@dataclass
class Session:
    world: World
    device: torch.device
    group: Any
    log: Callable[[str], Any]


@contextlib.contextmanager
def session(cfg: Config) -> Iterator[Session]:
    """The process group (one process, or every rank under torchrun / srun) for a command."""
    from distlstm.distributed.parallel import control_group
    from distlstm.distributed.world import (default_backend, default_device, destroy_process_group, detect_world,
                                init_process_group)
    world = detect_world()
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available; use --train.device cpu")
    device = default_device(world) if cfg.train.device != "cpu" else torch.device("cpu")
    backend = default_backend(device) if cfg.train.backend == "auto" else cfg.train.backend
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    init_process_group(world, backend=backend, timeout_s=cfg.train.timeout_s, device=device)
    log = (lambda msg: print(msg, flush=True)) if world.is_leader else (lambda msg: None)
    ok = False
    try:
        yield Session(world, device, control_group(backend), log)
        ok = True
    finally:
        destroy_process_group(barrier=ok)


def main_wrapper(body: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """Bad input and I/O failures as one `error:` line (exit 2), as `distlstm.train` does."""
    argv = sys.argv[1:] if argv is None else argv
    from distlstm.errors import USER_ERRORS, message
    try:
        return body(argv)
    except USER_ERRORS as exc:  # ConfigError is a ValueError; DCP's CheckpointException is listed there
        print(f"error: {message(exc)}", file=sys.stderr)
        return 2


def load_weights(model: torch.nn.Module, run_dir: Path, which: str | None) -> dict:
    """Put the weights `which` names (see CHECKPOINT_HELP) into `model`; returns
    {"checkpoint": what was loaded, "step": its training step}."""
    from distlstm.checkpoint.artifacts import WEIGHTS, load_checkpoint_weights, resolve_checkpoint
    if which is None:
        which = "final" if (run_dir / WEIGHTS).is_file() else "latest"
    if which == "final":
        if not (run_dir / WEIGHTS).is_file():
            raise ValueError(f"{run_dir} has no {WEIGHTS} (the run has not finished); use --checkpoint latest")
        from safetensors.torch import load_model
        load_model(model, str(run_dir / WEIGHTS), strict=True)
        step = json.loads((run_dir / "config.json").read_text()).get("step")
        return {"checkpoint": "final", "step": step, "path": str(run_dir / WEIGHTS)}
    path = resolve_checkpoint(run_dir, which)
    load_checkpoint_weights(model, path)
    step = json.loads((path / "MANIFEST.json").read_text())["step"]
    return {"checkpoint": path.name, "step": step, "path": str(path)}


"""`python -m distlstm.train`: wire the pieces together and run the trainer.

    python -m distlstm.train                                  # embedded default, laptop CPU, ~1 minute
    python -m distlstm.train --config configs/x.toml --optim.lr 3e-3
    torchrun --nproc_per_node=8 -m distlstm.train --config configs/x.toml
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from distlstm.run.build import build_run, total_steps  # noqa: F401 (total_steps: public here too)
from distlstm.config import Config, ConfigError, help_text, load_config, to_toml
from distlstm.data.sources import redact
from distlstm.errors import USER_ERRORS, message
from distlstm.run.graphs import StepGraphs
from distlstm.run.metrics import Reporter
from distlstm.distributed.parallel import control_group, unwrap
from distlstm.run.run_lock import lock_run_dir, release_all as release_run_locks
from distlstm.run.trainer import Trainer
from distlstm.distributed.world import (World, default_backend, default_device, describe, destroy_process_group, detect_world,
                            init_process_group)

USAGE = """usage: python -m distlstm.train [--config FILE.toml] [--SECTION.KEY VALUE ...]

Train an LSTM on sharded data, as one process or under torchrun / srun (DDP).
With no arguments it trains the embedded default (a synthetic "which marker came last?"
classification task) on the CPU in about a minute.

Options are read from the defaults, then --config (a TOML file with [data], [model], ...
tables, see configs/), then the command line: --optim.lr 3e-3 or --optim.lr=3e-3; a
boolean alone (--train.debug) means true.
"""


def parse_args(argv: list[str]) -> Config:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n" + help_text())
        raise SystemExit(0)
    path = None
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return load_config(path, rest)


def _debug_mode(cfg: Config) -> None:
    if cfg.train.debug:
        os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
        torch.autograd.set_detect_anomaly(True)
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_run_dir(cfg: Config, config_name: str = "default") -> Path:
    """The run directory, the same on every rank (every rank has the same config): train.run_dir,
    else derived from the config (distlstm/run/rundir.py), so that the same command again resumes it."""
    from distlstm.run.rundir import default_run_dir
    run_dir = Path(cfg.train.run_dir or default_run_dir(cfg, config_name))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        cfg = parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    world = detect_world()
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        print("error: train.device=cuda but CUDA is not available; use --train.device cpu", file=sys.stderr)
        return 2
    device = default_device(world) if cfg.train.device != "cpu" else torch.device("cpu")
    backend = default_backend(device) if cfg.train.backend == "auto" else cfg.train.backend
    init_process_group(world, backend=backend, timeout_s=cfg.train.timeout_s, device=device)
    finished = False
    try:
        code = run(cfg, world, device, backend, config_name=_config_name(argv))
        finished = True
        return code
    except USER_ERRORS as exc:
        # Bad input (config, data, paths), I/O failures, runs that cannot go on: the message names the
        # file, row or key and the fix; a traceback would only bury it. --train.debug keeps the traceback.
        if cfg.train.debug:
            raise
        print(f"error: rank {world.rank}: {message(exc)}\n(--train.debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started (the stop handler is not installed yet)
        if cfg.train.debug:
            raise
        print("interrupted before training started: nothing to save", file=sys.stderr)
        return 130
    finally:
        release_run_locks()
        destroy_process_group(barrier=finished)


def _config_name(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).stem
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1]).stem
    return "default"


def run(cfg: Config, world: World, device: torch.device, backend: str, config_name: str = "default") -> int:
    log = (lambda msg: print(msg, flush=True)) if world.is_leader else (lambda msg: None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    _debug_mode(cfg)
    group = control_group(backend)
    run_dir = resolve_run_dir(cfg, config_name)
    from distlstm.run.rundir import finished_message
    done = finished_message(cfg, run_dir)
    if done:
        log(done)
        return 0
    # Before anything is written there: a second run in the same directory would destroy this one's.
    lock_run_dir(run_dir, is_leader=world.is_leader, group=group, log=log)
    log(f"run directory {run_dir} (the same command again resumes it)")
    log(describe(world) + f", device {device}, backend {backend if world.is_distributed else '-'}")
    from distlstm.run.loggers import build_sinks, check_backends
    check_backends(cfg)
    built = build_run(cfg, world, device, group=group, log=log, run_dir=run_dir)
    cfg = built.cfg
    if world.is_leader:
        # Resolved (model.input and the data-derived sizes filled in): it rebuilds this model.
        (run_dir / "config.toml").write_text(to_toml(cfg, redact=redact))
        from distlstm.checkpoint.artifacts import copy_data_files
        copy_data_files(built.train_index, run_dir)  # vocab.json / labels.json: what reads new text
        log("config:\n" + to_toml(cfg, redact=redact))

    from distlstm.checkpoint.manager import CheckpointManager
    from distlstm.distributed.preempt import PreemptionHandler
    checkpoints = CheckpointManager(run_dir / "checkpoints", rank=world.rank, world_size=world.world_size,
                                    keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                                    async_save=cfg.checkpoint.async_save, log=log)
    preempt = PreemptionHandler().install()
    trainer = Trainer(cfg, world, model=built.ddp_model, optimizer=built.optimizer, scheduler=built.scheduler,
                      amp=built.amp, device=device, train_loader=built.train_loader,
                      valid_loader=built.valid_loader, control_group=group, checkpoints=checkpoints,
                      preempt=preempt, run_dir=run_dir, log=log)
    if cfg.train.cuda_graphs == "on":
        trainer.graphs = StepGraphs(trainer, limit=cfg.train.cuda_graph_limit, log=log)
    resume(cfg, trainer, checkpoints, log)
    total = cfg.train.max_steps or None
    trainer.reporter = Reporter(run_dir, enabled=world.is_leader, total_steps=total, progress=cfg.log.progress,
                                tensorboard=cfg.log.tensorboard, start_step=trainer.state.step,
                                sinks=build_sinks(cfg, run_dir) if world.is_leader else [])
    try:
        result = trainer.fit()
        # Commits an in-flight async save; a collective, so only on the success path (after a
        # failure another rank may be gone, and waiting for it would hang until the timeout).
        checkpoints.close()
    finally:
        trainer.reporter.close()
        preempt.uninstall()
    if trainer.graphs is not None:
        log(trainer.graphs.summary())
    if result["stopped"] == "preempted":
        why = preempt.signal_name or "another rank was signalled"
        if preempt.interrupted:
            print(f"interrupted (SIGINT): checkpoint committed at step {result['step']} in {run_dir}; run the same "
                  f"command with --train.run_dir {run_dir} to resume", file=sys.stderr, flush=True)
            return 130
        log(f"preempted ({why}): checkpoint committed at step {result['step']}")
        if world.is_leader:
            preempt.requeue(cfg.checkpoint.max_requeues, log)
        return 0
    finish(trainer, run_dir, result, world, log)
    return 0


def resume(cfg: Config, trainer: Trainer, checkpoints, log) -> None:
    if cfg.checkpoint.resume == "never":
        return
    state = trainer.checkpoint_state()
    if cfg.checkpoint.resume == "auto":
        loaded = checkpoints.load_latest(state)
    else:
        loaded = checkpoints.load(Path(cfg.checkpoint.resume), state)
    if loaded is None:
        return
    trainer.resumed(loaded)
    log(f"resumed from {loaded['path']} at step {trainer.state.step} "
        f"(saved by {loaded['world_size']} ranks, now {trainer.world.world_size}); "
        f"data position {_data_position(trainer.train_loader)}")


def _data_position(loader) -> str:
    """`loader.consumed` counts global batches, or in lm stream mode the targets of every row."""
    from distlstm.data.loader.stream_loader import StreamLoader
    if isinstance(loader, StreamLoader):
        return f"epoch {loader.epoch}, {loader.consumed} targets into every stream row"
    return f"epoch {loader.epoch}, batch {loader.consumed}"


def finish(trainer: Trainer, run_dir: Path, result: dict, world: World, log) -> None:
    """Final metrics and the trained weights: model.safetensors + config.json (+ the vocabulary),
    what `distlstm.load` and the other commands read; model.pt (plain tensors, loadable with
    torch.load(weights_only=True)) is kept for scripts written against earlier versions.
    final.json is written last and atomically: it marks the run finished (distlstm/run/rundir.py)."""
    from distlstm.checkpoint.codec import tree_hash
    model = unwrap(trainer.model)
    summary = {**result, "param_hash": tree_hash(model), "tokens": trainer.state.tokens,
               "samples": trainer.state.samples, "skipped_samples": trainer.state.bad_samples,
               "elapsed_s": round(trainer.state.elapsed_s, 2)}
    if world.is_leader:
        from distlstm.checkpoint.artifacts import write_model
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / "model.pt")
        write_model(model, trainer.cfg, run_dir, step=trainer.state.step)
        (run_dir / "final.json.tmp").write_text(json.dumps(summary, indent=1))
        (run_dir / "final.json.tmp").replace(run_dir / "final.json")
        metrics = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        log(f"done: {metrics}\nrun directory: {run_dir}")


if __name__ == "__main__":
    sys.exit(main())

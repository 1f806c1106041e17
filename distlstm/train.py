"""`python -m distlstm.train`: wire the pieces together and run the trainer.

    python -m distlstm.train                                  # embedded default, laptop CPU, ~1 minute
    python -m distlstm.train --config configs/shakespeare-excerpt.toml --optim.lr 3e-3
    torchrun --nproc_per_node=8 -m distlstm.train --config configs/shakespeare-char.toml
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from distlstm.checkpoint.artifacts import copy_data_files, write_model
from distlstm.checkpoint.codec import tree_hash
from distlstm.checkpoint.manager import CheckpointManager
from distlstm.config import (
    Config,
    RECIPE_KEYS,
    ConfigError,
    help_text,
    load_config,
    split_overrides,
    to_toml,
)
from distlstm.data.loader.stream_loader import StreamLoader
from distlstm.data.sources import redact
from distlstm.distributed.parallel import unwrap
from distlstm.distributed.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, PreemptionHandler
from distlstm.distributed.session import Session, run_command, session
from distlstm.distributed.world import World, describe
from distlstm.run.build import build_run, total_steps  # noqa: F401 (total_steps: public here too)
from distlstm.run.graphs import StepGraphs
from distlstm.run.report import Reporter, build_sinks, check_backends
from distlstm.run.rundir import default_run_dir, finished_message, lock_run_dir
from distlstm.run.rundir import release_all as release_run_locks
from distlstm.run.trainer import Trainer
from distlstm.tasks import TASKS, get_task

USAGE = """usage: python -m distlstm.train [--config FILE.toml] [--SECTION.KEY VALUE ...]

Train an LSTM on sharded data, as one process or under torchrun / srun (DDP).
With no arguments it trains the embedded default (a synthetic "which marker came last?"
classification task) on the CPU in about a minute.

Options are read from the defaults, then --config (a TOML file with [data], [model], ...
tables, see configs/), then the command line: --optim.lr 3e-3 or --optim.lr=3e-3; a
boolean alone (--train.debug) means true.

Exit status: 0 finished (or already finished); 2 a user error (one line naming the file, key or
flag); 75 stopped by SIGTERM or SIGUSR1 with a checkpoint committed (preempted: the same command
resumes it; under torchrun, torchrun itself exits 1 and reports the workers' exitcode 75);
130 Ctrl-C; anything else a crash.
"""


def parse_args(argv: list[str]) -> tuple[Config, str]:
    """(the config, its name for the default run directory: the --config file's stem or 'default')."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n" + task_defaults_text() + "\n" + help_text())
        raise SystemExit(0)
    own, overrides = split_overrides(argv)
    path = None
    while own:
        arg = own.pop(0)
        if arg == "--config":
            if not own:
                raise ConfigError("--config needs a file path")
            path = own.pop(0)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            raise ConfigError(f"unexpected argument {arg!r}; options look like --optim.lr 3e-3 (see --help)")
    cfg = load_config(path, overrides, task_defaults=lambda task: get_task(task).config_defaults)
    return cfg, Path(path).stem if path else "default"


def task_defaults_text() -> str:
    """--help: the defaults a task changes (`Task.config_defaults`), before the generic ones."""
    lines = []
    for name, task in TASKS.items():
        values = ", ".join(f"{section}.{key} = {value}" for section, kv in task.config_defaults.items()
                           for key, value in kv.items())
        if values:
            lines.append(f"model.task={name} starts from other defaults: {values}. A value you give wins; giving "
                         f"{' or '.join(f'optim.{k}' for k in RECIPE_KEYS['optim'])} (your own optimizer) keeps "
                         f"the generic [optim] defaults below.\n")
    return "".join(lines)


def _debug_mode(cfg: Config) -> None:
    if cfg.train.debug:
        os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
        torch.autograd.set_detect_anomaly(True)
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_run_dir(cfg: Config, config_name: str = "default") -> Path:
    """The run directory, the same on every rank (every rank has the same config): train.run_dir,
    else derived from the config (distlstm/run/rundir.py), so that the same command again resumes it."""
    run_dir = Path(cfg.train.run_dir or default_run_dir(cfg, config_name))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv, interrupted="interrupted before training started: nothing to save")


def _main(argv: list[str]) -> int:
    cfg, config_name = parse_args(argv)
    with session(cfg) as s:
        try:
            return run(cfg, s, config_name=config_name)
        finally:
            release_run_locks()


def run(cfg: Config, s: Session, config_name: str = "default") -> int:
    """Train in this session's process group: the run directory, the run (data, model, loaders),
    the trainer (resumed from the latest checkpoint), fit, then the final weights."""
    _debug_mode(cfg)
    run_dir = resolve_run_dir(cfg, config_name)
    done = finished_message(cfg, run_dir)
    if done:
        s.log(done)
        return 0
    # Before anything is written there: a second run in the same directory would destroy this one's.
    lock_run_dir(run_dir, is_leader=s.world.is_leader, group=s.group, log=s.log)
    s.log(f"run directory {run_dir} (the same command again resumes it)")
    grouped = s.world.is_distributed or cfg.train.ddp == "on"
    s.log(describe(s.world) + f", device {s.device}, backend {s.backend if grouped else '-'}"
          + (", DDP in a process group of one (train.ddp=on)" if grouped and not s.world.is_distributed else ""))
    check_backends(cfg)
    built = build_run(cfg, s.world, s.device, group=s.group, log=s.log, run_dir=run_dir)
    if s.world.is_leader:
        save_run_files(built, run_dir, s.log)
    trainer = build_trainer(built, s, run_dir)
    resume(built.cfg, trainer, trainer.checkpoints, s.log)
    result = fit(trainer)
    return close(trainer, result, run_dir)


def save_run_files(built, run_dir: Path, log) -> None:
    """The resolved config (model.input and the data-derived sizes filled in: it rebuilds this
    model) and the dataset's vocab.json / labels.json, what reads new text."""
    (run_dir / "config.toml").write_text(to_toml(built.cfg, redact=redact))
    copy_data_files(built.train_index, run_dir)
    log(f"config: {run_dir / 'config.toml'} (every option, resolved)")


def build_trainer(built, s: Session, run_dir: Path) -> Trainer:
    cfg, world = built.cfg, s.world
    checkpoints = CheckpointManager(run_dir / "checkpoints", rank=world.rank, world_size=world.world_size,
                                    keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                                    async_save=cfg.checkpoint.async_save, log=s.log)
    trainer = Trainer(cfg, world, model=built.ddp_model, optimizer=built.optimizer, scheduler=built.scheduler,
                      amp=built.amp, device=s.device, train_loader=built.train_loader,
                      valid_loader=built.valid_loader, control_group=s.group, checkpoints=checkpoints,
                      preempt=PreemptionHandler().install(), run_dir=run_dir, log=s.log)
    if cfg.train.cuda_graphs == "on":
        trainer.graphs = StepGraphs(trainer, limit=cfg.train.cuda_graph_limit, log=s.log)
    return trainer


def fit(trainer: Trainer) -> dict:
    """trainer.fit() with the reporter open; the reporter and the stop handler closed after."""
    cfg, world, run_dir = trainer.cfg, trainer.world, trainer.run_dir
    trainer.reporter = Reporter(run_dir, enabled=world.is_leader, total_steps=cfg.train.max_steps or None,
                                progress=cfg.log.progress, tensorboard=cfg.log.tensorboard,
                                start_step=trainer.state.step,
                                sinks=build_sinks(cfg, run_dir) if world.is_leader else [])
    try:
        result = trainer.fit()
        # Commits an in-flight async save; a collective, so only on the success path (after a
        # failure another rank may be gone, and waiting for it would hang until the timeout).
        trainer.checkpoints.close()
    finally:
        trainer.reporter.close()
        trainer.preempt.uninstall()
    return result


def close(trainer: Trainer, result: dict, run_dir: Path) -> int:
    """The exit status: a preempted run says how to resume it (and requeues itself under SLURM) and
    exits EXIT_PREEMPTED (75; 130 after Ctrl-C), so that a wrapper does not take it for finished; a
    finished one writes its final weights and exits 0."""
    preempt, log = trainer.preempt, trainer.log
    if trainer.graphs is not None:
        log(trainer.graphs.summary())
    if result["stopped"] == "preempted":
        why = preempt.signal_name or "another rank was signalled"
        if preempt.interrupted:
            print(f"interrupted (SIGINT): checkpoint committed at step {result['step']} in {run_dir}; run the same "
                  f"command with --train.run_dir {run_dir} to resume", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        log(f"preempted ({why}): checkpoint committed at step {result['step']} in {run_dir}; exit status "
            f"{EXIT_PREEMPTED}; the same command resumes it")
        if trainer.world.is_leader:
            # The requeue (SIGUSR1 under SLURM) does not depend on the exit status: scontrol kills and
            # requeues the job as soon as it accepts, and SLURM requeues a preempted --requeue job itself.
            preempt.requeue(trainer.cfg.checkpoint.max_requeues, log)
        return EXIT_PREEMPTED
    finish(trainer, run_dir, result, trainer.world, log)
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
    if isinstance(loader, StreamLoader):
        return f"epoch {loader.epoch}, {loader.consumed} targets into every stream row"
    return f"epoch {loader.epoch}, batch {loader.consumed}"


def finish(trainer: Trainer, run_dir: Path, result: dict, world: World, log) -> None:
    """Final metrics and the trained weights: model.safetensors + config.json (+ the vocabulary),
    what `distlstm.load` and the other commands read; model.pt (plain tensors, loadable with
    torch.load(weights_only=True)) is kept for scripts written against earlier versions.
    final.json is written last and atomically: it marks the run finished (distlstm/run/rundir.py)."""
    model = unwrap(trainer.model)
    summary = {**result, "param_hash": tree_hash(model), "tokens": trainer.state.tokens,
               "samples": trainer.state.samples, "skipped_samples": trainer.state.bad_samples,
               "elapsed_s": round(trainer.state.elapsed_s, 2)}
    if world.is_leader:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / "model.pt")
        write_model(model, trainer.cfg, run_dir, step=trainer.state.step)
        (run_dir / "final.json.tmp").write_text(json.dumps(summary, indent=1))
        (run_dir / "final.json.tmp").replace(run_dir / "final.json")
        metrics = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        log(f"done: {metrics}\nrun directory: {run_dir}")


if __name__ == "__main__":
    sys.exit(main())

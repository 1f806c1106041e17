"""`python -m distlstm.train`: wire the pieces together and run the trainer.

    python -m distlstm.train                                  # embedded default, laptop CPU, ~1 minute
    python -m distlstm.train --config configs/x.toml --optim.lr 3e-3
    torchrun --nproc_per_node=8 -m distlstm.train --config configs/x.toml
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distlstm.config import Config, ConfigError, help_text, load_config, to_toml
from distlstm.data.index import DatasetIndex, default_cache_dir, open_index
from distlstm.data.loader import build_loader
from distlstm.data.sources import redact
from distlstm.metrics import Reporter
from distlstm.models.lstm import build_model, num_parameters
from distlstm.parallel import AmpPolicy, all_reduce_host, apply_ddp, control_group, unwrap
from distlstm.trainer import Trainer, build_optimizer
from distlstm.world import (World, default_backend, default_device, describe, destroy_process_group, detect_world,
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _debug_mode(cfg: Config) -> None:
    if cfg.train.debug:
        os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
        torch.autograd.set_detect_anomaly(True)
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_run_dir(cfg: Config, world: World, group) -> Path:
    """The run directory, the same on every rank (the leader's timestamp is broadcast)."""
    name = cfg.train.run_dir or time.strftime("runs/%Y%m%d-%H%M%S")
    if world.is_distributed and not cfg.train.run_dir:
        box = [name]
        dist.broadcast_object_list(box, src=0, group=group)
        name = box[0]
    run_dir = Path(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_data(cfg: Config, log) -> tuple[DatasetIndex, DatasetIndex | None]:
    """Index the train and valid splits; the embedded synthetic dataset when data.train is empty."""
    d = cfg.data
    cache = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
    train, valid = d.train, d.valid
    if not train:
        from distlstm.data.synthetic import ensure_synthetic
        root = ensure_synthetic(cache, num_train=d.synthetic_samples)
        log(f"data: embedded synthetic dataset in {root}")
        train, valid = str(root / "train"), valid or str(root / "valid")
    kw = dict(fmt=d.format, sequence_column=d.sequence_column, label_column=d.label_column, cache_dir=cache,
              storage_options=d.storage_options, retries=d.retries)
    train_index = open_index(train, **kw)
    valid_index = open_index(valid, **kw) if valid else None
    log(f"data: train {redact(train)}: {train_index.num_samples} samples, {len(train_index.shards)} shards, "
        f"{int(train_index.lengths.astype(np.int64).sum())} tokens"
        + (f"; valid {valid_index.num_samples} samples" if valid_index else ""))
    return train_index, valid_index


INDEX_TIMEOUT_S = 3600


def index_data(cfg: Config, world: World, group, log) -> tuple[DatasetIndex, DatasetIndex | None]:
    """The leader indexes first (filling the shared cache), then the others (cache hits on a shared
    cache folder). The waits are gloo barriers with a long timeout: indexing a large remote dataset
    on a cold cache can take far longer than train.timeout_s, which bounds training collectives."""
    if not world.is_distributed:
        return load_data(cfg, log)
    wait = lambda: dist.monitored_barrier(group=group, timeout=timedelta(seconds=INDEX_TIMEOUT_S))  # noqa: E731
    result = load_data(cfg, log) if world.is_leader else None
    wait()
    if result is None:
        result = load_data(cfg, log)
    wait()
    return result


def model_dims(cfg: Config, index: DatasetIndex) -> dict:
    """vocab_size / input_size / num_classes from the config, else the dataset manifest."""
    m, meta = cfg.model, index.meta
    dims = {"vocab_size": m.vocab_size or meta.get("vocab_size") or 0,
            "input_size": m.input_size or meta.get("input_size") or 0,
            "num_classes": m.num_classes or meta.get("num_classes") or 0}
    if m.input == "features" and not dims["input_size"]:
        raise ConfigError("model.input_size is unknown: the dataset has no manifest with input_size; set it")
    needs_vocab = m.input != "features" and not dims["input_size"] or m.task == "lm"
    if needs_vocab and not dims["vocab_size"]:
        raise ConfigError("model.vocab_size is unknown: the dataset has no manifest with vocab_size; "
                          "set --model.vocab_size (largest token id + 1)")
    if m.task in ("classify", "tag") and not dims["num_classes"]:
        raise ConfigError("model.num_classes is unknown: the dataset has no manifest with num_classes; set it")
    return dims


def resolve_model_config(cfg: Config, index: DatasetIndex):
    """model.input=auto -> features when the dataset has feature vectors, else tokens."""
    m = cfg.model
    if m.input != "auto":
        return m
    features = bool(index.meta.get("input_size")) or index.sequence_column == "features"
    return dataclasses.replace(m, input="features" if features else "tokens")


def total_steps(cfg: Config, index: DatasetIndex, world: World) -> int:
    """Optimizer steps the run will take (what the cosine schedule spans): train.max_steps, or, for
    an epoch-limited run, the steps the data plan gives each rank over train.max_epochs."""
    from distlstm.data.loader import plan_params
    from distlstm.data.plan import EpochPlan
    epoch_steps = 0
    if cfg.train.max_epochs:
        params = plan_params(cfg.data)
        for epoch in range(cfg.train.max_epochs):
            plan = EpochPlan(index.chunk_offsets, index.lengths, params, seed=cfg.data.seed, epoch=epoch)
            epoch_steps += -(-plan.batches_per_rank(world.world_size) // cfg.train.accum_steps)
    if cfg.train.max_steps and epoch_steps:
        return min(cfg.train.max_steps, epoch_steps)
    return cfg.train.max_steps or epoch_steps


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
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
        code = run(cfg, world, device, backend)
        finished = True
        return code
    except (ValueError, OSError) as exc:
        # Bad input (config, data, paths) and I/O failures: the message names the file, row or key
        # and the fix; a traceback would only bury it. --train.debug keeps the traceback.
        if cfg.train.debug:
            raise
        print(f"error: rank {world.rank}: {exc}\n(--train.debug shows the traceback)", file=sys.stderr)
        return 2
    finally:
        destroy_process_group(barrier=finished)


def run(cfg: Config, world: World, device: torch.device, backend: str) -> int:
    log = (lambda msg: print(msg, flush=True)) if world.is_leader else (lambda msg: None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    _debug_mode(cfg)
    group = control_group(backend)
    run_dir = resolve_run_dir(cfg, world, group)
    if not cfg.train.run_dir and cfg.checkpoint.resume == "auto":
        log(f"run directory {run_dir} is new: to resume this run after a stop, start it again with "
            f"--train.run_dir {run_dir}")
    log(describe(world) + f", device {device}, backend {backend if world.is_distributed else '-'}")
    if world.is_leader:
        (run_dir / "config.toml").write_text(to_toml(cfg, redact=redact))
        log("config:\n" + to_toml(cfg, redact=redact))
    train_index, valid_index = index_data(cfg, world, group, log)
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg, train_index))
    dims = model_dims(cfg, train_index)

    _seed_everything(cfg.train.seed)
    model = build_model(cfg.model, **dims).to(device)
    log(f"model: {cfg.model.task}, {num_parameters(model):,} parameters")
    # Each rank gets its own dropout stream; DDP broadcasts rank 0's initial weights.
    torch.manual_seed(cfg.train.seed + 1000 * world.rank)
    ddp_model = apply_ddp(model, world, device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps(cfg, train_index, world), device)
    amp = AmpPolicy(cfg.train.precision, device)

    def agree(value: int) -> bool:
        lo, hi = all_reduce_host([float(-value), float(value)], group, op=dist.ReduceOp.MAX)
        return -lo == hi == value

    loader_kw = dict(task=cfg.model.task, dp_rank=world.rank, dp_world_size=world.world_size,
                     vocab_size=dims["vocab_size"], num_classes=dims["num_classes"],
                     pin_memory=device.type == "cuda", run_dir=run_dir)
    train_loader = build_loader(train_index, cfg.data, agree=agree if world.is_distributed else None,
                                max_epochs=cfg.train.max_epochs, **loader_kw)
    valid_loader = build_loader(valid_index, cfg.data, shuffle=False, max_epochs=1, num_workers=0,
                                **loader_kw) if valid_index else None

    from distlstm.checkpoint import CheckpointManager
    from distlstm.preempt import PreemptionHandler
    checkpoints = CheckpointManager(run_dir / "checkpoints", rank=world.rank, world_size=world.world_size,
                                    keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                                    async_save=cfg.checkpoint.async_save, log=log)
    preempt = PreemptionHandler().install()
    trainer = Trainer(cfg, world, model=ddp_model, optimizer=optimizer, scheduler=scheduler, amp=amp, device=device,
                      train_loader=train_loader, valid_loader=valid_loader, control_group=group,
                      checkpoints=checkpoints, preempt=preempt, run_dir=run_dir, log=log)
    resume(cfg, trainer, checkpoints, log)
    total = cfg.train.max_steps or None
    trainer.reporter = Reporter(run_dir, enabled=world.is_leader, total_steps=total, progress=cfg.log.progress,
                                tensorboard=cfg.log.tensorboard, start_step=trainer.state.step)
    try:
        result = trainer.fit()
        # Commits an in-flight async save; a collective, so only on the success path (after a
        # failure another rank may be gone, and waiting for it would hang until the timeout).
        checkpoints.close()
    finally:
        trainer.reporter.close()
        preempt.uninstall()
    if result["stopped"] == "preempted":
        why = preempt.signal_name or "another rank was signalled"
        log(f"preempted ({why}): checkpoint committed at step {result['step']}")
        if world.is_leader:
            preempt.requeue(cfg.checkpoint.max_requeues, log)
        return 0
    finish(trainer, run_dir, result, world, log)
    return 0


def resume(cfg: Config, trainer: Trainer, checkpoints, log) -> None:
    if cfg.checkpoint.resume == "never":
        return
    state = trainer.app_state()
    if cfg.checkpoint.resume == "auto":
        loaded = checkpoints.load_latest(state)
    else:
        loaded = checkpoints.load(Path(cfg.checkpoint.resume), state)
    if loaded is None:
        return
    trainer.restore(loaded)
    log(f"resumed from {loaded['path']} at step {trainer.state.step} "
        f"(saved by {loaded['world_size']} ranks, now {trainer.world.world_size}); "
        f"data position epoch {trainer.train_loader.epoch}, batch {trainer.train_loader.consumed}")


def finish(trainer: Trainer, run_dir: Path, result: dict, world: World, log) -> None:
    """Final metrics and the trained weights (plain tensors, loadable with weights_only=True)."""
    from distlstm.train_state import tree_hash
    model = unwrap(trainer.model)
    summary = {**result, "param_hash": tree_hash(model), "tokens": trainer.state.tokens,
               "elapsed_s": round(trainer.state.elapsed_s, 2)}
    if world.is_leader:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / "model.pt")
        (run_dir / "final.json").write_text(json.dumps(summary, indent=1))
        metrics = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        log(f"done: {metrics}\nrun directory: {run_dir}")


if __name__ == "__main__":
    sys.exit(main())

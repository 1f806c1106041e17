"""One way to build a run, shared by `train`, `evaluate` and `predict`: index the data, resolve the
config against it, build the model (DDP-wrapped where there are several ranks), the optimizer and
schedule, the mixed-precision policy and the loaders.

    run = build_run(cfg, world, device, group=group, log=log, run_dir=run_dir)
    run.cfg             # resolved: model.input and the sizes that come from the data are filled in
    run.model           # the bare model; run.ddp_model is what the trainer steps

The process group, the run directory, checkpoints, preemption and reporting belong to the command
that uses the run (see distlstm/train.py).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distlstm.run.autotune import resolve_auto
from distlstm.config import Config, ConfigError
from distlstm.data.shards.dims import DataDims
from distlstm.data.shards.manifest import Manifest
from distlstm.data.shards.index import DatasetIndex, default_cache_dir, open_index
from distlstm.data.loader.batch_loader import BatchLoader, build_loader, plan_params, streams_for
from distlstm.data.plan.epoch import EpochPlan
from distlstm.data.sources import network_options, read_bytes, redact
from distlstm.run.graphs import use_training_stream
from distlstm.data.loader.stream_loader import build_stream_loader
from distlstm.models.lstm import SequenceModel, build_model, check_memory, host_memory_bytes, num_parameters
from distlstm.distributed.parallel import AmpPolicy, all_reduce_host, apply_ddp, ddp_options
from distlstm.run.bptt import check_config, uses_stream
from distlstm.tasks import Task, get_task
from distlstm.distributed.world import World
from distlstm.run.trainer import build_optimizer
from distlstm.data.prep.synthetic import ensure_synthetic

INDEX_TIMEOUT_S = 3600


@dataclass
class Run:
    """Everything a command needs to train, evaluate or predict."""

    cfg: Config
    world: World
    device: torch.device
    group: Any
    model: SequenceModel
    ddp_model: nn.Module
    amp: AmpPolicy
    train_index: DatasetIndex | None = None
    valid_index: DatasetIndex | None = None
    train_loader: BatchLoader | None = None
    valid_loader: BatchLoader | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None

    @property
    def task(self) -> Task:
        return self.model.spec


def device_memory_bytes(device: torch.device) -> int:
    """What the model and its training state may take on `device`: the GPU's memory, else the host's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory_bytes()


def build_run(cfg: Config, world: World, device: torch.device, *, group, log: Callable[[str], Any],
              run_dir: Path | None = None, training: bool = True, labelled: bool = True) -> Run:
    """Index, resolve, build. `training=False` (evaluate, predict): only data.valid is indexed and
    loaded, and there is no optimizer; the config must then already be resolved (a run's saved
    config is) or data.valid must carry the sizes in its manifest. `labelled=False` (predict): the
    validation loader reads no labels (`Task.unlabelled`)."""
    if training:
        cfg = prepared_root_splits(cfg, log)
    train_index, valid_index = index_data(cfg, world, group, log, train=training)
    cfg = resolve_config(cfg, train_index if training else valid_index, valid_index=valid_index, log=log)
    check_split_vocab(cfg, train_index, valid_index)
    check_config(cfg)
    _seed_everything(cfg.train.seed)
    check_memory(cfg.model, budget_bytes=device_memory_bytes(device), training=training,
                 tokens_per_batch=cfg.data.max_tokens if isinstance(cfg.data.max_tokens, int) and training else 0,
                 where="config")
    model = build_model(cfg.model).to(device)
    log(f"model: {cfg.model.task}, {num_parameters(model):,} parameters")
    amp = AmpPolicy(cfg.train.precision, device)
    log(f"precision: {amp.describe()}")
    if training:
        # train.cuda_graphs, data.shape_buckets, data.max_tokens = auto: resolved for this device.
        cfg = resolve_auto(cfg, device=device, model=model, amp=amp, group=group if world.is_distributed else None,
                           run_dir=run_dir, log=log)
        if cfg.train.cuda_graphs == "on":
            use_training_stream(device)  # before DDP: its gradient hooks belong to the stream it is built on
    # Each rank gets its own dropout stream; DDP broadcasts rank 0's initial weights.
    torch.manual_seed(cfg.train.seed + 1000 * world.rank)
    opts = ddp_options(cfg.train)
    ddp_model = apply_ddp(model, world, device, **opts) if training else model
    if ddp_model is not model:
        log(f"ddp: DistributedDataParallel over {world.world_size} rank(s), {opts['bucket_mb']:g} MB buckets, "
            f"static_graph {'on' if opts['static_graph'] else 'off'}")
    optimizer = scheduler = None
    if training:
        optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps(cfg, train_index, world), device)
    if not labelled and valid_index is not None:
        valid_index.label_column = None
    train_loader, valid_loader = build_loaders(cfg, world, device, group, run_dir, train_index, valid_index, log=log,
                                               labelled=labelled)
    if train_loader is not None:
        log(f"data: plan: {train_loader.describe()}")
    return Run(cfg=cfg, world=world, device=device, group=group, model=model, ddp_model=ddp_model, amp=amp,
               train_index=train_index, valid_index=valid_index, train_loader=train_loader,
               valid_loader=valid_loader, optimizer=optimizer, scheduler=scheduler)


def build_loaders(cfg: Config, world: World, device: torch.device, group, run_dir: Path | None,
                  train_index: DatasetIndex | None, valid_index: DatasetIndex | None, log=print,
                  labelled: bool = True):
    """This rank's training loader (shuffled, workers, the plan-hash check across ranks) and
    validation loader (in order, in-process, one pass). lm stream mode: stream loaders over the
    contiguous token stream instead (distlstm/data/loader/stream_loader.py)."""
    def agree(value: int) -> bool:
        lo, hi = all_reduce_host([float(-value), float(value)], group, op=dist.ReduceOp.MAX)
        return -lo == hi == value

    m = cfg.model
    if uses_stream(cfg):
        kw = dict(dp_rank=world.rank, dp_world_size=world.world_size, vocab_size=m.vocab_size,
                  pin_memory=device.type == "cuda", log=log)
        train = build_stream_loader(train_index, cfg.data, agree=agree if world.is_distributed else None,
                                    max_epochs=cfg.train.max_epochs, **kw) if train_index is not None else None
        valid = build_stream_loader(valid_index, cfg.data, max_epochs=1, num_workers=0, split="valid",
                                    **kw) if valid_index is not None else None
        return train, valid
    # On a GPU the batches arrive on it, copied one step ahead (distlstm/data/loader/prefetch.py).
    kw = dict(task=m.task, dp_rank=world.rank, dp_world_size=world.world_size, vocab_size=m.vocab_size,
              num_classes=m.num_classes, pin_memory=device.type == "cuda", run_dir=run_dir,
              device=device if device.type == "cuda" else None,
              input_size=m.input_size if m.input == "features" else 0)  # what each chunk must hold
    train = build_loader(train_index, cfg.data, agree=agree if world.is_distributed else None,
                         max_epochs=cfg.train.max_epochs, **kw) if train_index is not None else None
    valid_task = get_task(m.task) if labelled else get_task(m.task).unlabelled()
    valid = build_loader(valid_index, cfg.data, shuffle=False, max_epochs=1, num_workers=0,
                         **{**kw, "task": valid_task}) if valid_index is not None else None
    return train, valid


# ---------------------------------------------------------------------------------------------- data


class IndexProgress:
    """`progress(done, total)` for indexing: silent for the first 10 s, then a line every 10 s with
    the shards done and an ETA (a cold index of a large remote dataset can take minutes)."""

    def __init__(self, what: str, log, every_s: float = 10.0):
        self.what, self.log, self.every_s = what, log, every_s
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or done >= total:
            return
        self.last = now
        eta = (now - self.started) / done * (total - done)
        self.log(f"data: indexing {self.what}: {done}/{total} shards, {now - self.started:.0f} s, ETA {eta:.0f} s")


def load_data(cfg: Config, log, *, train: bool = True, share: tuple[int, int] | None = None
              ) -> tuple[DatasetIndex | None, DatasetIndex | None] | int:
    """Index the train (if `train`) and valid splits; the embedded synthetic dataset when data.train
    is empty. With `share=(i, n)`, only fill the index cache with this rank's share of the shards
    and return how many were read (see `index_data`)."""
    d = cfg.data
    cache = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
    train_spec, valid_spec = d.train, d.valid
    if not train_spec:
        root = ensure_synthetic(cache, num_train=d.synthetic_samples)
        log(f"data: embedded synthetic dataset in {root}")
        train_spec, valid_spec = str(root / "train"), valid_spec or str(root / "valid")
    kw = dict(fmt=d.format, sequence_column=d.sequence_column, label_column=d.label_column, cache_dir=cache,
              storage_options=storage_options(d), retries=d.retries, task=cfg.model.task,
              whole_shard_max_mb=d.whole_shard_max_mb, verify=d.verify)
    if share is not None:
        return sum(open_index(spec, share=share, progress=IndexProgress(redact(spec), log), **kw)
                   for spec in ([train_spec] if train else []) + ([valid_spec] if valid_spec else []))
    train_index = open_index(train_spec, progress=IndexProgress(redact(train_spec), log), **kw) if train else None
    valid_index = open_index(valid_spec, progress=IndexProgress(redact(valid_spec), log), **kw) if valid_spec else None
    parts = []
    if train_index is not None:
        parts.append(f"train {redact(train_spec)}: {train_index.num_samples} samples, {len(train_index.shards)} "
                     f"shards, {train_index.num_tokens} tokens")
    if valid_index is not None:
        parts.append(f"valid {redact(valid_spec)}: {valid_index.num_samples} samples")
    log("data: " + "; ".join(parts or ["none"]))
    return train_index, valid_index


def storage_options(d) -> dict:
    """The user's data.storage_options with the network timeouts (data.connect_timeout_s,
    data.read_timeout_s) added: what every read of the data gets."""
    return network_options(d.storage_options, connect_timeout_s=d.connect_timeout_s, read_timeout_s=d.read_timeout_s)


def prepared_root_splits(cfg: Config, log) -> Config:
    """data.train naming prep's output root (OUT, whose splits are OUT/train and OUT/valid) rather
    than a split: train on OUT/train and, unless data.valid is given, validate on OUT/valid. The
    config then names the splits, so the saved config (evaluate's default split) names them too."""
    d = cfg.data
    spec = d.train.rstrip("/")
    opts = dict(storage_options=storage_options(d), retries=d.retries)
    name = spec.split("?")[0].lower()
    if not spec or any(c in spec for c in "*?[{,") or name.endswith((".parquet", ".pq", ".tar", ".tgz", ".gz", ".json")):
        return cfg  # files, globs, lists: not a folder that could be prep's output root
    try:
        if Manifest.find(spec, **opts) is not None or Manifest.find(f"{spec}/train", **opts) is None:
            return cfg  # a split, or not a prepared root: open_index says what is wrong with the spec
    except Exception:  # noqa: BLE001 -- unreadable spec: open_index reports it, naming what the user gave
        return cfg
    valid = d.valid or (f"{spec}/valid" if Manifest.find(f"{spec}/valid", **opts) is not None else "")
    chosen = "given by data.valid" if d.valid else "none: no valid/ there" if not valid else redact(valid)
    log(f"data: {redact(spec)} is a prepared dataset (distlstm.prep's output): training on {redact(spec)}/train, "
        f"validating on {chosen}")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, train=f"{spec}/train", valid=valid))


def check_split_vocab(cfg: Config, train_index: DatasetIndex | None, valid_index: DatasetIndex | None) -> None:
    """Before step 1: every split's token ids fit the model's vocabulary and mean the same tokens.
    Without this a split prepped on its own (its own vocab.json, or larger ids) fails only when it
    is first read, for valid after a whole epoch, with an error that blames the data."""
    m = cfg.model
    if m.input != "tokens" or not m.vocab_size:
        return
    splits = [(name, ix) for name, ix in (("data.train", train_index), ("data.valid", valid_index)) if ix is not None]
    for name, ix in splits:
        manifest = ix.manifest
        size = manifest.vocab_size if manifest and manifest.vocab_size else None
        if size is None and not (manifest and manifest.vocab):
            size = DataDims(ix).vocab_size or None  # raw Parquet: its footers' statistics
        if size is not None and size > m.vocab_size:
            fix = ("prep it with the training split's vocabulary (distlstm.prep --vocab <train prep>/vocab.json)"
                   if manifest and manifest.vocab else f"set --model.vocab_size {size} (or larger)")
            raise ConfigError(f"{name} {redact(getattr(cfg.data, name.split('.')[1]))} holds token ids up to "
                              f"{size - 1}, beyond model.vocab_size={m.vocab_size}; {fix}")
    with_vocab = [ix for _, ix in splits if ix.manifest and ix.manifest.vocab]
    if len(with_vocab) == 2:
        files = [ix.manifest.resource(ix.manifest.vocab) for ix in with_vocab]
        contents = {_vocab_bytes(url, ix) for url, ix in zip(files, with_vocab)} if files[0] != files[1] else set()
    else:
        contents = set()
    if len(contents) == 2 and None not in contents:
        raise ConfigError(f"data.train {redact(cfg.data.train)} and data.valid {redact(cfg.data.valid)} were prepped "
                          f"with different vocabularies (their vocab.json differ), so the same id means different "
                          f"tokens; prep data.valid again with the training split's vocabulary: distlstm.prep ... "
                          f"--vocab <train prep>/vocab.json")


def _vocab_bytes(url: str, ix: DatasetIndex) -> bytes | None:
    try:
        return read_bytes(url, storage_options=ix.storage_options, retries=ix.retries)
    except FileNotFoundError:
        return None


def index_data(cfg: Config, world: World, group, log, *, train: bool = True):
    """Every rank indexes 1/N of the shards into the index cache (rank r: shards r, r+N, ...), then
    all open the whole index from it: one pass over a cold dataset between the ranks, not one per
    rank, when the ranks share the cache folder (data.cache_dir; a node-local cache indexes the
    other nodes' shares again). The waits are gloo barriers with a long timeout: indexing a large
    remote dataset on a cold cache can take far longer than train.timeout_s, which bounds training
    collectives."""
    if not world.is_distributed:
        return load_data(cfg, log, train=train)
    wait = lambda: dist.monitored_barrier(group=group, timeout=timedelta(seconds=INDEX_TIMEOUT_S))  # noqa: E731
    read = load_data(cfg, log if world.is_leader else (lambda msg: None), train=train,
                     share=(world.rank, world.world_size))
    wait()
    counts = [None] * world.world_size
    dist.all_gather_object(counts, read, group=group)
    if sum(counts):
        log(f"data: indexing split across {world.world_size} ranks: {' + '.join(map(str, counts))} shards read")
    result = load_data(cfg, log, train=train)
    wait()
    return result


# ---------------------------------------------------------------------------------------------- config


def resolve_config(cfg: Config, index: DatasetIndex | None, *, valid_index: DatasetIndex | None = None,
                   log: Callable[[str], Any] | None = None) -> Config:
    """`cfg` with `model.input` decided (auto -> features when the data has feature vectors) and the
    sizes that come from the data (vocab, features, classes) filled in, so that the saved config
    rebuilds the same model: from the config, else the manifest, else (raw Parquet) the shards'
    footers (`distlstm.data.shards.dims`: the vocabulary spans `index` and `valid_index`). Errors name the
    key to set when a size is unknown."""
    m = cfg.model
    task = get_task(m.task)
    dims = index.manifest.dims() if index is not None and index.manifest else {}
    data = DataDims(index, valid_index)  # read lazily, only for sizes nothing else gives
    vocab_size = m.vocab_size or dims.get("vocab_size", 0)
    input_size = m.input_size or dims.get("input_size", 0)
    if not input_size and m.input != "tokens" and not dims.get("vocab_size"):
        input_size = data.input_size
    num_classes = m.num_classes or dims.get("num_classes", 0)
    model_input = m.input
    if model_input == "auto":
        features = bool(input_size) or (index is not None and index.sequence_column == "features")
        model_input = "features" if features else "tokens"
    if model_input == "features" and not input_size:
        raise ConfigError("model.input_size is unknown: the dataset has no manifest with input_size and its "
                          "feature column is not a list of fixed_size_list; set --model.input_size")
    needs_vocab = model_input != "features" and not input_size or task.predicts_tokens
    if needs_vocab and not vocab_size and data.vocab_size:
        vocab_size = data.vocab_size
        if log is not None:
            log(f"model.vocab_size={vocab_size}: largest token id + 1 in the Parquet statistics of "
                f"{data.num_shards} shard(s) (no manifest gives it; --model.vocab_size overrides it)")
    if needs_vocab and not vocab_size:
        raise ConfigError("model.vocab_size is unknown: the dataset has no manifest with vocab_size and its "
                          "shards have no token statistics; set --model.vocab_size (largest token id + 1)")
    if task.needs_classes and not num_classes:
        raise ConfigError("model.num_classes is unknown: the dataset has no manifest with num_classes; set it")
    model = dataclasses.replace(m, input=model_input, vocab_size=vocab_size, input_size=input_size,
                                num_classes=num_classes)
    return dataclasses.replace(cfg, model=model)


def total_steps(cfg: Config, index: DatasetIndex, world: World) -> int:
    """Optimizer steps the run will take (what the cosine schedule spans): train.max_steps, or, for
    an epoch-limited run, the steps the data plan gives each rank over train.max_epochs."""
    epoch_steps = 0
    if cfg.train.max_epochs and uses_stream(cfg):
        # Only counting steps: build_loaders logs the loader's notes once, through the run's log.
        loader = build_stream_loader(index, cfg.data, dp_rank=0, dp_world_size=world.world_size, vocab_size=0,
                                     pin_memory=False, log=lambda msg: None)
        for epoch in range(cfg.train.max_epochs):
            epoch_steps += -(-loader.steps_per_epoch(epoch) // cfg.train.accum_steps)
    elif cfg.train.max_epochs:
        params = plan_params(cfg.data, streams=streams_for(cfg.data, index, dp_world_size=world.world_size))
        for epoch in range(cfg.train.max_epochs):
            plan = EpochPlan.of(index.chunk_lengths, params, seed=cfg.data.seed, epoch=epoch)
            epoch_steps += -(-plan.batches_per_rank(world.world_size) // cfg.train.accum_steps)
    if cfg.train.max_steps and epoch_steps:
        return min(cfg.train.max_steps, epoch_steps)
    return cfg.train.max_steps or epoch_steps


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

"""Configuration: one small dataclass per component, a TOML file, dotted command-line overrides.

    python -m distlstm.train --config configs/shakespeare-char.toml --optim.lr 3e-3 --model.hidden_size 512

The dataclass defaults *are* the embedded default run (`configs/default.toml` spells them out).
Unknown sections or keys, wrong types and impossible values raise `ConfigError` naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


def opt(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its one-line doc (shown by --help) and, for strings, the allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _check_choices(section: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{section}.{f.name}={value!r} is not allowed; choose one of {', '.join(choices)}")


AUTO = "auto"
CPU_MAX_TOKENS = 8192
"""data.max_tokens = auto without a GPU: the default budget, sized for a laptop CPU."""
IntOrAuto = int | Literal["auto"]
"""An integer option that may also be "auto" (resolved once the device is known: distlstm/run/autotune.py)."""


def _positive(section: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value == AUTO:
            continue
        if not (value > 0 or (value == 0 and allow_zero)):  # also rejects nan
            need = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{section}.{name}={value!r} must be {need}")


LOG_BACKENDS = ("mlflow", "wandb")


def _metric_name(key: str, value: str) -> None:
    if not value.startswith("valid_") or value == "valid_items":
        raise ConfigError(f"{key}={value!r} is not a validation metric; use valid_loss or valid_<metric> "
                          "(valid_accuracy for classify/tag, valid_perplexity for lm, valid_mse for regress)")


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Where the samples come from and how they are batched."""

    train: str = opt("", "training shards: a prepared dataset folder, files, globs, brace ranges or URLs "
                         "(comma-separated); empty = the embedded synthetic dataset")
    valid: str = opt("", "validation shards, same forms as data.train; empty = none (or the synthetic split)")
    format: str = opt("auto", "shard format; auto = from the file suffix", ("auto", "parquet", "tar"))
    sequence_column: str = opt("", "Parquet column holding each sample's sequence; empty = from the manifest, "
                                   "else 'tokens' or 'features'")
    label_column: str = opt("", "Parquet column holding the label/target; empty = from the manifest, else 'label'")
    max_tokens: IntOrAuto = opt(CPU_MAX_TOKENS, "token budget per batch: batch size x padded length stays below "
                                                "it; auto = on CUDA the largest budget that fits the GPU's "
                                                "memory (a short probe, logged), on CPU 8192")
    min_batch_size: int = opt(8, "batch-size floor for long buckets (an LSTM starves on tiny batches)")
    max_batch_size: int = opt(0, "batch-size cap; 0 = none")
    max_length: int = opt(1024, "longest sequence fed to the model; see data.too_long")
    too_long: str = opt("truncate", "what to do with a sample longer than data.max_length; chunk (tag, lm "
                                    "windows): train it whole as consecutive max_length pieces, the LSTM state "
                                    "carried from one to the next (truncated BPTT inside the sample)",
                        ("truncate", "drop", "error", "chunk"))
    window_chunks: int = opt(16, "chunks (row groups or tar shards) shuffled and bucketed together; "
                                 "memory per worker grows with it")
    streams: IntOrAuto = opt(AUTO, "plan streams: chunks are dealt to streams and each global batch comes "
                                     "from one; auto = ranks x workers, so each chunk is read and decoded by "
                                     "one worker of one rank per epoch; 1 = every worker reads every window")
    num_workers: int = opt(1, "DataLoader worker processes per rank; 0 = load in the training process")
    prefetch_factor: int = opt(4, "batches each worker prepares ahead")
    seed: int = opt(1234, "seed of the shuffling plan (shard order, windows, batch order)")
    on_bad_sample: str = opt("error", "a corrupt or invalid sample: stop with its shard and row, or skip it "
                                      "(counted, quarantined in the run directory)", ("error", "skip"))
    cache_dir: str = opt("", "where indexes and the synthetic dataset are cached; empty = ~/.cache/distlstm")
    retries: int = opt(3, "retries of a remote read after its first attempt (connection error, timeout, HTTP "
                          "5xx / 429), with exponential back-off; 0 = one attempt")
    connect_timeout_s: float = opt(10.0, "seconds to open a connection to a remote server before the attempt "
                                         "fails (and is retried)")
    read_timeout_s: float = opt(30.0, "seconds a remote server may send nothing (no headers, or a stalled "
                                      "body) before the attempt fails (and is retried)")
    storage_options: dict = opt({}, "fsspec storage options for remote URLs (credentials are never logged)")
    synthetic_samples: int = opt(12000, "size of the embedded synthetic training set (when data.train is empty)")
    shape_buckets: IntOrAuto = opt(AUTO, "bounded batch shapes: at most N distinct (batch size, padded length) "
                                         "shapes per run (what CUDA graphs need), padding rows and lengths up to "
                                         "them; 0 = pad each batch to its longest sample; auto = 64 when "
                                         "train.cuda_graphs is on, else 0")
    whole_shard_max_mb: float = opt(256.0, "an HTTP server that ignores byte ranges sends whole shards: each "
                                           "process keeps up to this many MB of them (larger shards are an error)")
    max_bad_fraction: float = opt(0.01, "with on_bad_sample=skip: stop the run when more than this fraction of "
                                        "the samples seen were skipped as bad (checked as it goes and at the end)")
    verify: str = opt("size", "check shards against the dataset manifest when indexing: size (one stat per "
                              "shard), sha256 (reads every shard once), none", ("size", "sha256", "none"))
    lm_mode: str = opt("stream", "model.task=lm: stream = the data is one token stream in B contiguous rows per "
                                 "rank, fed in data.bptt-token chunks with the LSTM state carried across steps "
                                 "(reset at document starts); windows = every row is an independent sample, "
                                 "batched like the other tasks", ("stream", "windows"))
    bptt: int = opt(35, "lm stream mode: tokens per row in each chunk (truncated BPTT length)")
    batch_size: int = opt(20, "lm stream mode: contiguous rows per rank (the batch size of every chunk); "
                              "other modes size batches by data.max_tokens")
    bptt_jitter: bool = opt(False, "lm stream mode: AWD-LSTM variable chunk length (data.bptt, or half of it "
                                   "1 time in 20, plus N(0, 5) noise, at least 5)")
    state_reset: float = opt(0.05, "lm stream mode, training: probability that a row's carried LSTM state is "
                                   "zeroed before a chunk, on top of document starts, so the model also learns "
                                   "to start from a zero state (what generation from a short prompt does); "
                                   "drawn per (data.seed, epoch, chunk, row), so resumes and any number of "
                                   "ranks see the same resets; 0 = only at document starts; in [0, 1)")

    def __post_init__(self) -> None:
        _check_choices("data", self)
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if not 0.0 <= self.state_reset < 1.0:  # also rejects nan
            raise ConfigError(f"data.state_reset={self.state_reset!r} must be in [0, 1) (a probability per row "
                              f"and chunk; 0 = reset the LSTM state only at document starts)")
        _positive("data", self, "max_tokens", "min_batch_size", "max_length", "window_chunks", "prefetch_factor",
                  "streams", "synthetic_samples", "whole_shard_max_mb", "connect_timeout_s", "read_timeout_s",
                  "bptt", "batch_size")
        _positive("data", self, "max_batch_size", "num_workers", "shape_buckets", "retries", allow_zero=True)
        if self.max_batch_size and self.max_batch_size < self.min_batch_size:
            raise ConfigError(f"data.max_batch_size={self.max_batch_size} is below "
                              f"data.min_batch_size={self.min_batch_size}")

    def host_defaults(self) -> "DataConfig":
        """This section with the device-dependent "auto"s that nothing resolved for a GPU
        (distlstm/run/autotune.py) given their host meaning: data.max_tokens 8192, exact shapes
        (data.shape_buckets 0). data.streams=auto stays: the loader resolves it from the chunk count."""
        return dataclasses.replace(self, max_tokens=CPU_MAX_TOKENS if self.max_tokens == AUTO else self.max_tokens,
                                   shape_buckets=0 if self.shape_buckets == AUTO else self.shape_buckets)


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """The LSTM encoder and its task head."""

    task: str = opt("classify", "what the model predicts", ("classify", "regress", "tag", "lm"))
    input: str = opt("auto", "token ids (embedding) or float feature vectors; auto = from the data",
                     ("auto", "tokens", "features"))
    vocab_size: int = opt(0, "token vocabulary size; 0 = from the dataset manifest")
    input_size: int = opt(0, "feature vector size; 0 = from the dataset manifest")
    num_classes: int = opt(0, "classes for classify/tag; 0 = from the dataset manifest")
    num_targets: int = opt(1, "regression outputs per sample")
    embed_size: int = opt(64, "embedding size for token inputs")
    hidden_size: int = opt(128, "LSTM hidden size")
    num_layers: int = opt(1, "stacked LSTM layers")
    dropout: float = opt(0.0, "dropout between layers and before the head")
    bidirectional: bool = opt(False, "run a backward LSTM too (not for lm)")
    proj_size: int = opt(0, "LSTM output projection size (nn.LSTM proj_size); 0 = none")
    tie_weights: bool = opt(False, "lm only: share the embedding with the output layer")
    embed_dropout: float = opt(0.0, "dropout on the LSTM's input (the token embeddings, or the feature vectors)")

    def __post_init__(self) -> None:
        _check_choices("model", self)
        _positive("model", self, "embed_size", "hidden_size", "num_layers", "num_targets")
        _positive("model", self, "vocab_size", "input_size", "num_classes", "proj_size", allow_zero=True)
        for name in ("dropout", "embed_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:  # nan fails too
                raise ConfigError(f"model.{name}={getattr(self, name)} must be in [0, 1)")


@dataclass(kw_only=True, frozen=True)
class OptimConfig:
    """The optimizer (AdamW by default; Adam or SGD) with linear warmup, then cosine, constant or plateau."""

    lr: float = opt(3e-3, "peak learning rate")
    weight_decay: float = opt(0.01, "weight decay of matrices: decoupled for adamw; an L2 term in the gradient "
                                    "for adam and sgd (the classic SGD recipe uses 0)")
    beta1: float = opt(0.9, "Adam/AdamW beta1")
    beta2: float = opt(0.99, "Adam/AdamW beta2")
    eps: float = opt(1e-8, "Adam/AdamW epsilon")
    warmup_steps: int = opt(30, "optimizer steps of linear warmup")
    schedule: str = opt("cosine", "learning-rate decay after warmup; plateau = constant, multiplied by "
                                  "optim.plateau_factor when the validation loss stalls",
                        ("cosine", "constant", "plateau"))
    min_lr_ratio: float = opt(0.1, "cosine decays to lr x this at the last step (train.max_steps, or the steps of train.max_epochs)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (after unscaling); 0 = off")
    name: str = opt("adamw", "the optimizer", ("adamw", "adam", "sgd"))
    momentum: float = opt(0.0, "sgd momentum; 0 = plain SGD")
    nesterov: bool = opt(False, "sgd: Nesterov momentum (needs optim.momentum > 0)")
    plateau_factor: float = opt(0.25, "schedule plateau: multiply the lr by this when the validation loss has "
                                      "not improved for optim.plateau_patience evaluations")
    plateau_patience: int = opt(1, "schedule plateau: evaluations without a new best validation loss before "
                                   "the lr is reduced (train.eval_every sets how often they happen)")

    def __post_init__(self) -> None:
        _check_choices("optim", self)
        _positive("optim", self, "lr", "eps", "plateau_patience")
        _positive("optim", self, "weight_decay", "warmup_steps", "grad_clip", allow_zero=True)
        for name in ("beta1", "beta2", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # nan fails too
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1]")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum={self.momentum} must be in [0, 1)")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ConfigError(f"optim.plateau_factor={self.plateau_factor} must be in (0, 1)")
        if self.name != "sgd" and (self.momentum or self.nesterov):
            raise ConfigError(f"optim.momentum / optim.nesterov apply to optim.name=sgd, not {self.name!r} "
                              f"(Adam's momentum is optim.beta1); set optim.name=sgd or leave them at 0 / false")
        if self.nesterov and not self.momentum:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0 (e.g. 0.9)")
        # SGD's weight decay is an L2 term, so every step shrinks the weights by lr x weight_decay: with
        # the large learning rates SGD is run at (lr 20 in the classic LM recipe), AdamW's default 0.01
        # would take a fifth off every weight per step.
        if self.name == "sgd" and self.lr * self.weight_decay >= 0.01:
            raise ConfigError(f"optim.name=sgd with optim.lr={self.lr} and optim.weight_decay={self.weight_decay} "
                              f"shrinks every weight by {self.lr * self.weight_decay:.0%} per step; set "
                              f"--optim.weight_decay 0 (the classic recipe) or below {0.01 / self.lr:.2g}")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """The loop: length, accumulation, precision, devices, evaluation."""

    max_steps: int = opt(200, "optimizer steps to run; 0 = until train.max_epochs")
    max_epochs: int = opt(0, "epochs to run; 0 = until train.max_steps")
    accum_steps: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    precision: str = opt("fp32", "fp32, bf16 (the LSTM in bf16, the rest under bf16 autocast; fp32 master "
                                 "weights), or fp16 autocast with a GradScaler",
                         ("fp32", "bf16", "fp16"))
    device: str = opt("auto", "auto = cuda when available, else cpu", ("auto", "cpu", "cuda"))
    backend: str = opt("auto", "process-group backend; auto = nccl on cuda, gloo on cpu", ("auto", "gloo", "nccl"))
    seed: int = opt(0, "seed for model init and dropout")
    eval_every: int = opt(100, "evaluate on data.valid every N steps (and at the end); 0 = only at the end")
    eval_max_batches: int = opt(0, "cap on validation batches per evaluation; 0 = the whole split")
    run_dir: str = opt("", "where logs, metrics and checkpoints go; empty = runs/<config name>-<config hash>, "
                            "so the same command resumes the same run")
    debug: bool = opt(False, "anomaly detection, deterministic algorithms, synchronous CUDA errors")
    timeout_s: float = opt(60.0, "process-group timeout: a dead rank makes the others exit after this long")
    max_bad_steps: int = opt(5, "stop after this many consecutive non-finite steps (fp16 overflow skips excluded)")
    threads: int = opt(0, "torch CPU threads per rank; 0 = torch's default")
    cuda_graphs: str = opt("auto", "capture each batch shape's whole optimizer step in a CUDA graph and replay it "
                                   "(no per-kernel launch cost); auto = on for CUDA with bounded shapes "
                                   "(data.shape_buckets), a unidirectional model and bf16/fp32; off on CPU",
                           ("auto", "on", "off"))
    cuda_graph_limit: int = opt(128, "most CUDA graphs captured (one per micro-batch shape and role); steps of "
                                     "other shapes run eagerly")
    ddp: str = opt("auto", "wrap the model in DistributedDataParallel: auto = when there is more than one rank; "
                           "on = also in one process (a process group of one, backend train.backend): the "
                           "multi-rank path, DDP's hooks and its CUDA-graph warm-up included, on one GPU",
                   ("auto", "on"))
    ddp_bucket_mb: float = opt(25.0, "DDP gradient bucket size in MB (each bucket is one all-reduce, started "
                                     "as soon as its gradients are ready)")
    ddp_grad_as_bucket_view: bool = opt(True, "DDP gradients as views into the all-reduce buckets (saves a copy "
                                              "and the memory of one)")
    ddp_static_graph: str = opt("auto", "DDP static_graph; auto = on when train.accum_steps = 1 (DDP does not "
                                        "support it with no_sync gradient accumulation)", ("auto", "on", "off"))
    early_stop_patience: int = opt(0, "stop after this many evaluations in a row without a new best "
                                      "train.early_stop_metric; 0 = never")
    early_stop_metric: str = opt("valid_loss", "validation metric early stopping watches: valid_loss or "
                                               "valid_<the task's metric> (valid_accuracy, valid_perplexity, valid_mse)")

    def __post_init__(self) -> None:
        _check_choices("train", self)
        _positive("train", self, "accum_steps", "timeout_s", "max_bad_steps", "cuda_graph_limit", "ddp_bucket_mb")
        if self.ddp_static_graph == "on" and self.accum_steps > 1:
            raise ConfigError(f"train.ddp_static_graph=on cannot be combined with train.accum_steps="
                              f"{self.accum_steps} (DDP's static graph does not support no_sync); use auto or off")
        _positive("train", self, "max_steps", "max_epochs", "eval_every", "eval_max_batches", "threads",
                  "early_stop_patience", allow_zero=True)
        _metric_name("train.early_stop_metric", self.early_stop_metric)
        if self.max_steps == 0 and self.max_epochs == 0:
            raise ConfigError("train.max_steps and train.max_epochs are both 0; set one of them")


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and where a run resumes from."""

    every_steps: int = opt(0, "save every N optimizer steps; 0 = off")
    every_minutes: float = opt(0.0, "save every M minutes of training; 0 = off")
    at_end: bool = opt(True, "save when training ends")
    keep_last: int = opt(3, "committed checkpoints kept (older ones are deleted after a new commit)")
    keep_every: int = opt(0, "also keep every checkpoint whose step is a multiple of this; 0 = none")
    resume: str = opt("auto", "auto = newest valid checkpoint in the run directory (or start fresh); "
                              "never; or a checkpoint path")
    async_save: bool = opt(False, "write checkpoint files in the background; the step waits only for the copy")
    max_requeues: int = opt(3, "SLURM: requeue the job after a preemption signal at most this many times")
    keep_best: str = opt("", "also keep the checkpoint with the best value of this validation metric "
                             "(valid_loss, valid_accuracy, ...), saved when it improves; empty = off")

    def __post_init__(self) -> None:
        _positive("checkpoint", self, "every_steps", "every_minutes", "keep_every", "max_requeues", allow_zero=True)
        _positive("checkpoint", self, "keep_last")
        if self.keep_best:
            _metric_name("checkpoint.keep_best", self.keep_best)


@dataclass(kw_only=True, frozen=True)
class LogConfig:
    """What is reported and where."""

    every_steps: int = opt(20, "log loss, lr, grad norm, tokens/s every N steps (the only host sync)")
    progress: bool = opt(True, "progress bar on the leader rank (when stderr is a terminal; else log lines)")
    tensorboard: bool = opt(True, "write TensorBoard event files into the run directory")
    sample_ids: bool = opt(False, "audit trail: append each step's sample ids to samples/rank<N>.txt "
                                  "in the run directory (which rank consumed what, and when)")
    backends: str = opt("", "also log to these, comma-separated: mlflow (MLFLOW_TRACKING_URI, extra [mlflow]), "
                            "wandb (WANDB_MODE=offline works without an account, extra [wandb]); empty = none")
    experiment: str = opt("distlstm", "MLflow experiment / W&B project the run is logged under")

    def __post_init__(self) -> None:
        _positive("log", self, "every_steps")
        for name in filter(None, (b.strip() for b in self.backends.split(","))):
            if name not in LOG_BACKENDS:
                raise ConfigError(f"log.backends: {name!r} is not one of {', '.join(LOG_BACKENDS)}")


@dataclass(kw_only=True, frozen=True)
class Config:
    """Everything one run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type] = {f.name: f.type if isinstance(f.type, type) else globals()[f.type]
                             for f in dataclasses.fields(Config)}


def _field_type(cls: type, name: str) -> type:
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(key: str, value: Any, kind: type, from_cli: bool) -> Any:
    """Convert a TOML or command-line value to the field's type, or raise naming the key."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # IntOrAuto: a literal word or the type
        words = [a for arg in typing.get_args(kind) if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        if value in words:
            return value
        (other,) = [arg for arg in typing.get_args(kind) if typing.get_origin(arg) is not Literal]
        try:
            return _coerce(key, value, other, from_cli)
        except ConfigError:
            raise ConfigError(f"{key}={value!r} is not an integer or {' or '.join(map(repr, words))}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not an integer")
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_cli and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={value!r} is not a number")
        if not math.isfinite(number):  # inf/nan pass every range check written as a comparison
            raise ConfigError(f"{key}={value!r} is not a finite number")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} is not a string; quote it in TOML")
    if kind is dict:
        if isinstance(value, dict):
            return dict(value)
        if from_cli and isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
        raise ConfigError(f"{key}={value!r} is not a table; give a TOML table or a JSON object")
    raise ConfigError(f"{key}: unsupported type {kind}")  # pragma: no cover


def _apply(raw: dict[str, dict[str, Any]], *, from_cli: bool, base: dict[str, dict[str, Any]]) -> None:
    """Merge `raw` ({section: {key: value}}) into `base`, checking every name and type."""
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section [{section}]; sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        cls = SECTIONS[section]
        names = [f.name for f in dataclasses.fields(cls)]
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"unknown key {section}.{key}; {section} keys are {', '.join(names)}")
            base.setdefault(section, {})[key] = _coerce(f"{section}.{key}", value, _field_type(cls, key), from_cli)


def _build(values: dict[str, dict[str, Any]]) -> Config:
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**values.get(name, {}))
        except TypeError as exc:  # pragma: no cover - _apply checks names first
            raise ConfigError(f"[{name}]: {exc}") from exc
    return Config(**sections)


OVERRIDES_HELP = ("Any --SECTION.KEY VALUE option overrides the run's saved config, e.g. --data.valid, "
                  "--data.max_tokens, --train.device cpu, --train.precision (python -m distlstm.train --help "
                  "lists them all).")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(a command's own arguments, the `--section.key value` overrides): the dotted options are taken
    out first, so their values are never mistaken for the command's positional arguments. A dotted
    option takes the next argument as its value unless that is an option itself (a bare boolean)."""
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


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """`--section.key value`, `--section.key=value`, or a bare `--section.flag` meaning true."""
    own, dotted = split_overrides(args)
    if own:
        raise ConfigError(f"unexpected argument {own[0]!r}; options look like --optim.lr 3e-3 (see --help)")
    raw: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(dotted):
        name, eq, value = dotted[i][2:].partition("=")
        if not eq:
            if i + 1 < len(dotted) and not dotted[i + 1].startswith("--"):
                value = dotted[i + 1]
                i += 1
            else:
                value = "true"
        section, _, key = name.partition(".")
        raw.setdefault(section, {})[key] = value
        i += 1
    return raw


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line of an after-training command: the run (or checkpoint or exported folder),
    the command's own flags, and `--section.key value` overrides (taken out by `split_overrides`)."""
    p = argparse.ArgumentParser(prog=f"python -m distlstm.{prog}", description=description, epilog=OVERRIDES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the training run directory (or, for generate/export, a checkpoint or "
                               "exported folder)")
    return p


RECIPE_KEYS = {"optim": ("name", "lr")}
"""Keys that choose a section's recipe: a user who sets one of them brings their own, so a task's
defaults for that section (`task_defaults`) do not apply (SGD's lr 20 must not meet Adam, nor an
Adam lr 1e-2 the task's SGD)."""


def _with_task_defaults(values: dict[str, dict[str, Any]], task_defaults) -> None:
    """Fill the keys the user left unset with the task's defaults ({section: {key: value}})."""
    task = values.get("model", {}).get("task", ModelConfig().task)
    if task_defaults is None or task not in _field_choices(ModelConfig, "task"):
        return  # an unknown task: ModelConfig names it
    for section, defaults in task_defaults(task).items():
        given = values.get(section, {})
        if any(key in given for key in RECIPE_KEYS.get(section, ())):
            continue
        for key, value in defaults.items():
            given.setdefault(key, value)
        values[section] = given


def _field_choices(cls: type, name: str) -> tuple[str, ...]:
    return next(f.metadata["choices"] for f in dataclasses.fields(cls) if f.name == name)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                task_defaults=None) -> Config:
    """Defaults, then the TOML file, then the overrides; validated as a whole. `task_defaults(task)`
    (`distlstm.tasks.Task.config_defaults` through the commands) gives per-task values for the keys
    neither the file nor the overrides set."""
    values: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        try:
            _apply(raw, from_cli=False, base=values)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    _apply(parse_overrides(overrides or []), from_cli=True, base=values)
    _with_task_defaults(values, task_defaults)
    try:
        return _build(values)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{exc} (from config file {path} and the command line)") from exc


def config_from_dict(raw: dict[str, dict[str, Any]], overrides: list[str] | None = None) -> Config:
    """A Config from {section: {key: value}} (a saved config.json), checked like a TOML file, then
    the command-line `overrides`."""
    values: dict[str, dict[str, Any]] = {}
    _apply(raw, from_cli=False, base=values)
    _apply(parse_overrides(overrides or []), from_cli=True, base=values)
    return _build(values)


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def to_toml(cfg: Config, redact=lambda s: s) -> str:
    """The resolved config as TOML; `redact` is applied to every string (credentials never saved)."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if key == "storage_options":
                value = {k: "***" for k in value}
            elif isinstance(value, str):
                value = redact(value)
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def help_text() -> str:
    """Every option with its default and one-line doc, by section."""
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"[{section}] {cls.__doc__.strip()}")
        defaults = cls()
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            default = _toml_value(getattr(defaults, f.name))
            extra = f" ({'|'.join(choices)})" if choices else ""
            out.append(f"  --{section}.{f.name} = {default}{extra}\n      {f.metadata.get('doc', '')}")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- reference

REFERENCE_HEADER = """# Configuration reference

Generated from `distlstm/config.py` by `python -m distlstm.config > docs/config.md`; do not
edit by hand (`tests/test_config.py` checks that this page matches the code).

Every key can be set in a TOML file (`--config FILE.toml`, a `[section]` table per section) or on
the command line (`--section.key value`, which wins over the file). `configs/default.toml` lists
every key with its default. The after-training commands (`evaluate`, `predict`) take the same
`--section.key value` options to override the run's saved config.

The defaults below are the generic ones. `model.task = "lm"` starts from its own recipe for the keys
it names (`LanguageModel.config_defaults` in `distlstm/tasks.py`, printed by `python -m
distlstm.train --help`); a value given in the file or on the command line wins, and giving
`optim.name` or `optim.lr` keeps the generic `[optim]` defaults.
"""


def _type_name(kind) -> str:
    """int, str, ...; a union such as IntOrAuto as `int or "auto"`."""
    if typing.get_origin(kind) is typing.Literal:
        return " or ".join(f'"{a}"' for a in typing.get_args(kind))
    args = typing.get_args(kind)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return kind.__name__


def reference_markdown() -> str:
    """docs/config.md: every section and key with its type, default, allowed values and doc line
    (`python -m distlstm.config > docs/config.md`; tests/test_config.py checks the committed page)."""
    out = [REFERENCE_HEADER]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out.append(f"## [{section}]\n\n{cls.__doc__.strip()}\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        defaults = cls()
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "").replace("|", "\\|")
            choices = f.metadata.get("choices")
            if choices:
                doc += " (one of: " + ", ".join(f"`{c}`" for c in choices) + ")"
            default = _toml_value(getattr(defaults, f.name)).replace("|", "\\|")
            out.append(f"| `{section}.{f.name}` | {_type_name(hints[f.name])} | `{default}` | {doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())

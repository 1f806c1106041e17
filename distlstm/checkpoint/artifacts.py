"""A model you can hand to someone: the files that describe it, and `distlstm.load` to get it back.

A finished run directory (and every folder `python -m distlstm.export` writes) holds

    model.safetensors   the weights (no pickle; tied embedding/head weights stored once)
    config.json         what rebuilds and uses the model: the resolved config (model.input and the
                        sizes that came from the data filled in), the task, the vocabulary's
                        tokenizer, the training step and the parameter hash
    vocab.json          the vocabulary, for a model trained on text prepared by distlstm.prep
    labels.json         the label names, where prep mapped string labels to class ids

    model, vocab, cfg = distlstm.load("runs/default-1a2b3c4d")             # a run directory
    model, vocab, cfg = distlstm.load("runs/x/checkpoints/step-000500")     # one checkpoint
    model, vocab, cfg = distlstm.load("exported/")                          # an exported folder

`load` returns the model in eval mode on the CPU (or `device`), ready for `model(inputs, lengths)`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from distlstm.config import Config, ConfigError, config_from_dict, load_config, to_dict
from distlstm.models.lstm import SequenceModel, build_model

FORMAT = "distlstm-model"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
LABELS = "labels.json"


class Vocab:
    """Token strings of a prepared text dataset (prep's vocab.json): `encode(text)` -> ids the way
    prep tokenised the training text, `decode(ids)` -> text. Id `unk_id` stands for unknown tokens."""

    def __init__(self, tokens: list[str], *, tokenizer: str, unk_id: int = 0):
        self.tokens, self.tokenizer, self.unk_id = list(tokens), tokenizer, unk_id
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def read(cls, path: str | Path) -> "Vocab":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        try:
            return cls(data["tokens"], tokenizer=data.get("tokenizer", "char"), unk_id=int(data.get("unk_id", 0)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a distlstm vocabulary ({exc}); expected vocab.json as written by "
                             f"distlstm.prep") from None

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        from distlstm.data.prep.prep import _tokenize
        return [self._ids.get(t, self.unk_id) for t in _tokenize(text, self.tokenizer)]

    def decode(self, ids) -> str:
        """Text of `ids`: characters joined; words joined by spaces (whitespace: <eos> ends a line)."""
        tokens = [self.tokens[int(i)] for i in ids]
        if self.tokenizer == "char":
            return "".join(tokens)
        if self.tokenizer == "whitespace":
            return " ".join(tokens).replace(" <eos> ", "\n").replace(" <eos>", "\n").replace("<eos> ", "\n")
        return " ".join(tokens)


class Loaded(NamedTuple):
    model: SequenceModel
    vocab: Vocab | None
    config: Config


# ---------------------------------------------------------------------------------------------- writing


def copy_data_files(index, run_dir: Path) -> list[str]:
    """Copy the vocabulary and label names of the dataset behind `index` into `run_dir` (what a
    model trained on it needs to read new text); returns the names copied. Found through the
    split's manifest (`vocab`, `labels`, written by prep), else beside the split folder."""
    from distlstm.data.sources import read_bytes
    manifest = getattr(index, "manifest", None)
    if manifest is None:
        return []
    copied = []
    for name, field in ((VOCAB, manifest.vocab), (LABELS, manifest.labels)):
        url = manifest.resource(field)
        if url is None:
            local = Path(manifest.root) / ".." / name
            if "://" in manifest.root or not local.is_file():
                continue
            url = str(local)
        try:
            data = read_bytes(url, storage_options=index.storage_options, retries=index.retries)
        except FileNotFoundError:
            raise ValueError(f"the dataset's manifest names {field} ({url}) but it does not exist; "
                             f"re-run distlstm.prep or remove '{name.split('.')[0]}' from the manifest") from None
        (run_dir / name).write_bytes(data)
        copied.append(name)
    return copied


def model_card(cfg: Config, *, step: int, param_hash: str, vocab: Vocab | None, labels: bool) -> dict:
    """config.json: enough to rebuild the model and feed it."""
    from distlstm.data.sources import redact
    raw = to_dict(cfg)
    raw["data"]["storage_options"] = {k: "***" for k in raw["data"]["storage_options"]}
    for section in raw.values():
        for key, value in section.items():
            if isinstance(value, str):
                section[key] = redact(value)
    m = cfg.model
    return {"format": FORMAT, "version": VERSION, "task": m.task, "input": m.input, "step": step,
            "param_hash": param_hash, "model": dataclasses.asdict(m),
            "tokenizer": vocab.tokenizer if vocab else None, "vocab": VOCAB if vocab else None,
            "labels": LABELS if labels else None, "max_length": cfg.data.max_length,
            "inputs": ("inputs (B, T) int64 token ids" if m.input == "tokens" else
                       f"inputs (B, T, {m.input_size}) float32 features") + ", lengths (B,) int64, right-padded",
            "config": raw}


def write_model(model: nn.Module, cfg: Config, out: Path, *, step: int, source: Path | None = None) -> Path:
    """model.safetensors + config.json (+ vocab.json / labels.json copied from `source`, a run
    directory) into `out`. Leader only."""
    from safetensors.torch import save_model
    from distlstm.distributed.parallel import unwrap
    from distlstm.checkpoint.codec import tree_hash
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    for name in (VOCAB, LABELS):
        if source is not None and (source / name).is_file() and source.resolve() != out.resolve():
            (out / name).write_bytes((source / name).read_bytes())
    vocab = Vocab.read(out / VOCAB) if (out / VOCAB).is_file() else None
    card = model_card(cfg, step=step, param_hash=tree_hash(model), vocab=vocab, labels=(out / LABELS).is_file())
    tmp = out / (WEIGHTS + ".tmp")
    save_model(model, str(tmp), metadata={"format": FORMAT, "task": cfg.model.task, "step": str(step)})
    tmp.replace(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(card, indent=1))
    return out


# ---------------------------------------------------------------------------------------------- reading


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint directory `which` names in a run: latest (newest valid), best (kept by
    checkpoint.keep_best), step-N, or a path. ValueError naming the choices when there is none."""
    from distlstm.checkpoint.manager import _STEP_DIR, BEST, committed_steps, find_valid, verify_checkpoint
    ckpts = Path(run_dir) / "checkpoints"
    if which == "latest":
        found, notes = find_valid(ckpts)
        if found is None:
            raise ValueError(f"{run_dir}: no valid checkpoint under {ckpts}" + "".join(f"; {n}" for n in notes[:3]))
        return Path(found)
    if which == "best":
        name = (ckpts / BEST).read_text().strip() if (ckpts / BEST).is_file() else ""
        if not _STEP_DIR.match(name):
            raise ValueError(f"{run_dir}: no best checkpoint (train with --checkpoint.keep_best valid_loss); "
                             f"use --checkpoint latest or step-N")
        problems = verify_checkpoint(ckpts / name)
        if problems:
            raise ValueError(f"{run_dir}: the best checkpoint {ckpts / name} is not valid: " + "; ".join(problems))
        return ckpts / name
    m = re.fullmatch(r"step-?(\d+)", which)
    path = ckpts / f"step-{int(m.group(1)):06d}" if m else Path(which)
    problems = verify_checkpoint(path)
    if problems:
        have = ", ".join(p.name for _, p in sorted(committed_steps(ckpts).items())) or "none"
        raise ValueError(f"checkpoint {path} cannot be used: {problems[0]}; checkpoints in {ckpts}: {have}")
    return path


def load_checkpoint_weights(model: nn.Module, path: Path) -> None:
    """The model part of a DCP checkpoint (checkpoints/step-N) into `model`; the optimizer and the
    rest of the train state are not read. Works with or without a process group (no collectives)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from distlstm.checkpoint.manager import _check_shapes, _quiet_single_process
    from distlstm.checkpoint.guard import SafeFileSystemReader
    state = {"model": get_model_state_dict(model)}
    reader = SafeFileSystemReader(path)  # never DCP's own: it unpickles .metadata with pickle.load
    _check_shapes(path, state, reader.read_metadata())
    with _quiet_single_process(True):
        dcp.load(state, storage_reader=reader, no_dist=True)
    set_model_state_dict(model, state["model"])


def run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """A run's saved (resolved) config, config.toml else the model card's copy, with `overrides`
    applied."""
    if (run_dir / "config.toml").is_file():
        return load_config(run_dir / "config.toml", list(overrides))
    if (run_dir / CONFIG).is_file():
        return config_from_dict(json.loads((run_dir / CONFIG).read_text())["config"], list(overrides))
    raise ConfigError(f"{run_dir} has neither config.toml nor {CONFIG}: not a distlstm run directory, checkpoint "
                      f"or exported model (give the folder python -m distlstm.train printed as 'run directory')")


def load(path: str | Path, *, checkpoint: str | None = None, device: str | torch.device = "cpu") -> Loaded:
    """(model, vocab, config) from a run directory, a checkpoint directory (its model part only) or
    an exported folder. In a run directory `checkpoint` picks latest / best / step-N; without it
    the final weights (model.safetensors) are used, else the latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory, a checkpoint or an exported model)")
    is_checkpoint = (path / ".metadata").is_file() or (path / "MANIFEST.json").is_file()  # checkpoints/step-N
    run_dir = path.parent.parent if is_checkpoint else path
    cfg = run_config(run_dir)
    ckpt = path if is_checkpoint else None
    if not is_checkpoint and (checkpoint is not None or not (path / WEIGHTS).is_file()):
        ckpt = resolve_checkpoint(run_dir, checkpoint or "latest")
    try:
        model = build_model(cfg.model)
    except ValueError as exc:
        raise ConfigError(f"{run_dir}: its config does not build a model ({exc}); was it saved by a run that "
                          f"finished indexing its data?") from None
    if ckpt is not None:
        load_checkpoint_weights(model, ckpt)
    else:
        from safetensors.torch import load_model
        load_model(model, str(path / WEIGHTS), strict=True)
    vocab = Vocab.read(run_dir / VOCAB) if (run_dir / VOCAB).is_file() else None
    return Loaded(model.to(device).eval(), vocab, cfg)

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
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from distlstm.checkpoint.codec import tree_hash
from distlstm.checkpoint.guard import SafeFileSystemReader
from distlstm.checkpoint.manager import (BEST, STEP_DIR, check_shapes, committed_steps, find_valid,
                                         quiet_single_process, verify_checkpoint)
from distlstm.config import Config, ConfigError, config_from_dict, load_config, to_dict
from distlstm.data.sources import read_bytes, redact
from distlstm.data.vocab import Vocab
from distlstm.distributed.parallel import unwrap
from distlstm.models.lstm import SequenceModel, build_model

FORMAT = "distlstm-model"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
LABELS = "labels.json"
INCOMPLETE = "INCOMPLETE"
"""In a folder an export is still writing (or was stopped in); `load` refuses such a folder."""
CHECKPOINT_HELP = ("which weights: final (the run's model.safetensors), latest, best (checkpoint.keep_best), "
                   "step-N, or a checkpoint path; default: final if the run finished, else latest")


class Loaded(NamedTuple):
    model: SequenceModel
    vocab: Vocab | None
    config: Config


# ---------------------------------------------------------------------------------------------- writing


def copy_data_files(index, run_dir: Path) -> list[str]:
    """Copy the vocabulary and label names of the dataset behind `index` into `run_dir` (what a
    model trained on it needs to read new text); returns the names copied. Found through the
    split's manifest (`vocab`, `labels`, written by prep), else beside the split folder."""
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
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    for name in (VOCAB, LABELS):
        if source is not None and (source / name).is_file() and source.resolve() != out.resolve():
            (out / name).write_bytes((source / name).read_bytes())
    vocab = Vocab.read(out / VOCAB) if (out / VOCAB).is_file() else None
    card = model_card(cfg, step=step, param_hash=tree_hash(model), vocab=vocab, labels=(out / LABELS).is_file())
    tmp = out / (WEIGHTS + ".tmp")
    save_model(model, str(tmp), metadata={"format": FORMAT, "task": cfg.model.task, "step": str(step)})
    os.chmod(tmp, _new_file_mode())  # safetensors creates it 0600; the other files follow the umask
    tmp.replace(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(card, indent=1))
    return out


def _new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (read from /proc: os.umask can only
    be read by setting it, which races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


# ---------------------------------------------------------------------------------------------- reading


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint directory `which` names in a run: latest (newest valid), best (kept by
    checkpoint.keep_best), step-N, or a path. ValueError naming the choices when there is none."""
    ckpts = Path(run_dir) / "checkpoints"
    if which == "latest":
        found, notes = find_valid(ckpts)
        if found is None:
            raise ValueError(f"{run_dir}: no valid checkpoint under {ckpts}" + "".join(f"; {n}" for n in notes[:3]))
        return Path(found)
    if which == "best":
        name = (ckpts / BEST).read_text().strip() if (ckpts / BEST).is_file() else ""
        if not STEP_DIR.match(name):
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
    state = {"model": get_model_state_dict(model)}
    reader = SafeFileSystemReader(path)  # never DCP's own: it unpickles .metadata with pickle.load
    check_shapes(path, state, reader.read_metadata())
    with quiet_single_process(True):
        dcp.load(state, storage_reader=reader, no_dist=True)
    set_model_state_dict(model, state["model"])


def run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """A run's saved (resolved) config, config.toml else the model card's copy, with `overrides`
    applied."""
    if (run_dir / "config.toml").is_file():
        return load_config(run_dir / "config.toml", list(overrides))
    if (run_dir / CONFIG).is_file():
        return config_from_dict(model_card_of(run_dir)["config"], list(overrides))
    raise ConfigError(f"{run_dir} has neither config.toml nor {CONFIG}: not a distlstm run directory, checkpoint "
                      f"or exported model (give the folder python -m distlstm.train printed as 'run directory')")


def model_card_of(folder: Path) -> dict:
    """config.json of a run or an exported folder, checked as user input (JSON, a distlstm model card)."""
    file = folder / CONFIG
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{file} is not JSON ({exc}); {REEXPORT}") from None
    if not isinstance(card, dict) or not isinstance(card.get("config"), dict):
        raise ConfigError(f"{file} is not a distlstm model card (no \"config\" table); {REEXPORT}")
    return card


REEXPORT = "export the model again (python -m distlstm.export RUN --out DIR) or copy the folder again"
HEADER_LIMIT = 100_000_000  # bytes of a safetensors header: the library's own limit
TORCH_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


def read_weights(model: nn.Module, file: Path) -> None:
    """`file` (model.safetensors) into `model`, checked as user input first: the header's size and
    JSON, then every tensor's name, dtype and shape against the model config.json builds. A file
    that fails is one ValueError naming the file, the tensor and the fix; nothing is allocated for
    a header that claims more bytes than the file has."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(HEADER_LIMIT, size - 8):
            raise ValueError(f"{file} is not a safetensors file (its header claims {n} bytes, the file has {size}); "
                             f"{REEXPORT}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise ValueError(f"{file} is not a safetensors file (its header is not a JSON table of tensors); {REEXPORT}")
    header.pop("__metadata__", None)
    want = model.state_dict()
    for name, entry in sorted(header.items()):
        if name not in want:
            raise ValueError(f"{file} holds a tensor {name!r} that the model of {file.parent}'s config does not have "
                             f"(the weights come from another model); {REEXPORT}")
        t = want[name]
        dtype, shape = TORCH_DTYPES.get(t.dtype), list(t.shape)
        if entry.get("shape") != shape or (dtype and entry.get("dtype") != dtype):
            raise ValueError(f"{file}: tensor {name!r} is {entry.get('dtype')} {entry.get('shape')}, but the model of "
                             f"{file.parent}'s config needs {dtype} {shape} (the files come from different models); "
                             f"{REEXPORT}")
    try:
        missing, _ = load_model(model, str(file), strict=False)  # shared (tied) tensors are stored once
    except (SafetensorError, RuntimeError) as exc:
        raise ValueError(f"{file} cannot be read ({str(exc).splitlines()[0]}); {REEXPORT}") from None
    if missing:
        raise ValueError(f"{file} has no tensor {sorted(missing)[0]!r}, which the model of {file.parent}'s config needs; "
                         f"{REEXPORT}")


def check_belongs_together(model: nn.Module, folder: Path, vocab: Vocab | None) -> None:
    """The weights are the ones config.json recorded (its param_hash), and the vocabulary fits the
    embedding: files copied together from different runs or exports are refused by name."""
    card = model_card_of(folder) if (folder / CONFIG).is_file() else {}
    recorded = card.get("param_hash")
    if isinstance(recorded, str) and recorded and recorded != tree_hash(model):
        raise ValueError(f"{folder / WEIGHTS} does not hold the weights {folder / CONFIG} describes (its param_hash "
                         f"differs): the two files come from different runs or exports; {REEXPORT}")
    rows = getattr(getattr(model, "embedding", None), "num_embeddings", None)
    if vocab is not None and rows is not None and len(vocab) > rows:
        raise ValueError(f"{folder / VOCAB} has {len(vocab)} tokens but the model's embedding has {rows} rows: "
                         f"the vocabulary comes from another run; {REEXPORT}")


def load(path: str | Path, *, checkpoint: str | None = None, device: str | torch.device = "cpu") -> Loaded:
    """(model, vocab, config) from a run directory, a checkpoint directory (its model part only) or
    an exported folder. In a run directory `checkpoint` picks latest / best / step-N; without it
    the final weights (model.safetensors) are used, else the latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory, a checkpoint or an exported model)")
    if (path / INCOMPLETE).exists():
        raise ValueError(f"{path} is an unfinished export (it has an {INCOMPLETE} file: the export was stopped "
                         f"before it was checked); run python -m distlstm.export again")
    is_checkpoint = (path / ".metadata").is_file() or (path / "MANIFEST.json").is_file()  # checkpoints/step-N
    run_dir = path.parent.parent if is_checkpoint else path
    cfg = run_config(run_dir)
    try:
        model = build_model(cfg.model)
    except ValueError as exc:
        raise ConfigError(f"{run_dir}: its config does not build a model ({exc}); was it saved by a run that "
                          f"finished indexing its data?") from None
    if is_checkpoint:
        load_checkpoint_weights(model, path)
    else:
        loaded = load_weights(model, run_dir, checkpoint)
    vocab = Vocab.read(run_dir / VOCAB) if (run_dir / VOCAB).is_file() else None
    if not is_checkpoint and loaded["checkpoint"] == "final":
        check_belongs_together(model, run_dir, vocab)
    return Loaded(model.to(device).eval(), vocab, cfg)


def load_weights(model: torch.nn.Module, run_dir: Path, which: str | None) -> dict:
    """Put the weights `which` names (see CHECKPOINT_HELP) into `model`; returns
    {"checkpoint": what was loaded, "step": its training step}."""
    if which is None:
        which = "final" if (run_dir / WEIGHTS).is_file() else "latest"
    if which == "final":
        if not (run_dir / WEIGHTS).is_file():
            raise ValueError(f"{run_dir} has no {WEIGHTS} (the run has not finished); use --checkpoint latest")
        read_weights(model, run_dir / WEIGHTS)
        step = model_card_of(run_dir).get("step") if (run_dir / CONFIG).is_file() else None
        return {"checkpoint": "final", "step": step, "path": str(run_dir / WEIGHTS)}
    path = resolve_checkpoint(run_dir, which)
    load_checkpoint_weights(model, path)
    step = json.loads((path / "MANIFEST.json").read_text())["step"]
    return {"checkpoint": path.name, "step": step, "path": str(path)}

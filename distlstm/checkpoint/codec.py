"""The train state as files can hold it without pickle: a JSON codec that carries tensors beside
the JSON, nested state-dict helpers, per-rank RNG state, and a parameter hash for bit-exact tests.
Used by distlstm/checkpoint/manager.py (which re-exports `rng_state`, `set_rng_state`, `tree_hash`)."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict


# ---------------------------------------------------------------- JSON codec (no pickle anywhere)


def encode_tree(obj: Any, where: str, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """JSON-able copy of ``obj``; tuples, numpy and tensors get marker dicts so they round-trip.

    With ``tensors`` given, tensors are moved there (saved with torch.save) and referenced by key;
    otherwise small tensors are inlined as lists (e.g. a tensor-valued lr in param_groups).
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is {type(k).__name__}; checkpoint dicts need str keys")
            out[k] = encode_tree(v, f"{where}[{k!r}]", tensors)
        return out
    if isinstance(obj, list):
        return [encode_tree(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, torch.Tensor):
        if tensors is not None:
            key = f"t{len(tensors)}"
            tensors[key] = obj.detach().to("cpu", copy=True)
            return {"__tensor_ref__": key}
        if obj.numel() > 4096:
            raise TypeError(f"{where}: a {tuple(obj.shape)} tensor outside a dict of tensors; store it under a dict key")
        dtype = str(obj.dtype).removeprefix("torch.")
        return {"__tensor__": obj.detach().cpu().tolist(), "dtype": dtype, "shape": list(obj.shape)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(
        f"{where}: a {type(obj).__name__} cannot go into a checkpoint (JSON values, tuples, numpy arrays "
        "and tensors only); store its state_dict() or convert it to plain values first"
    )


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    keys = set(obj)
    if keys == {"__tuple__"}:
        return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
    if keys == {"__tensor_ref__"}:
        return (tensors or {})[obj["__tensor_ref__"]]
    if keys == {"__tensor__", "dtype", "shape"}:
        return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"])).reshape(obj["shape"])
    if keys == {"__ndarray__", "dtype"}:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------- nested state dict helpers


def split_tree(tree: dict) -> tuple[dict, dict]:
    """Nested dicts -> (tensor leaves, everything else). DCP gets only tensors, so it never pickles."""
    tensors, rest = {}, {}
    for k, v in tree.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = v
        elif isinstance(v, dict):
            t, r = split_tree(v)
            if t:
                tensors[k] = t
            if r or not t:
                rest[k] = r
        else:
            rest[k] = v
    return tensors, rest


def merge_tree(tensors: dict, rest: dict) -> dict:
    out = dict(rest)
    for k, v in tensors.items():
        out[k] = merge_tree(v, rest.get(k, {})) if isinstance(v, dict) else v
    return out


def flatten_tree(tree: dict, prefix: str = "") -> dict[str, Any]:
    """DCP's flattened keys: nested dict path joined with '.' (``optim.state.<fqn>.exp_avg``)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_tree(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train_state_of(state: dict) -> dict:
    """{"model": fqn -> tensor, "optim": {"state": ..., "param_groups": ...}} without DDP prefixes."""
    model = state["model"]
    out = {"model": get_model_state_dict(model)}
    if state.get("optim") is not None:
        out["optim"] = get_optimizer_state_dict(model, state["optim"])
    return out


def cpu_copy(tree: dict) -> dict:
    """Snapshot for async save: training may change the live tensors while the thread writes."""
    return {k: cpu_copy(v) if isinstance(v, dict) else v.detach().to("cpu", copy=True) for k, v in tree.items()}


# ---------------------------------------------------------------- RNG and hashing helpers


def rng_state() -> dict:
    """Python, numpy, torch CPU and (current device's) CUDA generator states: JSON values + uint8 tensors."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    # Only the current device, and only if CUDA is already in use: get_rng_state_all() would create
    # a context on every visible GPU from every rank.
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(d: dict) -> None:
    """Restore what ``rng_state()`` returned; the CUDA state goes to the current device."""
    version, internal, gauss = d["python"]
    random.setstate((version, tuple(internal), gauss))
    n = d["numpy"]
    np.random.set_state(("MT19937", np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(d["torch"])
    if d.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(d["cuda"])


class RngState:
    """This process's random generators as a checkpoint component (``state_dict`` / ``load_state_dict``)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


def tree_hash(model: torch.nn.Module, optim: torch.optim.Optimizer | None = None) -> str:
    """sha256 of every parameter and buffer (names without DDP's ``module.``), plus optimizer state
    and hyperparameters if ``optim`` is given. Has no side effects (unlike get_optimizer_state_dict,
    which initialises an empty optimizer's state)."""
    h = hashlib.sha256()

    def add(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{name}={json.dumps(encode_tree(value, name), sort_keys=True)}".encode())

    for key, t in sorted(get_model_state_dict(model).items()):
        add(f"model.{key}", t)
    if optim is not None:
        osd = optim.state_dict()
        for idx, entry in sorted(osd["state"].items()):
            for key, value in sorted(entry.items()):
                add(f"optim.state.{idx}.{key}", value)
        add("optim.param_groups", osd["param_groups"])
    return h.hexdigest()

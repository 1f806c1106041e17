"""What a checkpoint file may contain before anything in it is trusted, and optional manifest signing.

Threat (docs/design.md, "Threat model"): someone who can write the run directory plants files in a
checkpoint and updates MANIFEST.json to match (its sha256 values are checksums, not a signature).
Loading must then never run their code and, at worst, loads their numbers:

- DCP's ``.metadata`` is a pickle (torch's FileSystemReader reads it with ``pickle.load``). Here it
  is read by `read_metadata`, an unpickler that resolves only the DCP metadata classes and the few
  torch/builtin types they hold (found by listing the globals in real distlstm checkpoints), and
  then checks the structure: every entry describes a tensor (a ``BytesStorageMetadata`` entry
  would make DCP ``torch.load(weights_only=False)`` its bytes) stored in a file of the checkpoint.
- ``rank-*.pt`` must load with ``torch.load(weights_only=True)``; everything else is JSON.
- With ``DISTLSTM_CHECKPOINT_KEY`` set, MANIFEST.json is signed (HMAC-SHA256, ``MANIFEST.sig``) when
  saved, and unsigned or mis-signed checkpoints are refused: then nobody without the key can plant
  numbers either. Keep the key outside the run directory (an environment variable or a secret store).

`content_problems` is part of `distlstm.checkpoint.manager.verify_checkpoint`, so a checkpoint that fails
any of this is skipped with a message and the previous valid one is loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

KEY_ENV = "DISTLSTM_CHECKPOINT_KEY"
SIGNATURE = "MANIFEST.sig"

_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    (_DCP, "Metadata"): dcp_metadata.Metadata,
    (_DCP, "TensorStorageMetadata"): dcp_metadata.TensorStorageMetadata,
    (_DCP, "TensorProperties"): dcp_metadata.TensorProperties,
    (_DCP, "ChunkStorageMetadata"): dcp_metadata.ChunkStorageMetadata,
    (_DCP, "MetadataIndex"): dcp_metadata.MetadataIndex,
    (_DCP, "StorageMeta"): dcp_metadata.StorageMeta,
    (_DCP, "_MEM_FORMAT_ENCODING"): dcp_metadata._MEM_FORMAT_ENCODING,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    # layout by name: a lookup in a table of torch.layout values, nothing else
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    # StorageMeta.checkpoint_id: the directory the checkpoint was written to
    ("pathlib", "PosixPath"): Path,
    ("pathlib", "PurePosixPath"): Path,
    ("pathlib", "PureWindowsPath"): Path,
    ("pathlib", "WindowsPath"): Path,
}
_ALLOWED.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something distlstm never writes (refused before it can run)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(f"refers to {module}.{name}, which a DCP metadata file never holds") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("holds a persistent reference, which a DCP metadata file never holds")


def read_metadata(path: Path, allowed_files: set[str] | None = None) -> dcp_metadata.Metadata:
    """DCP's ``.metadata`` in checkpoint directory `path`, unpickled with the allow-list above and
    checked to describe only tensors stored in `allowed_files` (default: any plain file name)."""
    file = Path(path) / ".metadata"
    data = file.read_bytes()
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{file}: refused: {exc}; this file was not written by distlstm "
                                    "(planted or damaged); use another checkpoint") from None
    except Exception as exc:  # noqa: BLE001 -- any other unpickling failure: damaged
        raise UnsafeCheckpointError(f"{file}: unreadable ({type(exc).__name__}: {exc}); use another checkpoint") from None
    problem = _structure_problem(metadata, allowed_files)
    if problem:
        raise UnsafeCheckpointError(f"{file}: refused: {problem}; use another checkpoint")
    return metadata


def _structure_problem(metadata: Any, allowed_files: set[str] | None) -> str | None:
    if not isinstance(metadata, dcp_metadata.Metadata):
        return f"holds a {type(metadata).__name__}, not DCP Metadata"
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        return "state_dict_metadata is not a dict"
    for key, entry in entries.items():
        if not isinstance(key, str) or not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            # BytesStorageMetadata would make DCP torch.load(weights_only=False) the bytes it names.
            return f"entry {key!r} is a {type(entry).__name__}; distlstm checkpoints hold tensors only"
    storage = metadata.storage_data if metadata.storage_data is not None else {}
    if not isinstance(storage, dict):
        return "storage_data is not a dict"
    for index, info in storage.items():
        if not isinstance(index, dcp_metadata.MetadataIndex) or not isinstance(info, _StorageInfo):
            return f"storage entry {index!r} is not a tensor location"
        name = info.relative_path
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            return f"storage entry for {index.fqn!r} points at {name!r}, outside the checkpoint"
        if allowed_files is not None and name not in allowed_files:
            return f"storage entry for {index.fqn!r} points at {name!r}, a file the manifest does not list"
        if info.transform_descriptors:
            return f"storage entry for {index.fqn!r} has transforms {info.transform_descriptors!r}; distlstm writes none"
    return None


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with `read_metadata` above instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def content_problems(path: Path, manifest: dict) -> list[str]:
    """Why the (checksum-verified) files of checkpoint `path` cannot be trusted; [] if they can."""
    problems = signature_problems(path)
    if problems:
        return problems
    files = set(manifest.get("files", {}))
    try:
        read_metadata(path, allowed_files=files)
    except (UnsafeCheckpointError, OSError) as exc:
        problems.append(str(exc))
    for name in sorted(n for n in files if n.endswith(".pt")):
        try:
            torch.load(Path(path) / name, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 -- weights_only refusals are UnpicklingError, others vary
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(f"{name} does not load with torch.load(weights_only=True) ({first[:200]}); "
                            "it was not written by distlstm (planted or damaged)")
    return problems


# ---------------------------------------------------------------- signing (DISTLSTM_CHECKPOINT_KEY)


def _key() -> bytes | None:
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def _mac(key: bytes, manifest_bytes: bytes) -> str:
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def signature(manifest_bytes: bytes) -> bytes | None:
    """Contents of MANIFEST.sig for these manifest bytes, or None when no key is set."""
    key = _key()
    return None if key is None else f"hmac-sha256:{_mac(key, manifest_bytes)}\n".encode()


def signature_problems(path: Path) -> list[str]:
    """With a key set: the manifest must carry a valid signature. Without one: nothing to check."""
    key = _key()
    if key is None:
        return []
    sig_file = Path(path) / SIGNATURE
    if not sig_file.is_file():
        return [f"not signed ({KEY_ENV} is set, so only checkpoints signed with that key are loaded)"]
    manifest_bytes = (Path(path) / "MANIFEST.json").read_bytes()
    got = sig_file.read_text().strip().removeprefix("hmac-sha256:")
    if not hmac.compare_digest(got, _mac(key, manifest_bytes)):
        return [f"{SIGNATURE} does not match MANIFEST.json (signed with another {KEY_ENV}, or changed after signing)"]
    return []

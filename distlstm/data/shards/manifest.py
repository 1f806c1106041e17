"""`manifest.json`: what a prepared split holds. The one reader and writer of that file.

Written by `python -m distlstm.prep` and by the embedded synthetic dataset; read by the dataset index
(sizes the model needs: vocabulary, classes, features; columns; shard checksums) and by path
expansion (the shard list of a dataset folder or a `.../manifest.json` URL). Only `shards` is
required, so a hand-written `{"shards": [{"path": "a.parquet"}]}` works too; keys this version does
not know are kept when a manifest is rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

FILENAME = "manifest.json"
VERSION = 1


@dataclass
class ShardInfo:
    """One shard: its path (relative to the manifest's folder, or absolute, or a URL) and, as
    written by prep, its sample and token counts, size in bytes and sha256."""

    path: str
    num_samples: int | None = None
    num_tokens: int | None = None
    bytes: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "path"}


@dataclass
class Manifest:
    shards: list[ShardInfo]
    version: int = VERSION
    format: str | None = None
    task: str | None = None
    sequence_column: str | None = None
    label_column: str | None = None
    vocab_size: int | None = None
    num_classes: int | None = None
    input_size: int | None = None
    num_targets: int | None = None
    num_samples: int | None = None
    num_tokens: int | None = None
    vocab: str | None = None
    """The vocabulary file (prep's vocab.json) relative to the manifest's folder, for text inputs."""
    labels: str | None = None
    """The label names file (prep's labels.json) relative to the manifest's folder, for string labels."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know, kept as they are."""
    root: str = field(default="", compare=False)
    """The folder (path or URL) the manifest was read from; relative shard paths resolve against it."""

    # ---- reading
    @classmethod
    def from_dict(cls, data: Any, *, root: str = "", where: str = FILENAME) -> "Manifest":
        from distlstm.data.sources import redact
        try:
            shards = [ShardInfo(**_known(ShardInfo, s)) for s in data["shards"]]
            known = _known(cls, data, exclude=("shards", "extra", "root"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{redact(where)}: not a distlstm manifest ({type(exc).__name__}: {exc}); "
                             f"expected {{'shards': [{{'path': ...}}, ...]}} as written by distlstm.prep") from None
        names = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(shards=shards, **known, extra=extra, root=root)

    @classmethod
    def read(cls, url: str, *, storage_options: dict | None = None, retries: int = 3) -> "Manifest":
        """The manifest at `url` (a local path or fsspec URL of a manifest.json file). FileNotFoundError
        if there is none; ValueError naming the file if it is not a manifest."""
        from distlstm.data.sources import read_bytes, redact
        raw = read_bytes(url, storage_options=storage_options, retries=retries)
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{redact(url)}: not a distlstm manifest (invalid JSON: {exc}); "
                             f"expected {{'shards': [{{'path': ...}}, ...]}} as written by distlstm.prep") from None
        return cls.from_dict(data, root=url.rsplit("/", 1)[0] if "/" in url else ".", where=url)

    @classmethod
    def find(cls, spec: str, *, storage_options: dict | None = None, retries: int = 1) -> "Manifest | None":
        """The manifest a dataset spec names, if it names one: a prepared folder (local or remote,
        holding manifest.json) or a manifest.json file itself. None for files, globs and lists."""
        if "," in spec or any(c in spec for c in "*?{["):
            return None
        spec = spec.rstrip("/")
        url = spec if spec.rsplit("/", 1)[-1] == FILENAME else f"{spec}/{FILENAME}"
        if "://" not in spec:
            if not os.path.isfile(url):
                return None
        elif spec.lower().endswith((".parquet", ".pq", ".tar", ".tar.gz", ".tgz")):
            return None
        try:
            return cls.read(url, storage_options=storage_options, retries=retries)
        except (FileNotFoundError, OSError):
            return None

    def shard_urls(self) -> list[str]:
        """Every shard's path or URL, relative ones resolved against the manifest's folder."""
        return [s.path if "://" in s.path or os.path.isabs(s.path) else f"{self.root.rstrip('/')}/{s.path}"
                for s in self.shards]

    def resource(self, name: str | None) -> str | None:
        """A file the manifest names (`vocab`, `labels`) as a path or URL, resolved like a shard."""
        if not name:
            return None
        return name if "://" in name or os.path.isabs(name) else f"{self.root.rstrip('/')}/{name}"

    def dims(self) -> dict[str, int]:
        """The model sizes the data decides (0 where the manifest does not say)."""
        return {"vocab_size": self.vocab_size or 0, "input_size": self.input_size or 0,
                "num_classes": self.num_classes or 0, "num_targets": self.num_targets or 0}

    # ---- writing
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"version": self.version}
        for f in dataclasses.fields(self):
            if f.name in ("version", "shards", "extra", "root"):
                continue
            out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        out["shards"] = [s.to_dict() for s in self.shards]
        return out

    def write(self, directory: str) -> str:
        """Write `directory/manifest.json` atomically (it appears last: the split's commit marker)."""
        path = os.path.join(directory, FILENAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)
        return path


def _known(cls: type, data: dict, exclude: tuple[str, ...] = ()) -> dict:
    if not isinstance(data, dict):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return {k: v for k, v in data.items() if k in names}

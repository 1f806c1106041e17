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
import posixpath
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from distlstm.data.sources import basename, local_path, read_bytes, redact, url_protocol

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
    where: str = field(default=FILENAME, compare=False, repr=False)
    """The manifest file itself, for messages."""

    # ---- reading
    @classmethod
    def from_dict(cls, data: Any, *, root: str = "", where: str = FILENAME) -> "Manifest":
        try:
            shards = [ShardInfo(**_known(ShardInfo, s)) for s in data["shards"]]
            known = _known(cls, data, exclude=("shards", "extra", "root", "where"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{redact(where)}: not a distlstm manifest ({type(exc).__name__}: {exc}); "
                             f"expected {{'shards': [{{'path': ...}}, ...]}} as written by distlstm.prep") from None
        names = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in data.items() if k not in names}
        if not all(isinstance(s.path, str) for s in shards) or not all(
                isinstance(known.get(k), (str, type(None))) for k in ("vocab", "labels")):
            raise ValueError(f"{redact(where)}: shard, vocab and labels paths must be strings; re-run distlstm.prep")
        for i, shard in enumerate(shards):
            _check_types(vars(shard), where, f"shards[{i}].")
        _check_types(known, where, "")
        manifest = cls(shards=shards, **known, extra=extra, root=root, where=where)
        if root:  # every path it names is checked before any is used
            manifest.shard_urls()
            manifest.resource(manifest.vocab)
            manifest.resource(manifest.labels)
        return manifest

    @classmethod
    def read(cls, url: str, *, storage_options: dict | None = None, retries: int = 3) -> "Manifest":
        """The manifest at `url` (a local path or fsspec URL of a manifest.json file). FileNotFoundError
        if there is none; ValueError naming the file if it is not a manifest."""
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
        url = spec if basename(spec) == FILENAME else f"{spec}/{FILENAME}"
        if "://" not in spec:
            if not os.path.isfile(url):
                return None
        elif spec.lower().endswith((".parquet", ".pq", ".tar", ".tar.gz", ".tgz")):
            return None
        try:
            return cls.read(url, storage_options=storage_options, retries=retries)
        except FileNotFoundError:  # no manifest there; a timeout or HTTP 5xx is an error, not "no manifest"
            return None

    def shard_urls(self) -> list[str]:
        """Every shard's path or URL, resolved against the manifest's folder and confined to it."""
        return [self.locate(s.path, "shard", within=self.root) for s in self.shards]

    def resource(self, name: str | None) -> str | None:
        """A file the manifest names (`vocab`, `labels`) as a path or URL, resolved like a shard and
        confined to the dataset folder (the split folder's parent, where prep writes vocab.json)."""
        if not name:
            return None
        return self.locate(name, "file", within=_parent(self.root))

    def locate(self, name: str, what: str, *, within: str) -> str:
        """`name` (relative to the manifest's folder, absolute, or a URL) resolved, and refused with a
        ValueError unless it lies inside `within` with the same scheme and host: a manifest, which may
        come from anyone, must not make a run read a local file or another server's."""
        if not isinstance(name, str) or not name or "\0" in name:
            raise ValueError(f"{redact(self.where)}: {what} path {name!r} is not a path; expected a file name "
                             f"relative to the manifest's folder")
        root = self.root or "."
        if "://" in name or os.path.isabs(name) or url_protocol(root) != "file" and name.startswith("/"):
            target = name
        else:
            target = f"{root.rstrip('/')}/{name}"
        if not _inside(target, within or "."):
            raise ValueError(f"{redact(self.where)}: {what} path {redact(name)!r} resolves outside the dataset "
                             f"({redact(within or '.')}); a manifest may only name files inside its own dataset "
                             f"folder (paths relative to the manifest, no '..' out of it)")
        return _normalized(target)

    def dims(self) -> dict[str, int]:
        """The model sizes the data decides (0 where the manifest does not say)."""
        return {"vocab_size": self.vocab_size or 0, "input_size": self.input_size or 0,
                "num_classes": self.num_classes or 0, "num_targets": self.num_targets or 0}

    # ---- writing
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"version": self.version}
        for f in dataclasses.fields(self):
            if f.name in ("version", "shards", "extra", "root", "where"):
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


_TEXT = ("format", "task", "sequence_column", "label_column", "vocab", "labels", "path", "sha256")
_COUNTS = ("version", "vocab_size", "num_classes", "input_size", "num_targets", "num_samples", "num_tokens", "bytes")


def _check_types(values: dict, where: str, prefix: str) -> None:
    """Every known key holds what it is for (a manifest may come from anyone): text, or a count that
    is a non-negative integer; null for either means "not said"."""
    for key, value in values.items():
        if value is None:
            continue
        if key in _TEXT and not isinstance(value, str):
            raise ValueError(f"{redact(where)}: {prefix}{key} is {str(value)[:40]!r}, expected text; "
                             f"re-run distlstm.prep or fix the manifest")
        if key in _COUNTS and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{redact(where)}: {prefix}{key} is {str(value)[:40]!r}, expected a whole number >= 0; "
                             f"re-run distlstm.prep or fix the manifest")


def _known(cls: type, data: dict, exclude: tuple[str, ...] = ()) -> dict:
    if not isinstance(data, dict):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return {k: v for k, v in data.items() if k in names}


def _split(url: str) -> tuple[str, str, str]:
    """(scheme, host, normalized absolute path) of a local path or URL."""
    if url_protocol(url) == "file":
        return "file", "", os.path.normpath(os.path.abspath(os.path.expanduser(local_path(url))))
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower(), posixpath.normpath("/" + parts.path.lstrip("/"))


def _normalized(url: str) -> str:
    if url_protocol(url) == "file":
        return url  # callers normalise local paths themselves (expand_paths makes them absolute)
    scheme, netloc, path = urllib.parse.urlsplit(url)[:3]
    query = urllib.parse.urlsplit(url).query
    return urllib.parse.urlunsplit((scheme, netloc, posixpath.normpath(path), query, ""))


def _inside(target: str, within: str) -> bool:
    t, w = _split(target), _split(within)
    if t[:2] != w[:2]:
        return False
    sep = os.sep if t[0] == "file" else "/"
    return t[2] == w[2] or t[2].startswith(w[2].rstrip(sep) + sep)


def _parent(root: str) -> str:
    if url_protocol(root) == "file":
        return os.path.dirname(os.path.abspath(local_path(root or ".")))
    scheme, netloc, path, query, _ = urllib.parse.urlsplit(root)
    return urllib.parse.urlunsplit((scheme, netloc, posixpath.dirname(posixpath.normpath(path or "/")), "", ""))

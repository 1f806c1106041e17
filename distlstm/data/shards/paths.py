"""What a dataset spec names: shard paths and URLs from files, directories, manifests, globs, brace
ranges and comma lists, in a deterministic order (`expand_paths`)."""

from __future__ import annotations

import glob as globlib
import os
import re

import braceexpand

from distlstm.data.shards.manifest import Manifest
from distlstm.data.sources import (SHARD_SUFFIXES, basename, filesystem, local_path, redact, url_protocol,
                                   with_retries)

_SIDECAR_SUFFIXES = (".idx.json", "manifest.json")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _split_top_level(spec: str) -> list[str]:
    """Split on commas outside braces: ``a,b{1,2}`` -> ``["a", "b{1,2}"]``."""
    parts, depth, current = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _is_shard_name(name: str) -> bool:
    return not name.endswith(_SIDECAR_SUFFIXES)


def _manifest_shards(manifest_url: str, storage_options: dict | None, retries: int = 3) -> list[str]:
    return Manifest.read(manifest_url, storage_options=storage_options, retries=retries).shard_urls()


def _expand_local(pattern: str) -> list[str]:
    path = os.path.abspath(os.path.expanduser(local_path(pattern)))
    if os.path.isdir(path):
        manifest = os.path.join(path, "manifest.json")
        if os.path.isfile(manifest):
            return [os.path.normpath(p) for p in _manifest_shards(manifest, None)]
        found = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.endswith(SHARD_SUFFIXES) and os.path.isfile(os.path.join(path, n)))
        if not found:
            raise ValueError(f"{pattern}: directory has no manifest.json and no shard files "
                             f"({', '.join('*' + s for s in SHARD_SUFFIXES)}); point at the output of distlstm.prep")
        return found
    if _GLOB_CHARS.search(path):
        found = sorted(p for p in globlib.glob(path) if os.path.isfile(p) and _is_shard_name(p))
        if not found:
            raise ValueError(f"{pattern}: glob matched no files (looked for {path})")
        return found
    if os.path.basename(path) == "manifest.json" and os.path.isfile(path):
        return [os.path.normpath(p) for p in _manifest_shards(path, None)]
    if not os.path.isfile(path):
        raise ValueError(f"{pattern}: no such file or directory (looked for {path})")
    return [path]


def _expand_remote(pattern: str, storage_options: dict | None, retries: int = 3) -> list[str]:
    protocol = url_protocol(pattern)
    if protocol in ("http", "https"):
        # HTTP cannot list: URLs are taken literally, except a "directory" URL ending in "/",
        # which must hold a manifest.json.
        if pattern.endswith("/"):
            return _manifest_shards(pattern + "manifest.json", storage_options, retries)
        return [pattern]
    fs, path = filesystem(pattern, storage_options)
    if _GLOB_CHARS.search(path):
        found = sorted(p for p in with_retries(lambda: fs.glob(path), pattern, retries=retries, what="glob") if _is_shard_name(p))
        if not found:
            raise ValueError(f"{redact(pattern)}: glob matched no objects (looked for {protocol}://{path})")
        return [fs.unstrip_protocol(p) for p in found]
    name = basename(path)
    if name == "manifest.json":
        return _manifest_shards(pattern, storage_options, retries)
    if "." in name and not pattern.endswith("/"):
        return [pattern]  # a file name: taken literally (no request per shard)
    base = pattern.rstrip("/")
    if with_retries(lambda: fs.exists(path.rstrip("/") + "/manifest.json"), pattern, retries=retries,
                    what="stat"):
        return _manifest_shards(base + "/manifest.json", storage_options, retries)
    found = sorted(p for p in with_retries(lambda: fs.ls(path, detail=False), pattern, retries=retries, what="list")
                   if p.endswith(SHARD_SUFFIXES))
    if not found:
        raise ValueError(f"{redact(pattern)}: no manifest.json and no shard objects under {protocol}://{path}")
    return [fs.unstrip_protocol(p) for p in found]


def expand_paths(spec: str | list[str], *, storage_options: dict | None = None, retries: int = 3) -> list[str]:
    """Shard URLs/paths for a dataset spec, in a deterministic order.

    `spec` is a list or a comma-separated string of: local files; directories (the shards listed in
    their manifest.json, in manifest order, else their sorted ``*.parquet`` / ``*.tar`` files);
    globs (``data/train-*.parquet``); brace ranges (``train-{00000..00127}.parquet``); ``http(s)://``
    URLs (literal after brace expansion; a URL ending in ``/`` reads its manifest.json); object-store
    URLs (``s3://``, ``gs://``, ...; globs and directories listed through fsspec). Local paths come
    back absolute. No match raises ValueError naming the pattern.
    """
    parts = [p for item in ([spec] if isinstance(spec, str) else list(spec)) for p in _split_top_level(item)]
    if not parts:
        raise ValueError(f"empty dataset path spec {spec!r}; give files, directories, globs or URLs")
    out: list[str] = []
    for part in parts:
        for pattern in braceexpand.braceexpand(part):
            if url_protocol(pattern) == "file":
                out.extend(_expand_local(pattern))
            else:
                out.extend(_expand_remote(pattern, storage_options, retries))
    return out

"""Shards checked against the dataset manifest that distlstm.prep wrote (``bytes`` and ``sha256`` of
each shard), so a shard rewritten or damaged after prep stops the run instead of training on it.

``data.verify``: ``size`` (default) compares sizes, one stat per shard when indexing; ``sha256`` also
hashes every shard (reads the whole dataset once: for datasets that may have been tampered with or
copied unreliably); ``none`` skips both.
"""

from __future__ import annotations

from distlstm.data.errors import BadSampleError
from distlstm.data.sources import file_digest, redact

_FIX = "restore the shard, or re-run distlstm.prep to rebuild the dataset and its manifest.json"


def verify_shards(shards: list[str], entries: list, mode: str, *, infos: list[dict],
                  storage_options: dict | None = None, retries: int = 3) -> None:
    """Raise BadSampleError for the first shard whose size (or sha256) differs from its manifest
    entry (`distlstm.data.shards.manifest.ShardInfo`: `bytes` and `sha256`, either may be None). `infos`:
    each shard's `file_info`, which the index reads anyway."""
    if mode == "none":
        return
    if mode not in ("size", "sha256"):
        raise ValueError(f"data.verify={mode!r}: choose size, sha256 or none")
    for url, entry, info in zip(shards, entries, infos):
        want_bytes = getattr(entry, "bytes", None)
        if want_bytes is not None:
            got = info["size"]
            if got is not None and got != want_bytes:
                raise BadSampleError(redact(url), "file", f"{got} bytes, but manifest.json says {want_bytes} "
                                     "(the shard changed after prep)", fix=_FIX + " (or --data.verify none)")
        want_sha = getattr(entry, "sha256", None)
        if mode == "sha256" and want_sha:
            got_sha = file_digest(url, storage_options=storage_options, retries=retries)[1]
            if got_sha != want_sha:
                raise BadSampleError(redact(url), "file", f"sha256 {got_sha[:16]}..., but manifest.json says "
                                     f"{want_sha[:16]}... (the shard changed after prep)", fix=_FIX)

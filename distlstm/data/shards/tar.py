"""WebDataset-style tar shards: one sample per key, the whole shard is one chunk.

Members of sample KEY (contiguous in the tar, as webdataset writes them):
  KEY.tokens.npy   int32/int64 (T,)  token ids        | KEY.features.npy  float32 (T, F)
  KEY.cls          text integer      class            | KEY.target.npy    float scalar or (K,)
  KEY.tags.npy     int (T,)          one tag per step | (none)            language modelling
Optional sidecar ``<shard>.idx.json`` = {"version": 1, "keys": [...], "lengths": [...], "bytes": b}.

Tar parsing is Python's `tarfile` in stream mode (one pass, works over non-seekable HTTP bodies);
grouping members into samples is webdataset's `group_by_keys`. Unlike `tarfile` on its own, a
truncated or corrupt tar is an error here, never a silently shorter shard. Members with a suffix
none of the above uses (images, text, anything else a WebDataset may carry) are passed over without
reading them, and a member above `MAX_MEMBER_BYTES` is never read: its sample is bad.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import urllib.parse
import zlib
from typing import Iterator

import numpy as np
from webdataset import tariterators

from distlstm.data.batch import Chunk
from distlstm.data.errors import BadSampleError
from distlstm.data.sources import RetriesExhaustedError, open_file, open_stream, read_bytes, redact
from distlstm.tasks import TASKS, get_task

SEQUENCE_SUFFIXES = ("tokens.npy", "features.npy")
LABEL_SUFFIXES = {t.name: t.tar_label for t in TASKS.values() if t.tar_label}
KNOWN_SUFFIXES = frozenset((*SEQUENCE_SUFFIXES, *LABEL_SUFFIXES.values()))
MAX_MEMBER_BYTES = 1 << 30
"""A member this large is not read (its sample is bad): one sample of a sequence model has no business
being a gigabyte, and reading it whole would take that much memory in every loader worker."""
_CORRUPT_FIX = "re-create or re-copy the shard (compare its sha256 with manifest.json), or remove it from the dataset"
_CORRUPT_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def sidecar_url(url: str) -> str:
    """``<shard>.idx.json``, keeping a URL's query string (if any) at the end."""
    parts = urllib.parse.urlsplit(url)
    if "://" not in url or not parts.query:
        return url + ".idx.json"
    return urllib.parse.urlunsplit(parts._replace(path=parts.path + ".idx.json"))


# ---------------------------------------------------------------------------------------------- tar walking


def _end_recorder() -> type[tarfile.TarInfo]:
    """A TarInfo class that remembers why header reading stopped.

    `tarfile` ends iteration silently on a missing end-of-archive marker, a cut header or a garbage
    header; only a zero block (EOFHeaderError) is a real end. A fresh class per call: thread-safe.
    """

    class Recorder(tarfile.TarInfo):
        stop: Exception | None = None

        @classmethod
        def fromtarfile(cls, tf):
            try:
                return super().fromtarfile(tf)
            except tarfile.HeaderError as exc:
                cls.stop = exc
                raise

    return Recorder


class Oversize:
    """Stands in for the data of a member above the size cap (never read)."""

    def __init__(self, size: int, cap: int):
        self.size, self.cap = size, cap

    def problem(self, suffix: str) -> str:
        return (f".{suffix} is {self.size} bytes, over the {self.cap}-byte per-member cap (tar.MAX_MEMBER_BYTES); "
                "split it into shorter samples (distlstm.prep --seq-len)")


def _members(handle, shard: str, progress: list[str], *, random_access: bool = False,
             headers_only: bool = False, max_member_bytes: int = MAX_MEMBER_BYTES,
             unknown: set[str] | None = None) -> Iterator[dict]:
    """Yield webdataset file dicts {fname, data, __url__}; raise BadSampleError on corruption.

    `progress` receives each member name so the caller can name the last good one.
    With `headers_only`, `.npy` sequence members yield only their first 4 KiB. Members with a suffix
    not in KNOWN_SUFFIXES are not read (their suffixes go to `unknown`); members over
    `max_member_bytes` yield an `Oversize` instead of their data.
    """
    recorder = _end_recorder()
    try:
        tf = tarfile.open(fileobj=handle, mode="r:*" if random_access else "r|*", tarinfo=recorder)
        for info in tf:
            if not info.isreg():
                continue
            key, suffix = tariterators.base_plus_ext(info.name)
            if key is None:
                continue
            member = tf.extractfile(info)
            if suffix.lower() not in KNOWN_SUFFIXES:
                if unknown is not None and len(unknown) < 8:
                    unknown.add(suffix)
                _pass_over(member, random_access)
                tf.members = []
                continue
            if headers_only and info.name.endswith(SEQUENCE_SUFFIXES):
                data = member.read(min(info.size, 4096))
            elif info.size > max_member_bytes:
                data = Oversize(info.size, max_member_bytes)
                _pass_over(member, random_access)
            else:
                data = member.read()
            progress.append(info.name)
            yield {"fname": info.name, "data": data, "__url__": shard}
            tf.members = []  # stream mode keeps every TarInfo otherwise
    except _CORRUPT_ERRORS as exc:
        raise _corrupt(shard, progress, f"{type(exc).__name__}: {exc}") from None
    stop = recorder.stop
    if stop is not None and not isinstance(stop, tarfile.EOFHeaderError):
        problem = {tarfile.EmptyHeaderError: "file ends without the end-of-archive marker (truncated)",
                   tarfile.TruncatedHeaderError: "file ends inside a member header (truncated)"}.get(
            type(stop), f"corrupt member header ({stop})")
        raise _corrupt(shard, progress, problem)


def _pass_over(member, random_access: bool) -> None:
    """Move past a member's data without holding it. A seekable file seeks; a stream is read in 8 MiB
    pieces that are dropped (tarfile's own skipping reads 10 KiB at a time, several times slower)."""
    if not random_access:
        while member.read(8 << 20):
            pass


def _corrupt(shard: str, progress: list[str], problem: str) -> BadSampleError:
    where = f"after member {progress[-1]}" if progress else "at the start"
    return BadSampleError(shard, where, f"truncated or corrupt tar: {problem}", fix=_CORRUPT_FIX)


def _samples(handle, shard: str, **kw) -> Iterator[dict]:
    progress: list[str] = []
    unknown: set[str] = set()
    files = _members(handle, shard, progress, unknown=unknown, **kw)
    found = False
    try:
        # group_by_keys: consecutive members with the same KEY form one sample; handler re-raises.
        for sample in tariterators.group_by_keys(files):
            found = True
            yield sample
    except BadSampleError:
        raise
    except ValueError as exc:  # a member name repeated within one sample
        raise BadSampleError(shard, f"after member {progress[-1]}" if progress else "members",
                             str(exc.args[0]) if exc.args else repr(exc), fix=_CORRUPT_FIX) from None
    if not found and unknown:
        raise BadSampleError(shard, "members", f"no member distlstm reads (.{', .'.join(sorted(KNOWN_SUFFIXES))}); "
                             f"found only .{', .'.join(sorted(unknown))}",
                             fix="write the samples with distlstm.prep, or name the members as listed")


# ---------------------------------------------------------------------------------------------- decoding


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _sequence_kind(sample: dict) -> str | None:
    kinds = [s for s in SEQUENCE_SUFFIXES if s in sample]
    return kinds[0] if len(kinds) == 1 else ("both" if kinds else None)


def _decode_sequence(sample: dict) -> tuple[np.ndarray | None, str | None]:
    """(array, None) or (None, problem). tokens -> int64 (T,), features -> float32 (T, F)."""
    kind = _sequence_kind(sample)
    if kind is None:
        return None, f"no sequence member (.{' or .'.join(SEQUENCE_SUFFIXES)})"
    if kind == "both":
        return None, "has both .tokens.npy and .features.npy"
    if isinstance(sample[kind], Oversize):
        return None, sample[kind].problem(kind)
    try:
        array = _npy(sample[kind])
    except Exception as exc:  # noqa: BLE001 -- any decode failure is this sample's problem
        return None, f".{kind} does not decode ({type(exc).__name__}: {exc})"
    if kind == "tokens.npy":
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            return None, f".tokens.npy is {array.dtype} {array.shape}, expected 1-D int32/int64"
        array = array.astype(np.int64, copy=False)
    else:
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            return None, f".features.npy is {array.dtype} {array.shape}, expected float32 (T, F)"
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            return array, "NaN or inf in features"
    if len(array) == 0:
        return array, "empty sequence (length 0)"
    return array, None


def _decode_label(sample: dict, suffix: str, length: int) -> tuple[np.ndarray | None, str | None]:
    if suffix not in sample:
        return None, f"missing label .{suffix}"
    if isinstance(sample[suffix], Oversize):
        return None, sample[suffix].problem(suffix)
    try:
        if suffix == "cls":
            return np.asarray([int(sample[suffix].decode("utf-8").strip())], np.int64), None
        array = _npy(sample[suffix])
    except Exception as exc:  # noqa: BLE001
        return None, f".{suffix} does not decode ({type(exc).__name__}: {exc})"
    if suffix == "tags.npy":
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            return None, f".tags.npy is {array.dtype} {array.shape}, expected 1-D int"
        if len(array) != length:
            return None, f".tags.npy has {len(array)} steps but the sequence has {length}"
        return array.astype(np.int64, copy=False), None
    if array.ndim > 1 or not np.issubdtype(array.dtype, np.number):
        return None, f".target.npy is {array.dtype} {array.shape}, expected a float scalar or 1-D vector"
    array = array.astype(np.float32).reshape(-1)
    if not np.isfinite(array).all():
        return None, "NaN or inf in .target.npy"
    return array, None


def _label_suffix(samples: list[dict], task: str | None, shard: str) -> str | None:
    if task is not None:
        return get_task(task).tar_label
    present = {s for s in LABEL_SUFFIXES.values() if any(s in sample for sample in samples)}
    if len(present) > 1:
        raise BadSampleError(shard, "labels", f"mixed label members {sorted(present)} in one shard",
                             fix="give every sample the same label type (.cls, .target.npy or .tags.npy)")
    return present.pop() if present else None


def read_tar_chunk(url: str, *, storage_options: dict | None = None, retries: int = 3, task: str | None = None,
                   labels: bool = True, expected_lengths: np.ndarray | None = None, on_bad: str = "mark",
                   max_member_bytes: int = MAX_MEMBER_BYTES) -> Chunk:
    """Decode a whole tar shard into one `Chunk`.

    `task` (classify/regress/tag/lm) says which label member to expect; None infers it from the
    shard; `labels=False` reads none (data to predict on). Sample-level problems (missing label or sequence, undecodable .npy, NaN features) go to
    ``chunk.bad`` (index -> problem) with placeholder data, or raise with ``on_bad="raise"``.
    Shard-level problems (corrupt/truncated tar, sample count or lengths differing from
    `expected_lengths`) always raise `BadSampleError`. Network errors raise OSError (after retries).
    """
    if on_bad not in ("mark", "raise"):
        raise ValueError(f"on_bad={on_bad!r}: expected 'mark' or 'raise'")
    shard = redact(url)
    # One sequential pass, one request: the owner of a tar shard streams it once per epoch.
    with open_stream(url, storage_options=storage_options, retries=retries) as handle:
        samples = list(_samples(handle, shard, max_member_bytes=max_member_bytes))
    suffix = _label_suffix(samples, task, shard) if labels else None
    sequences, labels, keys, bad = [], [], [], {}
    seq_kind = next((k for s in samples if (k := _sequence_kind(s)) in SEQUENCE_SUFFIXES), "tokens.npy")
    width, target_shape = None, None
    for i, sample in enumerate(samples):
        key = sample["__key__"]
        keys.append(key)
        seq, problem = _decode_sequence(sample)
        if seq is not None and problem is None and _sequence_kind(sample) != seq_kind:
            seq, problem = None, f"has .{_sequence_kind(sample)} but other samples have .{seq_kind}"
        if seq is not None and seq.ndim == 2:
            width = seq.shape[1] if width is None else width
            if seq.shape[1] != width and problem is None:
                seq, problem = None, f"has {seq.shape[1]} features per step, other samples have {width}"
        length = len(seq) if seq is not None else 0
        label = None
        if suffix is not None and problem is None:
            label, problem = _decode_label(sample, suffix, length)
            if label is not None and suffix == "target.npy":
                target_shape = label.shape if target_shape is None else target_shape
                if label.shape != target_shape:
                    label, problem = None, f".target.npy has {label.size} values, other samples have {target_shape[0]}"
        if problem is not None:
            if on_bad == "raise":
                raise BadSampleError(shard, f"sample {key}", problem)
            bad[i] = problem
        sequences.append(seq)
        labels.append(label)
    if seq_kind == "features.npy":
        empty = np.zeros((0, width or 0), np.float32)
        sequences = [s if s is not None and s.ndim == 2 and s.shape[1] == (width or 0) else empty for s in sequences]
    else:
        empty = np.zeros(0, np.int64)
        sequences = [s if s is not None else empty for s in sequences]
    lengths = np.fromiter((len(s) for s in sequences), np.int64, count=len(sequences))
    _check_expected(shard, keys, lengths, expected_lengths, bad)
    offsets = np.zeros(len(sequences) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(sequences) if sequences else empty
    return Chunk(values=values, offsets=offsets, labels=_stack_labels(suffix, labels, lengths, target_shape),
                 keys=keys, bad=bad)


def _stack_labels(suffix: str | None, labels: list, lengths: np.ndarray, target_shape) -> np.ndarray | None:
    if suffix is None:
        return None
    if suffix == "tags.npy":
        parts = [lab if lab is not None else np.zeros(n, np.int64) for lab, n in zip(labels, lengths)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if suffix == "cls":
        return np.array([lab[0] if lab is not None else 0 for lab in labels], np.int64)
    size = int(np.prod(target_shape)) if target_shape is not None else 1
    out = np.stack([lab if lab is not None else np.full(size, np.nan, np.float32) for lab in labels]) \
        if labels else np.zeros((0, size), np.float32)
    return out[:, 0] if size == 1 and (target_shape is None or target_shape == (1,)) else out


def _check_expected(shard: str, keys: list[str], lengths: np.ndarray, expected: np.ndarray | None,
                    bad: dict[int, str]) -> None:
    if expected is None:
        return
    expected = np.asarray(expected)
    fix = "the shard changed since it was indexed: delete the cached index (or rerun prep) and restart"
    if len(expected) != len(lengths):
        raise BadSampleError(shard, f"{len(lengths)} samples", f"the index says {len(expected)} samples", fix=fix)
    good = np.array([i not in bad for i in range(len(lengths))], bool)
    mismatch = np.flatnonzero((expected != lengths) & good)
    if len(mismatch):
        i = int(mismatch[0])
        raise BadSampleError(shard, f"sample {keys[i]}", f"length {lengths[i]}, the index says {expected[i]}", fix=fix)


# ---------------------------------------------------------------------------------------------- lengths


def _npy_length(header: bytes) -> int | None:
    try:
        stream = io.BytesIO(header)
        major, _ = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(stream)
        return int(shape[0]) if shape else None
    except Exception:  # noqa: BLE001 -- reported as length 0; read_tar_chunk names the problem
        return None


def tar_lengths(url: str, *, storage_options: dict | None = None, retries: int = 3) -> np.ndarray:
    """Per-sample sequence lengths (int64) in member order: from ``<shard>.idx.json`` if present,
    else by one pass over the shard reading only `.npy` headers. Unreadable samples count as 0."""
    try:
        index = json.loads(read_bytes(sidecar_url(url), storage_options=storage_options, retries=retries))
        return np.asarray(index["lengths"], dtype=np.int64)
    except RetriesExhaustedError:
        raise  # the store is failing; scanning the shard would fail the same way
    except Exception:  # noqa: BLE001 -- no sidecar, an unreadable one, or a signed URL not covering it
        pass  # scanning is slower but always right
    return _scan_lengths(url, storage_options=storage_options, retries=retries)


def _scan_lengths(url: str, *, storage_options: dict | None, retries: int) -> np.ndarray:
    shard = redact(url)
    lengths = []
    with open_file(url, storage_options=storage_options, retries=retries) as handle:
        for sample in _samples(handle, shard, random_access=handle.seekable(), headers_only=True):
            kind = _sequence_kind(sample)
            length = _npy_length(sample[kind]) if kind in SEQUENCE_SUFFIXES else None
            lengths.append(length or 0)
    return np.asarray(lengths, dtype=np.int64)


def write_sidecar(shard_path: str, keys: list[str], lengths, shard_bytes: int, extra: dict | None = None) -> None:
    """Write ``<shard>.idx.json`` next to a local shard (used by prep); `extra`: more per-sample lists
    (lm stream layout: ``doc_start``)."""
    with open(sidecar_url(shard_path), "w", encoding="utf-8") as f:
        json.dump({"version": 1, "keys": list(keys), "lengths": [int(n) for n in lengths],
                   "bytes": int(shard_bytes), **(extra or {})}, f, separators=(",", ":"))


def read_sidecar_flags(shard: str, rows: int, column: str, *, storage_options: dict | None = None,
                       retries: int = 3) -> np.ndarray | None:
    """Per-sample flags `column` (lm: doc_start) from the shard's `.idx.json` sidecar (written by prep);
    None where the shard has no sidecar or the sidecar no such flags."""
    try:
        side = json.loads(read_bytes(sidecar_url(shard), storage_options=storage_options,
                                     retries=retries))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # Not "every sample is a document": a sidecar that failed to download or parse would
        # silently change where the state is reset.
        raise BadSampleError(shard, "sidecar", f"{sidecar_url(shard).rsplit('/', 1)[-1]} cannot be read "
                             f"({exc})", fix="check the connection, or re-create the shard and its .idx.json "
                             "with distlstm.prep") from exc
    if not isinstance(side, dict) or column not in side:
        return None
    flags = np.asarray(side[column], bool)
    if len(flags) != rows:
        raise BadSampleError(shard, "sidecar", f"'{column}' has {len(flags)} entries for {rows} samples",
                             fix="re-create the shard and its .idx.json with distlstm.prep")
    return flags

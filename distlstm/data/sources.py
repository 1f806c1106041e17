"""Where shards live: path expansion, fsspec opening with retries, exact byte-range reads,
sequential streams, and credential redaction.

Every URL that reaches a log line, an error message or a saved config passes through `redact`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator, TypeVar

import fsspec

from distlstm.data import httpranges

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARD_SUFFIXES = (".parquet", ".tar", ".tar.gz", ".tgz")
_MAX_BACKOFF_S = 30.0
CONNECT_TIMEOUT_S = 10.0
"""Default data.connect_timeout_s: seconds to open a connection to a server."""
READ_TIMEOUT_S = 30.0
"""Default data.read_timeout_s: seconds a server may stay silent (headers or body) before the read fails."""
TIMEOUTS = httpranges.TIMEOUTS
"""The storage_options key that carries the timeouts to every reader, worker and process (see
`network_options`); taken out again before fsspec sees the options."""

# ---------------------------------------------------------------------------------------------- redaction

_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "pwd", "sig", "credential", "auth", "session")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@'\"<>]+@")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:[\w.\-]*(?:" + "|".join(_SECRET_WORDS) + r")[\w.\-]*)=)[^&#\s'\"<>]*", re.IGNORECASE)


def redact(url_or_text: Any) -> str:
    """`url_or_text` with credentials masked: ``user:pass@`` in URLs and secret-looking query params.

    >>> redact("https://u:p@host/a.tar?X-Amz-Signature=abc&part=1")
    'https://***@host/a.tar?X-Amz-Signature=***&part=1'
    """
    text = str(url_or_text)
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _SECRET_PARAM.sub(r"\g<name>***", text)


def local_path(url: str) -> str:
    """The file system path of a local file named by a plain path or a `file://` URL (anything else
    is returned as it is)."""
    return url[len("file://"):] if url.startswith("file://") else url


def is_local(url: str, storage_options: dict | None = None) -> bool:
    """Whether `url` names a local file that Arrow's native reader opens by name: a plain path or a
    `file://` URL, with no fsspec options of the user's (the timeouts `network_options` adds to
    every run's options are not: they only apply to network reads)."""
    user_options = {k for k in (storage_options or {}) if k != TIMEOUTS}
    return "://" not in local_path(url) and not user_options


def basename(url: str) -> str:
    """The last name in a path or URL: no query string, no trailing slash."""
    return url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]


def file_digest(url: str, *, storage_options: dict | None = None, retries: int = 3) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read once front to back."""
    h, size = hashlib.sha256(), 0
    with open_file(url, storage_options=storage_options, retries=retries) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def redact_options(storage_options: dict | None) -> dict | None:
    """A copy of fsspec `storage_options` safe to log or save: secret-looking keys map to ``"***"``."""
    if storage_options is None:
        return None
    out: dict = {}
    for name, value in storage_options.items():
        lowered = str(name).lower()
        if isinstance(value, dict):
            out[name] = redact_options(value)
        elif value not in (None, "") and any(word in lowered for word in _SECRET_WORDS):
            out[name] = "***"
        elif isinstance(value, str):
            out[name] = redact(value)
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------- retries

_TRANSIENT_NAMES = {  # matched by class name so that botocore / google libraries need not be imported
    "ClientConnectionError", "ClientOSError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientPayloadError", "ContentLengthError", "FSTimeoutError", "IncompleteRead", "RemoteDisconnected",
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "ProtocolError", "ChunkedEncodingError", "ServiceUnavailable",
    "TooManyRequests", "InternalServerError", "BadGateway", "GatewayTimeout", "RetryError",
}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}


class RetriesExhaustedError(OSError):
    """A transient error (connection, timeout, HTTP 5xx/429) persisted through every retry."""


def _http_status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection errors, timeouts, HTTP 5xx / 408 / 429.

    Walks the cause chain because fsspec re-raises e.g. an HTTP 503 on HEAD as FileNotFoundError.
    A 404 (or any other 4xx) is permanent.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = _http_status(current)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(current).__mro__):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or _http_status(exc) == 404


def _denied_status(exc: BaseException) -> int | None:
    """401 or 403 anywhere in the cause chain: fsspec's HTTP backend re-raises them as FileNotFoundError."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _http_status(current) in (401, 403):
            return _http_status(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _describe(exc: BaseException) -> str:
    """What happened, in words: a timeout, an HTTP status, else the error itself (redacted)."""
    for e in _chain(exc):
        if (status := _http_status(e)) is not None:
            return f"HTTP {status}"
    for e in _chain(exc):
        if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
            return (f"timed out ({type(e).__name__}: no connection within data.connect_timeout_s or no data "
                    f"within data.read_timeout_s)")
    return redact(f"{type(exc).__name__}: {exc}")


def with_retries(fn: Callable[[], T], url: str, *, retries: int = 3, backoff_s: float = 0.5,
                 what: str = "read") -> T:
    """Call `fn`; retry transient failures up to `retries` more times with exponential backoff.

    Raises FileNotFoundError at once for a missing object, RetriesExhaustedError (an OSError) naming
    the redacted URL and the attempts after the last transient failure; other errors propagate.
    """
    attempts = max(0, int(retries)) + 1
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 -- classified below
            if not is_transient(exc):
                if (status := _denied_status(exc)) is not None:
                    raise PermissionError(errno.EACCES, f"{redact(url)}: access denied (HTTP {status}, {what}); check "
                                          f"the credentials in data.storage_options, or that a signed URL has not "
                                          f"expired", redact(url)) from None
                if _is_not_found(exc):
                    # `from None`: the original message may carry the unredacted URL.
                    raise FileNotFoundError(errno.ENOENT, f"{redact(url)}: not found ({what}); check the path "
                                            f"or URL and that the shard exists", redact(url)) from None
                raise
            if attempt == attempts:
                raise RetriesExhaustedError(f"{redact(url)}: {what} failed after {attempts} attempt"
                                            f"{'s' * (attempts > 1)} (data.retries={attempts - 1}); last error: "
                                            f"{_describe(exc)}") from None
            delay = min(_MAX_BACKOFF_S, backoff_s * 2 ** (attempt - 1)) * (1 + 0.25 * random.random())
            log.warning("%s: %s failed (attempt %d/%d: %s); retrying in %.2fs",
                        redact(url), what, attempt, attempts, _describe(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- opening


def url_protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def network_options(storage_options: dict | None, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                    read_timeout_s: float = READ_TIMEOUT_S) -> dict:
    """`storage_options` carrying the connect and read timeouts, so that every open, range read,
    stream, index pass and loader worker given them applies the same ones (build_run does this once
    with data.connect_timeout_s / data.read_timeout_s)."""
    return {**(storage_options or {}), TIMEOUTS: {"connect_s": float(connect_timeout_s),
                                                  "read_s": float(read_timeout_s)}}


def timeouts(storage_options: dict | None) -> tuple[float, float]:
    """(connect, read) timeouts in seconds that `storage_options` carry (the defaults if none)."""
    t = (storage_options or {}).get(TIMEOUTS) or {}
    return float(t.get("connect_s", CONNECT_TIMEOUT_S)), float(t.get("read_s", READ_TIMEOUT_S))


def _default_options(url: str, storage_options: dict | None) -> dict:
    connect_s, read_s = timeouts(storage_options)
    options = {k: v for k, v in (storage_options or {}).items() if k != TIMEOUTS}
    protocol = url_protocol(url)
    if protocol in ("http", "https") and "client_kwargs" not in options:
        # aiohttp's default is a 5-minute total timeout per request; a stalled server should
        # fail (and be retried) much sooner, and a long download must not be cut by a total cap.
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=connect_s,
                                                                     sock_read=read_s)}
    elif protocol in ("s3", "s3a") and "config_kwargs" not in options:
        options["config_kwargs"] = {"connect_timeout": connect_s, "read_timeout": read_s}
    return options


_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def filesystem(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **_default_options(url, storage_options))
    except ImportError as exc:  # fsspec knows the protocol, its backend package is not installed
        protocol = url_protocol(url)
        extra = _EXTRAS.get(protocol)
        how = (f"pip install 'distlstm[{extra}]'" if extra else
               f"install the fsspec backend for {protocol}:// ({str(exc).strip() or type(exc).__name__})")
        raise ValueError(f"{redact(url)}: reading {protocol}:// URLs needs a package that is not installed; "
                         f"{how}") from None


class ReadOnlyFile:
    """The one base of the read-only file objects handed to Arrow, tarfile and json: a local-looking
    binary file over a remote `url`. Subclasses give `read` (and `seek` / `tell` when seekable); the
    rest of the file protocol, and a repr naming the URL without credentials, live here."""

    def __init__(self, url: str):
        self._url = url
        self._closed = False

    def read(self, size: int = -1) -> bytes:  # pragma: no cover -- every subclass defines it
        raise NotImplementedError

    def readinto(self, buffer) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        raise OSError(errno.ESPIPE, f"{redact(self._url)}: not seekable")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self._url)}>"


class _RetryingReader(ReadOnlyFile):
    """Read-only file wrapper that retries transient read errors at the same position.

    A read that fails leaves fsspec's buffered files at the old position, so the read can simply be
    repeated; for seekable files the position is restored explicitly first.
    """

    def __init__(self, raw, url: str, retries: int, backoff_s: float):
        super().__init__(url)
        self._raw, self._retries, self._backoff_s = raw, retries, backoff_s

    def _retry(self, fn: Callable[[], T]) -> T:
        pos = self._raw.tell() if self.seekable() else None

        def attempt() -> T:
            if pos is not None and self._raw.tell() != pos:
                self._raw.seek(pos)
            return fn()

        return with_retries(attempt, self._url, retries=self._retries, backoff_s=self._backoff_s)

    def read(self, size: int = -1) -> bytes:
        return self._retry(lambda: self._raw.read(size))

    def seekable(self) -> bool:
        try:
            return bool(self._raw.seekable())
        except Exception:  # noqa: BLE001
            return False

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    @property
    def closed(self) -> bool:
        return bool(getattr(self._raw, "closed", False))

    @property
    def size(self):
        return getattr(self._raw, "size", None)

    def close(self) -> None:
        self._raw.close()

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


@contextlib.contextmanager
def open_file(url: str, mode: str = "rb", *, storage_options: dict | None = None, retries: int = 3,
              backoff_s: float = 0.5) -> Iterator[Any]:
    """Open a local path or fsspec URL. Opening, and each read in read mode, retries transient errors.

    A missing file raises FileNotFoundError at once; persistent transient errors raise OSError after
    ``retries + 1`` attempts. Messages name the redacted URL.
    """
    fs, path = filesystem(url, storage_options)
    raw = with_retries(lambda: fs.open(path, mode), url, retries=retries, backoff_s=backoff_s, what="open")
    handle = _RetryingReader(raw, url, retries, backoff_s) if "r" in mode and "b" in mode else raw
    try:
        yield handle
    finally:
        raw.close()


def read_bytes(url: str, start: int | None = None, end: int | None = None, *,
               storage_options: dict | None = None, retries: int = 3, backoff_s: float = 0.5) -> bytes:
    """Bytes ``[start, end)`` of `url` (whole file by default; a negative `start` with no `end` is
    the last ``-start`` bytes). A range is checked to be exactly that range (see `read_ranges`)."""
    if start is not None or end is not None:
        if start is not None and start < 0 and end is None:
            return read_ranges(url, [(start, None)], storage_options=storage_options, retries=retries,
                               backoff_s=backoff_s)[0]
        if start is None or start < 0 or end is None or end < 0:
            raise ValueError(f"read_bytes: unsupported range [{start}, {end}) of {redact(url)}")
        return read_ranges(url, [(start, end)], storage_options=storage_options, retries=retries,
                           backoff_s=backoff_s)[0]
    fs, path = filesystem(url, storage_options)
    return with_retries(lambda: fs.cat_file(path), url, retries=retries, backoff_s=backoff_s, what="read")


def file_info(url: str, *, storage_options: dict | None = None, retries: int = 3,
              backoff_s: float = 0.5) -> dict:
    """``dict(size=bytes or None, mtime_or_etag=str or None)``: enough to key a cache on."""
    fs, path = filesystem(url, storage_options)
    info = with_retries(lambda: fs.info(path), url, retries=retries, backoff_s=backoff_s, what="stat")
    version = None
    for field in ("ETag", "etag", "md5Hash", "Last-Modified", "LastModified", "last_modified", "mtime",
                  "updated", "modified", "created"):
        if info.get(field) not in (None, ""):
            version = f"{field}={info[field]}"
            break
    size = info.get("size")
    return {"size": int(size) if size is not None else None, "mtime_or_etag": version}


# ---------------------------------------------------------------------------------------------- byte ranges

WHOLE_FILE_MAX_MB = 256.0
"""Default cap (data.whole_shard_max_mb) on a file read whole because its server ignores byte ranges."""


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[start, end)`` ranges with overlapping or touching ones merged (no gap is bridged:
    a merged range holds no byte that was not asked for)."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


class _WholeFiles:
    """Files read whole from servers that ignore Range headers, kept per process (LRU) so that each
    is fetched once per process, not once per row group. Total bytes held <= the cap."""

    def __init__(self) -> None:
        self._files: OrderedDict[str, bytes] = OrderedDict()
        self._evicted: set[str] = set()
        self.lock = threading.Lock()

    def get(self, url: str) -> bytes | None:
        with self.lock:
            data = self._files.get(url)
            if data is not None:
                self._files.move_to_end(url)
            return data

    def put(self, url: str, data: bytes, cap: int) -> None:
        with self.lock:
            if url in self._evicted:
                log.warning("%s: read whole again (the files read whole by this process exceed "
                            "data.whole_shard_max_mb=%.0f); raise it, or serve the data with byte-range support",
                            redact(url), cap / 1e6)
            self._files[url] = data
            while sum(len(d) for d in self._files.values()) > cap and len(self._files) > 1:
                old, _ = self._files.popitem(last=False)
                self._evicted.add(old)


_WHOLE = _WholeFiles()


def _too_big(url: str, size: int | None, cap: int) -> ValueError:
    what = f"{size / 1e6:.1f} MB" if size is not None else "of unknown size"
    return ValueError(f"{redact(url)}: the server ignores byte ranges (it answered a Range request with the whole "
                      f"file) and the file is {what}, over data.whole_shard_max_mb={cap / 1e6:.0f}; serve the data "
                      f"with byte-range support (nginx, S3, GCS, ...) or raise data.whole_shard_max_mb")


_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _reset_locks() -> None:  # in a forked child: a lock held by a thread of the parent stays held
    global _FILE_LOCKS_GUARD
    _FILE_LOCKS.clear()
    _FILE_LOCKS_GUARD = threading.Lock()
    _WHOLE.lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_locks)


def _file_lock(url: str) -> threading.Lock:
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(url, threading.Lock())


def _fetch(url: str, ranges: list[tuple[int, int | None]], cap: int, storage_options: dict | None) -> list[bytes]:
    """The bytes of each range, each checked for its length. One request per range; several ranges
    are fetched concurrently (one round trip, not one per range)."""
    if url_protocol(url) in ("http", "https"):
        try:
            pieces = httpranges.fetch(url, ranges, cap, storage_options,
                                      lambda: filesystem(url, storage_options)[0], timeouts(storage_options))
        except httpranges.TooBig as exc:
            raise _too_big(url, exc.size, cap) from None
    else:
        fs, path = filesystem(url, storage_options)
        if len(ranges) == 1:
            a, b = ranges[0]
            pieces = [fs.tail(path, -a) if b is None else fs.cat_file(path, start=a, end=b)]
        else:
            pieces = fs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges],
                                   on_error="return")
            for piece in pieces:
                if isinstance(piece, BaseException):
                    raise piece
    for (a, b), piece in zip(ranges, pieces):
        want = -a if b is None else b - a
        if len(piece) != want:
            raise OSError(errno.EIO, f"{redact(url)}: asked for bytes [{a}, {b}), got {len(piece)} bytes "
                                     f"(file changed or truncated?)")
    return pieces


def read_ranges(url: str, ranges: list[tuple[int, int | None]], *, storage_options: dict | None = None,
                retries: int = 3, backoff_s: float = 0.5, whole_max_mb: float = WHOLE_FILE_MAX_MB) -> list[bytes]:
    """The bytes of each ``[start, end)`` of `url`, and nothing else: touching ranges are merged,
    each merged range is one request (concurrent), no readahead, no block cache. ``(-n, None)`` is
    the last `n` bytes. Transient errors are retried as in `with_retries`.

    An HTTP server that ignores byte ranges (Python's http.server and other simple servers answer
    200 with the whole file) is detected by the status: the whole file it sent is kept in memory
    by this process (up to `whole_max_mb` MB in all, LRU) and later ranges of the same file are
    served from it, so such a file is read once per process. A larger file is an error that says so.
    """
    if not ranges:
        return []
    cap = int(whole_max_mb * 1e6)
    whole = _WHOLE.get(url)
    if whole is None and url_protocol(url) == "file":
        with open(local_path(url), "rb") as f:
            out = []
            for a, b in ranges:
                f.seek(a, os.SEEK_END if b is None else os.SEEK_SET)
                out.append(f.read(-a if b is None else b - a))
            return out
    if whole is None:
        suffixes = sorted({r for r in ranges if r[1] is None})
        merged = suffixes + coalesce([r for r in ranges if r[1] is not None])
        what = f"read {len(merged)} byte range{'s' * (len(merged) > 1)}"
        # Until this process knows that the server honours Range, reads of one file go one at a
        # time: threads reading a file concurrently from a server that ignores Range would each
        # download all of it.
        probing = url_protocol(url) in ("http", "https") and not httpranges.honours_ranges(url)
        with _file_lock(url) if probing else contextlib.nullcontext():
            whole = _WHOLE.get(url) if probing else None
            if whole is None:
                try:
                    pieces = with_retries(lambda: _fetch(url, merged, cap, storage_options), url,
                                          retries=retries, backoff_s=backoff_s, what=what)
                except httpranges.WholeBody as exc:
                    log.warning("%s: the server ignores byte ranges (HTTP 200 to a Range request); using the "
                                "whole file (%d bytes) for every read of it by this process", redact(url),
                                len(exc.body))
                    whole = exc.body
                    _WHOLE.put(url, whole, cap)
    if whole is not None:
        return [whole[a:] if b is None else whole[a:b] for a, b in ranges]
    found = dict(zip(merged, pieces))
    out = []
    for a, b in ranges:
        if b is None:
            out.append(found[(a, b)])
            continue
        (m0, _), piece = next(((m, p) for m, p in found.items() if m[1] is not None and m[0] <= a and b <= m[1]))
        out.append(piece[a - m0:b - m0])
    return out


# ---------------------------------------------------------------------------------------------- streams


class _Stream(ReadOnlyFile):
    """A sequential read-only stream of a whole file with one request (works whether or not the
    server supports byte ranges). A transient failure mid-stream re-opens the file and skips to
    where it stopped, within the retry budget of `with_retries`."""

    def __init__(self, open_raw: Callable[[], Any], url: str, retries: int, backoff_s: float):
        super().__init__(url)
        self._open_raw, self._retries, self._backoff_s = open_raw, retries, backoff_s
        self._raw = with_retries(open_raw, url, retries=retries, backoff_s=backoff_s, what="open")
        self._pos = 0

    def _attempt(self, size: int) -> bytes:
        if self._raw is None:
            self._raw = self._open_raw()
            left = self._pos
            while left:
                skipped = self._raw.read(min(left, 1 << 20))
                if not skipped:
                    raise OSError(errno.EIO, f"{redact(self._url)}: file shorter than before on re-open")
                left -= len(skipped)
        try:
            return self._raw.read(size)
        except Exception:
            with contextlib.suppress(Exception):
                self._raw.close()
            self._raw = None
            raise

    def read(self, size: int = -1) -> bytes:
        data = with_retries(lambda: self._attempt(size), self._url, retries=self._retries,
                            backoff_s=self._backoff_s, what=f"read at byte {self._pos}")
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        super().close()
        if self._raw is not None:
            self._raw.close()
            self._raw = None


@contextlib.contextmanager
def open_stream(url: str, *, storage_options: dict | None = None, retries: int = 3,
                backoff_s: float = 0.5) -> Iterator[Any]:
    """Read a whole file front to back, once: a local file, one streamed HTTP GET (no Range header,
    so any server will do, and no block cache), or an fsspec file for object stores (sequential
    block reads are exact ranges there). For tar shards, which are read sequentially."""
    if url_protocol(url) == "file":
        local = local_path(url)
        if not os.path.isfile(local):
            raise FileNotFoundError(errno.ENOENT, f"{redact(url)}: not found; check the path and that the shard "
                                    f"exists", redact(url))
        with open(local, "rb") as f:
            yield f
        return
    fs, path = filesystem(url, storage_options)
    if url_protocol(url) in ("http", "https"):
        stream = _Stream(lambda: fs.open(path, "rb", block_size=0), url, retries, backoff_s)
        try:
            yield stream
        finally:
            stream.close()
        return
    with open_file(url, storage_options=storage_options, retries=retries, backoff_s=backoff_s) as handle:
        yield handle

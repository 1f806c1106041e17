"""HTTP(S) byte ranges that tell a ranged answer (206) from a whole file (200).

fsspec's `cat_file` returns whatever body comes back, so a server that ignores the Range header
(Python's http.server and many simple servers) would silently hand back the whole file as if it
were the range. Here the status decides: 206 is the range, 200 raises `WholeBody` with the file,
which `sources.read_ranges` keeps for the process (its documented fallback).

Two clients. A single range (a row group: what the loader reads, from several threads) goes over
`http.client` with one keep-alive connection per thread and server: about 0.1 ms of CPU per
request, where aiohttp through fsspec's event-loop thread takes ~0.4 ms, which on small row groups
costs more than decoding them. Several ranges at once (the indexer's batches), and any URL whose
storage_options carry more than `headers`, go through fsspec's aiohttp session concurrently, so
that storage_options such as client_kwargs still apply.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import ssl
import threading
import urllib.parse

TIMEOUTS = "distlstm_timeouts"  # sources.TIMEOUTS (sources imports this module, not the reverse)

_MAX_REDIRECTS = 5
_RANGE_SERVERS: set[str] = set()  # scheme://host:port that answered a Range request with 206
_local = threading.local()


class WholeBody(Exception):
    """The server answered a Range request with the whole file (status 200)."""

    def __init__(self, body: bytes):
        super().__init__("whole body")
        self.body = body


class TooBig(Exception):
    """A whole-file answer larger than the cap (size None: no Content-Length)."""

    def __init__(self, size: int | None):
        super().__init__(f"whole body of {size} bytes")
        self.size = size


class HttpStatusError(OSError):
    """An HTTP error status; `status` decides whether it is retried (5xx, 408, 429)."""

    def __init__(self, status: int, url: str):
        super().__init__(f"HTTP {status}")
        self.status = status


def server_of(url: str) -> str:
    return "/".join(url.split("/", 3)[:3])


def honours_ranges(url: str) -> bool:
    """Whether this process has seen the server of `url` answer a Range request with 206."""
    return server_of(url) in _RANGE_SERVERS


def direct(url: str, storage_options: dict | None) -> bool:
    """Whether `url` can use the http.client path: no storage_options besides headers (and the
    timeouts, which both paths apply)."""
    return url.split("://", 1)[0].lower() in ("http", "https") and \
        not set(storage_options or {}) - {"headers", TIMEOUTS}


def _range_header(start: int, end: int | None) -> str:
    return f"bytes={start}" if end is None and start < 0 else f"bytes={start}-" if end is None else \
        f"bytes={start}-{end - 1}"


# ---------------------------------------------------------------------------------------------- http.client


def _connection(scheme: str, netloc: str, timeouts: tuple[float, float]) -> tuple[http.client.HTTPConnection, bool]:
    """(this thread's keep-alive connection to the server, whether it was used before). It is
    opened within the connect timeout; then every socket read waits at most the read timeout."""
    if getattr(_local, "pid", None) != os.getpid():  # after a fork: the parent's sockets are not ours
        _local.pid, _local.conns = os.getpid(), {}
    key = (scheme, netloc)
    conn = _local.conns.get(key)
    if conn is not None:
        return conn, True
    host = netloc.rsplit("@", 1)[-1]
    connect_s, read_s = timeouts
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, timeout=connect_s, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, timeout=connect_s)
    conn.connect()
    conn.sock.settimeout(read_s)
    _local.conns[key] = conn
    return conn, False


def _drop(scheme: str, netloc: str) -> None:
    conn = _local.conns.pop((scheme, netloc), None)
    if conn is not None:
        conn.close()


def _get(url: str, headers: dict, timeouts: tuple[float, float]) -> http.client.HTTPResponse:
    """GET with this thread's connection; a kept-alive connection the server has closed meanwhile
    is replaced once, at once (not a failure: servers close idle connections)."""
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username) + ":" + urllib.parse.unquote(parts.password or "")
        headers = {**headers, "Authorization": "Basic " + base64.b64encode(user.encode()).decode()}
    while True:
        conn, reused = _connection(parts.scheme, parts.netloc, timeouts)
        try:
            conn.request("GET", target, headers=headers)
            return conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            _drop(parts.scheme, parts.netloc)
            if not reused:
                raise
        except Exception:
            _drop(parts.scheme, parts.netloc)
            raise


def _whole(length: int | None, cap: int, read_chunk) -> bytes:
    if length is not None and length > cap:
        raise TooBig(length)
    body = bytearray()
    while chunk := read_chunk():
        body += chunk
        if len(body) > cap:
            raise TooBig(None)
    return bytes(body)


def get_range(url: str, start: int, end: int | None, cap: int, headers: dict | None = None,
              timeouts: tuple[float, float] = (10.0, 30.0)) -> bytes:
    """Bytes [start, end) of `url` over http.client (``end=None`` with a negative start: the last
    ``-start`` bytes). Raises WholeBody / TooBig when the server ignores the range."""
    scheme, netloc = urllib.parse.urlsplit(url)[:2]
    for _ in range(_MAX_REDIRECTS + 1):
        r = _get(url, {**(headers or {}), "Range": _range_header(start, end)}, timeouts)
        try:
            if r.status in (301, 302, 303, 307, 308) and r.getheader("Location"):
                r.read()
                url = urllib.parse.urljoin(url, r.getheader("Location"))
                continue
            if r.status == 404:
                r.read()
                raise FileNotFoundError(2, "not found", url)
            if r.status >= 400:
                r.read()
                raise HttpStatusError(r.status, url)
            if r.status == 206:
                _RANGE_SERVERS.add(server_of(url))
                return r.read()
            length = r.getheader("Content-Length")
            raise WholeBody(_whole(int(length) if length else None, cap, lambda: r.read(1 << 20)))
        except (TooBig, OSError, http.client.HTTPException):
            _drop(scheme, netloc)  # a body left unread would corrupt the next response
            raise
    raise OSError(f"{url}: more than {_MAX_REDIRECTS} redirects")


# ---------------------------------------------------------------------------------------------- aiohttp


async def _aiohttp_range(fs, url: str, start: int, end: int | None, cap: int) -> bytes:
    """One ranged GET through fsspec's aiohttp session (storage_options apply)."""
    session = await fs.set_session()
    kw = dict(fs.kwargs)
    kw["headers"] = {**kw.get("headers", {}), "Range": _range_header(start, end)}
    async with session.get(fs.encode_url(url), **kw) as r:
        if r.status == 404:
            raise FileNotFoundError(2, "not found", url)
        r.raise_for_status()  # aiohttp.ClientResponseError carries .status: 5xx / 429 are retried
        if r.status == 206:
            _RANGE_SERVERS.add(server_of(url))
            return await r.read()
        if r.content_length is not None and r.content_length > cap:
            raise TooBig(r.content_length)
        body = bytearray()
        while chunk := await r.content.read(1 << 20):
            body += chunk
            if len(body) > cap:
                raise TooBig(None)
        raise WholeBody(bytes(body))


def fetch(url: str, ranges: list[tuple[int, int | None]], cap: int, storage_options: dict | None,
          filesystem, timeouts: tuple[float, float]) -> list[bytes]:
    """The body of each range (lengths unchecked). `filesystem()` gives fsspec's HTTP filesystem
    (which applies the same `timeouts`, (connect, read) seconds, through aiohttp)."""
    if len(ranges) == 1 and direct(url, storage_options):
        return [get_range(url, *ranges[0], cap, (storage_options or {}).get("headers"), timeouts)]
    import fsspec.asyn

    fs = filesystem()
    # Until a server has shown that it honours Range, ask for one range first: concurrent requests
    # to a server that ignores it would each download the whole file.
    first = [] if honours_ranges(url) else [fsspec.asyn.sync(fs.loop, _aiohttp_range, fs, url, *ranges[0], cap)]

    async def fetch_all():
        return await asyncio.gather(*[_aiohttp_range(fs, url, a, b, cap) for a, b in ranges[len(first):]])

    return first + fsspec.asyn.sync(fs.loop, fetch_all)

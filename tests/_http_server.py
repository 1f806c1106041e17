"""A real HTTP server on 127.0.0.1 for tests and bench/remote_read.py: serves a directory, with or
without byte ranges, records every request and counts the body bytes it sends, and can inject
failures (HTTP 5xx / 429, connection reset, a server that stalls before answering or mid-body, a
short body) for the next requests of a path.

    server = HttpServer.start(root)            # byte ranges, like nginx, S3 or GCS
    server = HttpServer.start(root, ranges=False)   # ignores Range, like `python -m http.server`
    ...
    server.stop()

    python tests/_http_server.py ROOT     # the same server in a process of its own; prints its port
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops the SYNs of a client opening a few connections at
    # once (the loader's fetch threads), which then wait 1 s to retry: production servers use 511+.
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        # A client that closes its connection (a reader that stopped after a fault the test injected,
        # a worker shut down mid-read) is not a server error: no traceback in the test output.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int = 0
    start: int = 0            # first byte sent
    sent: int = 0             # body bytes sent


@dataclass
class HttpServer:
    """A running server: `url(name)` for a file under `root`, `fail_once(name, kind)` to inject."""

    root: Path
    port: int = 0
    ranges: bool = True
    failures: dict[str, list[str]] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)   # ends every stall
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, root: Path, *, ranges: bool = True) -> "HttpServer":
        state = cls(root=Path(root), ranges=ranges)
        httpd = _Server(("127.0.0.1", 0), _make_handler(state))
        httpd.daemon_threads = True
        state.port, state._httpd = httpd.server_address[1], httpd
        state._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        state._thread.start()
        return state

    def stop(self) -> None:
        self.released.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def url(self, name: str = "", *, userinfo: str = "", query: str = "") -> str:
        host = f"{userinfo}@127.0.0.1" if userinfo else "127.0.0.1"
        return f"http://{host}:{self.port}/{name}" + (f"?{query}" if query else "")

    def fail_once(self, name: str, kind: str = "503", times: int = 1) -> None:
        """Make the next `times` requests for /name fail: "503", "429", "500", "reset", "cut" (the
        next GET sends half its body, then closes the connection), "stall" (accept the request and
        never answer) or "stall_body" (send the headers and half the body, then nothing)."""
        with self.lock:
            self.failures.setdefault("/" + name, []).extend([kind] * times)

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        """(method, path, Range header) of every request so far."""
        with self.lock:
            return [(r.method, r.path, r.range) for r in self.log]

    def count(self, name: str, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.log if r.path == "/" + name and (method is None or r.method == method))

    def take_log(self) -> list[Request]:
        """The requests so far, and a fresh log."""
        with self.lock:
            log, self.log = self.log, []
        return log


def bytes_sent(log: list[Request], prefix: str = "/", suffix: str = "") -> int:
    return sum(r.sent for r in log if r.path.startswith(prefix) and r.path.endswith(suffix))


def _make_handler(server: HttpServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as two writes; with Nagle's algorithm and the client's delayed
        # ACK each response would stall ~40 ms on loopback, as no production server does.
        disable_nagle_algorithm = True

        def log_message(self, *args):  # keep test output quiet
            pass

        def _inject(self, path: str, record: Request) -> bool:
            with server.lock:
                pending = server.failures.get(path)
                kind = pending[0] if pending and (self.command == "GET" or pending[0] not in ("cut", "stall_body")) \
                    else None
                if kind is not None:
                    pending.pop(0)
            if kind is None:
                return False
            if kind in ("cut", "stall_body"):
                self.cut = kind
                return False
            if kind == "stall":
                server.released.wait()
                self.close_connection = True
                return True
            if kind == "reset":
                # RST instead of FIN: the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return True
            record.status = int(kind)
            self.send_response(int(kind))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def _empty(self, status: int, record: Request, **headers: str) -> None:
            record.status = status
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            self.cut = False
            path = self.path.split("?", 1)[0]
            record = Request(self.command, path, self.headers.get("Range"))
            with server.lock:
                server.log.append(record)
            if self._inject(path, record):
                return
            file = (server.root / path.lstrip("/")).resolve()
            if server.root.resolve() not in file.parents or not file.is_file():
                return self._empty(404, record)
            st = file.stat()
            size = st.st_size
            start, end, status = 0, size, 200
            rng = self.headers.get("Range") if server.ranges else None
            if rng and rng.startswith("bytes="):
                first, _, last = rng[len("bytes="):].partition("-")
                if first == "":
                    start = max(0, size - int(last))
                else:
                    start = int(first)
                    end = min(size, int(last) + 1) if last else size
                if start >= size:
                    return self._empty(416, record, Content_Range=f"bytes */{size}")
                status = 206
            record.status, record.start = status, start
            self.send_response(status)
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if body:
                with open(file, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start)
                if self.cut:  # half the body, then the connection drops (the client sees a short body)
                    data = data[:len(data) // 2]
                    self.close_connection = True
                try:
                    self.wfile.write(data)
                    if self.cut == "stall_body":
                        self.wfile.flush()
                        server.released.wait()
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client hung up (it asked for more than it wanted)
                with server.lock:
                    record.sent = end - start

        def do_GET(self):
            self._serve(body=True)

        def do_HEAD(self):
            self._serve(body=False)

    return Handler


if __name__ == "__main__":
    # python tests/_http_server.py ROOT [--no-ranges]: serve ROOT in a process of its own (so that
    # a benchmark's server threads do not share a GIL with the loader it measures); prints the port.
    import time

    server = HttpServer.start(Path(sys.argv[1]), ranges="--no-ranges" not in sys.argv)
    print(server.port, flush=True)
    while True:
        time.sleep(3600)

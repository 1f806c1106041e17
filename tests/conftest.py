"""Shared fixtures. `http_server` serves a directory on 127.0.0.1 with byte ranges and injectable
failures, so remote-read code paths (fsspec over HTTP, retries) are tested without a network."""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@dataclass
class HttpServer:
    """A running server: `url(name)` for a file under `root`, `fail_once(name, kind)` to inject."""

    root: Path
    port: int
    failures: dict[str, list[str]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, range)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, name: str = "", *, userinfo: str = "", query: str = "") -> str:
        host = f"{userinfo}@127.0.0.1" if userinfo else "127.0.0.1"
        return f"http://{host}:{self.port}/{name}" + (f"?{query}" if query else "")

    def fail_once(self, name: str, kind: str = "503", times: int = 1) -> None:
        """Make the next `times` requests for /name fail: "503", "429", "500" or "reset"."""
        with self.lock:
            self.failures.setdefault("/" + name, []).extend([kind] * times)

    def count(self, name: str, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if p == "/" + name and (method is None or m == method))


def _make_handler(server: HttpServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _inject(self, path: str) -> bool:
            with server.lock:
                pending = server.failures.get(path)
                kind = pending.pop(0) if pending else None
            if kind is None:
                return False
            if kind == "reset":
                # RST instead of FIN: the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return True
            self.send_response(int(kind))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            with server.lock:
                server.requests.append((self.command, path, self.headers.get("Range")))
            if self._inject(path):
                return
            file = (server.root / path.lstrip("/")).resolve()
            if server.root.resolve() not in file.parents or not file.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = file.read_bytes()
            start, end, status = 0, len(data), 200
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                first, _, last = rng[len("bytes="):].partition("-")
                if first == "":
                    start = max(0, len(data) - int(last))
                else:
                    start = int(first)
                    end = min(len(data), int(last) + 1) if last else len(data)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("ETag", f'"{os.stat(file).st_mtime_ns:x}-{len(data):x}"')
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(data[start:end])

        def do_GET(self):
            self._serve(body=True)

        def do_HEAD(self):
            self._serve(body=False)

    return Handler


@pytest.fixture
def http_server(tmp_path):
    """Serve `tmp_path / "www"` on 127.0.0.1 (random port) for the duration of one test."""
    root = tmp_path / "www"
    root.mkdir()
    state = HttpServer(root=root, port=0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

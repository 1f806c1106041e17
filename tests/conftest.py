"""Shared fixtures. `http_server` serves a directory on 127.0.0.1 with byte ranges and injectable
failures, so remote-read code paths (fsspec over HTTP, retries) are tested without a network;
`http_server_no_ranges` is the same server ignoring Range headers (tests/_http_server.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _http_server import HttpServer  # noqa: E402


@pytest.fixture
def http_server(tmp_path):
    """Serve `tmp_path / "www"` on 127.0.0.1 (random port) for the duration of one test."""
    root = tmp_path / "www"
    root.mkdir()
    server = HttpServer.start(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http_server_no_ranges(tmp_path):
    """Like `http_server`, but it ignores Range headers and always sends the whole file with 200,
    as Python's http.server and many simple servers do."""
    root = tmp_path / "www-plain"
    root.mkdir()
    server = HttpServer.start(root, ranges=False)
    try:
        yield server
    finally:
        server.stop()

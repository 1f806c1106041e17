"""Network reads end: a server that never answers, stalls mid-body, answers 500 or sends a short
body fails within the configured timeouts and retries, with a line that says what happened.

A failure means a stalled server hangs training for many minutes with no error, or an error that
calls a timeout or an HTTP 500 "not found".
"""

import time

import pytest

from distlstm.data.shards.manifest import Manifest
from distlstm.data.sources import RetriesExhaustedError, network_options, open_stream, read_bytes, read_ranges

FAST = network_options({}, connect_timeout_s=1.0, read_timeout_s=0.5)


@pytest.fixture
def served(http_server):
    (http_server.root / "a.bin").write_bytes(bytes(range(256)) * 64)
    return http_server


@pytest.mark.parametrize("reader", ["range", "whole", "stream"])
@pytest.mark.parametrize("kind", ["stall", "stall_body"])
def test_a_stalled_server_times_out_naming_url_attempts_and_timeout(served, reader, kind):
    served.fail_once("a.bin", kind, times=10)
    url = served.url("a.bin", userinfo="u:secret")
    start = time.monotonic()
    with pytest.raises(RetriesExhaustedError) as info:
        if reader == "range":
            read_ranges(url, [(0, 100)], storage_options=FAST, retries=1, backoff_s=0.01)
        elif reader == "whole":
            read_bytes(url, storage_options=FAST, retries=1, backoff_s=0.01)
        else:
            with open_stream(url, storage_options=FAST, retries=1, backoff_s=0.01) as f:
                f.read()
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "after 2 attempts (data.retries=1)" in message and "timed out" in message, message
    assert "secret" not in message and "127.0.0.1" in message
    assert elapsed < 2 * (1.0 + 0.5) * 2 + 2, elapsed   # two attempts, each bounded by the timeouts


def test_http_500_says_500_not_not_found(served):
    served.fail_once("a.bin", "500", times=10)
    with pytest.raises(RetriesExhaustedError, match=r"after 3 attempts \(data.retries=2\); last error: HTTP 500"):
        read_ranges(served.url("a.bin"), [(0, 10)], storage_options=FAST, retries=2, backoff_s=0.01)


def test_a_short_body_is_an_error_not_short_data(served):
    served.fail_once("a.bin", "cut", times=10)
    with pytest.raises(OSError, match="a.bin"):
        read_ranges(served.url("a.bin"), [(0, 4000)], storage_options=FAST, retries=1, backoff_s=0.01)


def test_a_manifest_behind_a_failing_server_is_an_error_not_a_missing_manifest(served):
    (served.root / "ds").mkdir()
    (served.root / "ds" / "manifest.json").write_text('{"shards": [{"path": "a.parquet"}]}')
    served.fail_once("ds/manifest.json", "500", times=10)
    with pytest.raises(RetriesExhaustedError, match="HTTP 500"):
        Manifest.find(served.url("ds"), storage_options=FAST, retries=1)

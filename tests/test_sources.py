"""Path expansion, fsspec reads with retries, and credential redaction.

A failure here means a dataset spec resolves to the wrong shards (or in a different order on
different ranks), a flaky object store kills a training run that a retry would have saved, a
missing shard hangs in retries instead of failing fast, or a credential leaks into a log line.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from distlstm.data.errors import BadSampleError
from distlstm.data.shards.paths import expand_paths
from distlstm.data.sources import file_info, is_transient, open_file, read_bytes, redact, redact_options


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


# ---------------------------------------------------------------------------------------------- expansion


def test_glob_brace_and_comma_lists(tmp_path):
    files = [_touch(tmp_path / f"train-{i:05d}.parquet") for i in range(4)]
    _touch(tmp_path / "train-00000.tar.idx.json")  # a sidecar never counts as a shard
    assert expand_paths(str(tmp_path / "train-*")) == files
    assert expand_paths(str(tmp_path / "train-{00001..00002}.parquet")) == files[1:3]
    # Commas split the list, but not inside braces; the order given is kept.
    spec = f"{files[3]},{tmp_path}/train-{{00000,00002}}.parquet"
    assert expand_paths(spec) == [files[3], files[0], files[2]]
    assert expand_paths([files[2], files[1]]) == [files[2], files[1]]


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    _touch(tmp_path / "d" / "a.parquet")
    monkeypatch.chdir(tmp_path)
    assert expand_paths("d/a.parquet") == [str(tmp_path / "d" / "a.parquet")]


def test_directory_with_manifest_uses_manifest_order(tmp_path):
    names = ["train-00002.parquet", "train-00000.parquet", "train-00001.parquet"]
    for name in names:
        _touch(tmp_path / name)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": [{"path": n} for n in names]}))
    expected = [str(tmp_path / n) for n in names]
    assert expand_paths(str(tmp_path)) == expected
    assert expand_paths(str(tmp_path / "manifest.json")) == expected


def test_directory_without_manifest_lists_sorted_shards(tmp_path):
    files = sorted([_touch(tmp_path / "b.tar"), _touch(tmp_path / "a.parquet")])
    _touch(tmp_path / "notes.txt")
    assert expand_paths(str(tmp_path)) == files


def test_no_match_names_the_pattern(tmp_path):
    with pytest.raises(ValueError, match=r"train-\*\.parquet.*matched no files"):
        expand_paths(str(tmp_path / "train-*.parquet"))
    with pytest.raises(ValueError, match="no such file"):
        expand_paths(str(tmp_path / "missing.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json and no shard files"):
        expand_paths(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="empty dataset path"):
        expand_paths(" , ")


def test_bad_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a distlstm manifest"):
        expand_paths(str(tmp_path))


def test_object_store_glob_through_fsspec(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/bucket/ds/train-{i:05d}.parquet", b"x")
    fs.pipe("/bucket/ds/manifest.json", json.dumps({"shards": [{"path": "train-00001.parquet"}]}).encode())
    try:
        assert expand_paths("memory://bucket/ds/train-*.parquet") == [
            f"memory:///bucket/ds/train-{i:05d}.parquet" for i in range(3)]
        assert expand_paths("memory://bucket/ds/") == ["memory://bucket/ds/train-00001.parquet"]
        with pytest.raises(ValueError, match="matched no objects"):
            expand_paths("memory://bucket/ds/valid-*.parquet")
    finally:
        fs.rm("/bucket", recursive=True)


def test_http_urls_are_taken_literally_after_brace_expansion():
    assert expand_paths("https://example.invalid/d/train-{0..2}.tar") == [
        f"https://example.invalid/d/train-{i}.tar" for i in range(3)]


# ---------------------------------------------------------------------------------------------- redaction


def test_redact_urls_and_text():
    assert redact("https://user:secret@host:8080/x?token=abc&part=2") == "https://***@host:8080/x?token=***&part=2"
    signed = "s3://b/k.tar?X-Amz-Credential=AK%2F1&X-Amz-Signature=f00d&X-Amz-Expires=60"
    assert redact(signed) == "s3://b/k.tar?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"
    text = "failed: GET https://a:b@h/p?sig=zz&password=pw (503)"
    out = redact(text)
    assert "a:b" not in out and "zz" not in out and "pw (" not in out and out.endswith("(503)")
    assert redact("/local/path/train-00001.parquet") == "/local/path/train-00001.parquet"


def test_redact_options_masks_secrets_recursively():
    opts = {"key": "AKIA", "secret": "s3cr3t", "anon": False, "token": None,
            "client_kwargs": {"endpoint_url": "https://u:p@minio:9000", "region_name": "x"},
            "headers": {"Authorization": "Bearer t"}}
    out = redact_options(opts)
    assert out == {"key": "***", "secret": "***", "anon": False, "token": None,
                   "client_kwargs": {"endpoint_url": "https://***@minio:9000", "region_name": "x"},
                   "headers": {"Authorization": "***"}}
    assert opts["key"] == "AKIA"  # input untouched
    assert redact_options(None) is None


def test_bad_sample_error_message_and_pickle():
    import pickle

    err = BadSampleError("https://u:p@h/a.tar", "sample 007", "NaN in features", fix="clean the data")
    assert str(err) == "shard https://***@h/a.tar: sample 007: NaN in features; fix: clean the data"
    again = pickle.loads(pickle.dumps(err))
    assert (again.shard, again.where, again.problem, str(again)) == (err.shard, err.where, err.problem, str(err))
    assert str(BadSampleError("a message only")) == "a message only"  # how DataLoader re-raises it


# ---------------------------------------------------------------------------------------------- reading


def test_local_open_and_ranges(tmp_path):
    path = _touch(tmp_path / "f.bin", bytes(range(100)))
    assert read_bytes(path, 10, 20) == bytes(range(10, 20))
    assert read_bytes(path, -5) == bytes(range(95, 100))
    with open_file(path) as f:
        f.seek(50)
        assert f.read(3) == bytes([50, 51, 52])
    info = file_info(path)
    assert info["size"] == 100 and info["mtime_or_etag"]
    with pytest.raises(FileNotFoundError, match="missing.bin: not found"):
        read_bytes(str(tmp_path / "missing.bin"))


def test_http_range_reads_and_info(http_server):
    data = os.urandom(300_000)
    (http_server.root / "blob.bin").write_bytes(data)
    url = http_server.url("blob.bin")
    assert read_bytes(url) == data
    assert read_bytes(url, 1000, 1010) == data[1000:1010]
    assert any(r == "bytes=1000-1009" for _, _, r in http_server.requests)
    with open_file(url) as f:
        f.seek(250_000)
        assert f.read(100) == data[250_000:250_100]
    info = file_info(url)
    assert info["size"] == len(data) and info["mtime_or_etag"].startswith("ETag=")


@pytest.mark.parametrize("kind", ["503", "429", "reset"])
def test_http_transient_error_is_absorbed_by_retry(http_server, kind, caplog):
    (http_server.root / "a.bin").write_bytes(b"hello world")
    http_server.fail_once("a.bin", kind)
    with caplog.at_level(logging.WARNING, logger="distlstm.data.sources"):
        assert read_bytes(http_server.url("a.bin"), 0, 5, backoff_s=0.01) == b"hello"
    assert http_server.count("a.bin") == 2
    if kind != "reset":  # aiohttp itself may re-send an idempotent request after a reset
        assert "retrying" in caplog.text


def test_http_mid_stream_failure_is_retried_by_the_reader(http_server):
    data = os.urandom(40_000)
    (http_server.root / "s.bin").write_bytes(data)
    # Small blocks so that the second read needs a new range request, which fails once.
    with open_file(http_server.url("s.bin"), storage_options={"block_size": 1000}, backoff_s=0.01) as f:
        assert f.read(10) == data[:10]
        http_server.fail_once("s.bin", "503")
        before = http_server.count("s.bin")
        f.seek(len(data) - 10)
        assert f.read(10) == data[-10:]
        assert http_server.count("s.bin") == before + 2


def test_http_404_fails_fast_naming_the_url(http_server):
    url = http_server.url("nope.tar")
    with pytest.raises(FileNotFoundError, match=r"nope\.tar: not found"):
        read_bytes(url, backoff_s=5)  # would take > 5 s if it were retried
    assert http_server.count("nope.tar") == 1
    with pytest.raises(FileNotFoundError, match=r"nope\.tar"):
        with open_file(url, backoff_s=5):
            pass


def test_persistent_errors_give_up_with_redacted_url(http_server):
    (http_server.root / "x").write_bytes(b"data")
    http_server.fail_once("x", "503", times=10)
    url = http_server.url("x", userinfo="user:secret", query="token=abc")
    with pytest.raises(OSError) as info:
        read_bytes(url, retries=2, backoff_s=0.01)
    message = str(info.value)
    assert "after 3 attempts" in message and "503" in message
    assert f"http://***@127.0.0.1:{http_server.port}/x?token=***" in message
    assert "secret" not in message and "abc" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no unredacted chained error
    assert http_server.count("x") == 3


def test_transient_classification():
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(ValueError("x"))
    wrapped = FileNotFoundError("x")
    wrapped.__cause__ = type("ClientResponseError", (Exception,), {"status": 503})()
    assert is_transient(wrapped)  # fsspec re-raises a failed HEAD+GET as FileNotFoundError
    wrapped.__cause__ = type("ClientResponseError", (Exception,), {"status": 404})()
    assert not is_transient(wrapped)

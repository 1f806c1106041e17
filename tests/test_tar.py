"""WebDataset-style tar shards: decoding, the lengths index, and bad data.

A failure here means tar datasets train on wrong tokens or labels, the planner's per-sample lengths
disagree with what the reader yields (wrong batches, broken resume), or a truncated/corrupt shard or
bad sample is silently dropped or hangs instead of being reported with the shard and key named.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from webdataset import TarWriter

from distlstm.data.prep import prep
from distlstm.data.errors import BadSampleError
from distlstm.data.shards.tar import read_tar_chunk, sidecar_url, tar_lengths


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def _write_tar(path, samples) -> str:
    with TarWriter(str(path), encoder=False, mtime=0.0) as w:
        for sample in samples:
            w.write(sample)
    return str(path)


def _token_samples(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"__key__": f"{i:04d}", "tokens.npy": _npy(rng.integers(1, 50, size=3 + i).astype(np.int32)),
             "cls": str(i % 3).encode()} for i in range(n)]


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(1)
    rows = [{"ids": rng.integers(1, 100, size=int(rng.integers(1, 30))).tolist(), "y": int(rng.integers(0, 4))}
            for _ in range(200)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_round_trip_through_prep(tmp_path, records):
    path, rows = records
    prep.main(["--jsonl", str(path), "--tokens-field", "ids", "--label-field", "y", "--task", "classify",
               "--format", "tar", "--valid-fraction", "0", "--shard-size-mb", "0.004", "--out", str(tmp_path / "o"),
               "--quiet"])
    manifest = json.loads((tmp_path / "o/train/manifest.json").read_text())
    assert manifest["format"] == "tar" and len(manifest["shards"]) > 1  # the size target splits shards
    got_tokens, got_labels = [], []
    for shard in manifest["shards"]:
        url = str(tmp_path / "o/train" / shard["path"])
        chunk = read_tar_chunk(url, task="classify")
        assert chunk.values.dtype == np.int64 and chunk.offsets.dtype == np.int64 and not chunk.bad
        assert len(chunk) == shard["num_samples"] == len(chunk.keys)
        assert np.array_equal(tar_lengths(url), chunk.lengths)
        got_tokens += [chunk.values[a:b].tolist() for a, b in zip(chunk.offsets[:-1], chunk.offsets[1:])]
        got_labels += chunk.labels.tolist()
    assert got_tokens == [r["ids"] for r in rows] and got_labels == [r["y"] for r in rows]


def test_features_tags_and_regression_targets(tmp_path):
    rng = np.random.default_rng(2)
    feats = [rng.normal(size=(n, 3)).astype(np.float32) for n in (2, 5, 1)]
    tags = [rng.integers(0, 4, size=len(f)) for f in feats]
    tagged = _write_tar(tmp_path / "t.tar", [{"__key__": f"k{i}", "features.npy": _npy(f), "tags.npy": _npy(t)}
                                              for i, (f, t) in enumerate(zip(feats, tags))])
    chunk = read_tar_chunk(tagged)
    assert chunk.values.shape == (8, 3) and chunk.values.dtype == np.float32
    assert np.array_equal(chunk.values, np.concatenate(feats))
    assert np.array_equal(chunk.labels, np.concatenate(tags))  # per-step labels align with values rows
    regress = _write_tar(tmp_path / "r.tar", [{"__key__": f"k{i}", "tokens.npy": _npy([1, 2]),
                                               "target.npy": _npy(np.float64(i / 2))} for i in range(3)])
    chunk = read_tar_chunk(regress, task="regress")
    assert chunk.labels.dtype == np.float32 and chunk.labels.tolist() == [0.0, 0.5, 1.0]
    lm = read_tar_chunk(regress, task="lm")
    assert lm.labels is None


def test_lengths_sidecar_and_scan_agree(tmp_path):
    shard = _write_tar(tmp_path / "s.tar", _token_samples(20))
    scanned = tar_lengths(shard)
    assert scanned.tolist() == [3 + i for i in range(20)]
    with open(sidecar_url(shard), "w") as f:
        json.dump({"version": 1, "keys": [], "lengths": [7] * 20}, f)
    assert tar_lengths(shard).tolist() == [7] * 20  # the sidecar wins: no scan
    with open(sidecar_url(shard), "w") as f:
        f.write("{broken")
    assert tar_lengths(shard).tolist() == scanned.tolist()  # unreadable sidecar: scan


def test_sidecar_url_keeps_query_last():
    assert sidecar_url("/d/a.tar") == "/d/a.tar.idx.json"
    assert sidecar_url("https://h/d/a.tar?sig=1") == "https://h/d/a.tar.idx.json?sig=1"


def _member_ends(path):
    import tarfile

    with tarfile.open(path) as tf:
        return [(m.name, m.offset_data + (m.size + 511) // 512 * 512) for m in tf.getmembers()]


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary", "no_end_marker"])
def test_truncated_tar_names_shard_and_last_good_member(tmp_path, cut):
    good = _write_tar(tmp_path / "good.tar", _token_samples(6))
    ends = _member_ends(good)
    data = open(good, "rb").read()
    cut_at = {"mid_member": ends[4][1] + 512 + 10,  # 10 bytes into member 5's data
              "member_boundary": ends[5][1], "no_end_marker": ends[-1][1]}[cut]
    bad = tmp_path / "train-00003.tar"
    bad.write_bytes(data[:cut_at])
    for read in (read_tar_chunk, tar_lengths):
        with pytest.raises(BadSampleError, match=r"train-00003\.tar") as info:
            read(str(bad))
        assert "truncated" in str(info.value) and info.value.shard.endswith("train-00003.tar")
    with pytest.raises(BadSampleError, match=rf"after member {ends[4][0] if cut == 'mid_member' else '.*'}"):
        read_tar_chunk(str(bad))


def test_garbage_in_the_middle_is_corrupt_not_short(tmp_path):
    good = _write_tar(tmp_path / "good.tar", _token_samples(6))
    ends = _member_ends(good)
    data = bytearray(open(good, "rb").read())
    data[ends[3][1]: ends[3][1] + 512] = os.urandom(512)  # destroy the header after member 4
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(BadSampleError, match=rf"bad\.tar: after member {ends[3][0]}: truncated or corrupt"):
        read_tar_chunk(str(bad))
    (tmp_path / "empty.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BadSampleError, match="empty.tar: at the start"):
        read_tar_chunk(str(tmp_path / "empty.tar"))


def test_bad_samples_are_marked_or_raised(tmp_path):
    samples = _token_samples(5)
    del samples[1]["cls"]  # missing label
    samples[2]["tokens.npy"] = b"\x93NUMPY garbage"  # does not decode
    del samples[3]["tokens.npy"]  # missing sequence
    shard = _write_tar(tmp_path / "s.tar", samples)
    chunk = read_tar_chunk(shard)
    assert set(chunk.bad) == {1, 2, 3}
    assert "missing label .cls" in chunk.bad[1] and "does not decode" in chunk.bad[2]
    assert "no sequence member" in chunk.bad[3]
    assert len(chunk) == 5 and chunk.lengths[3] == 0 and chunk.lengths[1] == 4  # slots kept, ids stay aligned
    with pytest.raises(BadSampleError, match=r"s\.tar: sample 0001: missing label \.cls"):
        read_tar_chunk(shard, on_bad="raise")


def test_nan_features_and_ragged_widths(tmp_path):
    f = np.ones((4, 2), np.float32)
    nan = f.copy()
    nan[2, 1] = np.nan
    shard = _write_tar(tmp_path / "f.tar", [
        {"__key__": "a", "features.npy": _npy(f), "cls": b"1"},
        {"__key__": "b", "features.npy": _npy(nan), "cls": b"0"},
        {"__key__": "c", "features.npy": _npy(np.ones((3, 5), np.float32)), "cls": b"0"}])
    chunk = read_tar_chunk(shard)
    assert "NaN" in chunk.bad[1] and "5 features per step" in chunk.bad[2] and 0 not in chunk.bad
    with pytest.raises(BadSampleError, match="sample b: NaN or inf in features"):
        read_tar_chunk(shard, on_bad="raise")


def test_expected_lengths_catch_a_changed_shard(tmp_path):
    shard = _write_tar(tmp_path / "s.tar", _token_samples(4))
    read_tar_chunk(shard, expected_lengths=[3, 4, 5, 6])
    with pytest.raises(BadSampleError, match="4 samples: the index says 3"):
        read_tar_chunk(shard, expected_lengths=[3, 4, 5])
    with pytest.raises(BadSampleError, match="sample 0002: length 5, the index says 9"):
        read_tar_chunk(shard, expected_lengths=[3, 4, 9, 6])


def test_streaming_over_http_with_a_transient_error(tmp_path, http_server, records):
    path, rows = records
    out = tmp_path / "o"
    prep.main(["--jsonl", str(path), "--tokens-field", "ids", "--label-field", "y", "--task", "classify",
               "--format", "tar", "--valid-fraction", "0", "--out", str(out), "--quiet"])
    shutil.copytree(out / "train", http_server.root / "train")
    url = http_server.url("train/train-00000.tar")
    local = read_tar_chunk(str(out / "train/train-00000.tar"))
    http_server.fail_once("train/train-00000.tar", "503")
    remote = read_tar_chunk(url, task="classify")
    assert np.array_equal(remote.values, local.values) and np.array_equal(remote.labels, local.labels)
    assert remote.keys == local.keys
    assert tar_lengths(url).tolist() == [len(r["ids"]) for r in rows]
    assert http_server.count("train/train-00000.tar.idx.json") >= 1  # lengths came from the sidecar
    with pytest.raises(FileNotFoundError, match="train-00099.tar"):
        read_tar_chunk(http_server.url("train/train-00099.tar"))

"""A dataset cannot reach outside itself: every path a manifest names (shards, vocab, labels) must
resolve inside the dataset's own folder, with its scheme and host.

A failure means a manifest someone handed you makes a run read a local file (`../../x`, an absolute
path, a local path named by a remote manifest) and copy it into the run folder, which is synced to
MLflow / W&B and shared storage.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distlstm.data.prep.synthetic import ensure_synthetic
from distlstm.data.shards.index import open_index
from distlstm.data.shards.manifest import Manifest
from distlstm.data.shards.paths import expand_paths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=300, num_valid=100)


def _copy_split(dataset: Path, dest: Path, edit) -> Path:
    shutil.copytree(dataset / "train", dest)
    raw = json.loads((dest / "manifest.json").read_text())
    edit(raw)
    (dest / "manifest.json").write_text(json.dumps(raw))
    return dest


def test_relative_escape_is_refused_naming_the_manifest(tmp_path, dataset):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(next((dataset / "train").glob("*.parquet")), outside / "x.parquet")
    split = _copy_split(dataset, tmp_path / "ds" / "train", lambda m: m["shards"].__setitem__(
        0, {"path": "../../outside/x.parquet"}))
    for call in (lambda: expand_paths(str(split)), lambda: open_index(str(split))):
        with pytest.raises(ValueError, match=r"manifest.json: shard path '\.\./\.\./outside/x\.parquet' resolves "
                                             r"outside the dataset"):
            call()


def test_absolute_path_outside_is_refused_inside_is_kept(tmp_path, dataset):
    split = _copy_split(dataset, tmp_path / "ds" / "train", lambda m: None)
    inside = str(next(split.glob("*.parquet")))
    raw = json.loads((split / "manifest.json").read_text())
    raw["shards"] = [{"path": inside}]
    (split / "manifest.json").write_text(json.dumps(raw))
    assert expand_paths(str(split)) == [inside]
    raw["shards"] = [{"path": "/etc/passwd"}]
    (split / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="outside the dataset"):
        expand_paths(str(split))


def test_remote_manifest_cannot_name_local_files_or_other_servers(http_server, dataset):
    split = _copy_split(dataset, http_server.root / "ds" / "train", lambda m: None)
    local = str(next(split.glob("*.parquet")))
    url = http_server.url("ds/train/manifest.json")
    for bad in (local, "file://" + local, "http://127.0.0.2:1/x.parquet", "../../../x.parquet"):
        raw = json.loads((split / "manifest.json").read_text())
        raw["shards"] = [{"path": bad}]
        (split / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(ValueError, match="outside the dataset"):
            Manifest.read(url)
    raw["shards"] = [{"path": next(split.glob("*.parquet")).name}]
    raw["vocab"] = local
    (split / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="file path .* resolves outside the dataset"):
        Manifest.read(url)
    raw["vocab"] = "../vocab.json"  # prep's layout: beside the split folders
    (split / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.read(url).resource(raw["vocab"]) == http_server.url("ds/vocab.json")


def test_train_on_a_remote_manifest_naming_a_local_vocab_copies_nothing(tmp_path, http_server, dataset):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    for split in ("train", "valid"):
        _copy_split(dataset, http_server.root / "ds" / split, lambda m: m.__setitem__("vocab", str(secret))) \
            if split == "train" else shutil.copytree(dataset / split, http_server.root / "ds" / split)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "distlstm.train", "--data.train", http_server.url("ds/train/"),
                           "--data.valid", http_server.url("ds/valid/"), "--train.max_steps", "1",
                           "--train.run_dir", str(tmp_path / "run"), "--data.cache_dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "resolves outside the dataset" in proc.stderr, proc.stderr
    copied = [p for p in tmp_path.rglob("*") if p.is_file() and p != secret and "do not copy me" in
              p.read_text(errors="ignore")]
    assert copied == []

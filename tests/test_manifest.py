"""`Manifest`: the one reader and writer of a split's manifest.json.

A failure means prep, the synthetic dataset, the index and path expansion disagree about the file:
a dataset named by its manifest.json loses its vocabulary and class counts (the model cannot be
built without flags), a rewrite drops keys, or a malformed manifest ends in a traceback.
"""

import json

import pytest

from distlstm.run.build import resolve_config
from distlstm.config import load_config
from distlstm.data.shards.index import open_index
from distlstm.data.shards.manifest import Manifest, ShardInfo
from distlstm.data.shards.paths import expand_paths
from distlstm.data.prep.synthetic import VOCAB_SIZE, ensure_synthetic


def test_round_trip_keeps_known_and_unknown_keys(tmp_path):
    m = Manifest(shards=[ShardInfo(path="a.parquet", num_samples=3, bytes=10, sha256="ab")], task="classify",
                 vocab_size=7, num_classes=2, extra={"made_by": "someone else"})
    m.write(str(tmp_path))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["made_by"] == "someone else" and raw["shards"][0] == {"path": "a.parquet", "num_samples": 3,
                                                                      "bytes": 10, "sha256": "ab"}
    back = Manifest.read(str(tmp_path / "manifest.json"))
    assert back == m and back.root == str(tmp_path)
    assert back.shard_urls() == [f"{tmp_path}/a.parquet"]


def test_folder_and_its_manifest_file_index_alike(tmp_path):
    """--data.train DIR/manifest.json keeps the manifest's metadata (it used to lose it)."""
    root = ensure_synthetic(tmp_path, num_train=300, num_valid=50)
    by_folder = open_index(str(root / "train"), cache_dir=tmp_path)
    by_file = open_index(str(root / "train" / "manifest.json"), cache_dir=tmp_path)
    assert by_file.manifest is not None and by_file.manifest.vocab_size == VOCAB_SIZE
    assert by_file.shards == by_folder.shards and by_file.fingerprint() == by_folder.fingerprint()
    cfg = resolve_config(load_config(None, []), by_file)
    assert (cfg.model.vocab_size, cfg.model.num_classes, cfg.model.input) == (VOCAB_SIZE, 4, "tokens")


def test_minimal_hand_written_manifest_lists_shards(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"path": "b.parquet"}, {"path": "a.parquet"}]}))
    for name in ("a.parquet", "b.parquet"):
        (tmp_path / name).write_bytes(b"")
    assert expand_paths(str(tmp_path)) == [str(tmp_path / "b.parquet"), str(tmp_path / "a.parquet")]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"shards": [{"name": "x"}]}), json.dumps([1, 2])])
def test_malformed_manifest_names_the_file(tmp_path, content):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ValueError, match=r"manifest\.json: not a distlstm manifest"):
        Manifest.read(str(tmp_path / "manifest.json"))

"""The embedded default dataset: "which marker came last?".

Each sequence (length 16..160, log-normal) is noise tokens with two markers of different types
placed at random positions; the label is the type of the *later* marker. The set of tokens is the
same whichever marker comes last, so a bag-of-tokens model is stuck at 50% (a coin flip between the
two markers it sees); an LSTM has to notice order and carry the marker across the noise after it. Written once,
deterministically, as Parquet shards with a manifest, so it goes through the same loader as real data.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distlstm.data.shards.manifest import Manifest, ShardInfo

NUM_MARKERS = 4
NOISE_TOKENS = 24            # ids 1..24; markers are 25..28; 0 is never used
VOCAB_SIZE = 1 + NOISE_TOKENS + NUM_MARKERS
MIN_LEN, MAX_LEN = 16, 160
VERSION = 2


def _samples(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(48), 0.5, n)), MIN_LEN, MAX_LEN).astype(np.int64)
    seqs, labels = [], np.empty(n, np.int64)
    for i, length in enumerate(lengths):
        seq = rng.integers(1, NOISE_TOKENS + 1, length)
        first, second = rng.choice(NUM_MARKERS, 2, replace=False)
        p, q = sorted(rng.choice(length, 2, replace=False))
        seq[p], seq[q] = 1 + NOISE_TOKENS + first, 1 + NOISE_TOKENS + second
        seqs.append(seq.astype(np.int32))
        labels[i] = second
    return seqs, labels


def _write_split(folder: Path, name: str, seqs: list[np.ndarray], labels: np.ndarray, shard_rows: int) -> None:
    folder.mkdir(parents=True)
    shards = []
    for s, lo in enumerate(range(0, len(seqs), shard_rows)):
        path = folder / f"{name}-{s:05d}.parquet"
        table = pa.table({"tokens": pa.array(seqs[lo:lo + shard_rows], type=pa.list_(pa.int32())),
                          "label": pa.array(labels[lo:lo + shard_rows], type=pa.int64())})
        pq.write_table(table, path, row_group_size=512)
        data = path.read_bytes()
        shards.append(ShardInfo(path=path.name, num_samples=table.num_rows,
                                num_tokens=int(sum(len(x) for x in seqs[lo:lo + shard_rows])),
                                bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    Manifest(format="parquet", task="classify", sequence_column="tokens", label_column="label",
             vocab_size=VOCAB_SIZE, num_classes=NUM_MARKERS, num_samples=len(seqs),
             num_tokens=sum(s.num_tokens for s in shards), shards=shards).write(str(folder))


def ensure_synthetic(cache_dir: Path, *, num_train: int, num_valid: int = 2000, seed: int = 7) -> Path:
    """Create the dataset under `cache_dir` unless it is already there; returns its folder
    (with `train/` and `valid/`). Safe when several ranks call it at once: written to a temporary
    folder and renamed into place."""
    root = Path(cache_dir) / f"synthetic-v{VERSION}-{num_train}-{num_valid}-{seed}"
    if (root / "valid" / "manifest.json").is_file():
        return root
    tmp = root.with_name(f"{root.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    shutil.rmtree(tmp, ignore_errors=True)
    seqs, labels = _samples(num_train + num_valid, seed)
    _write_split(tmp / "train", "train", seqs[:num_train], labels[:num_train], shard_rows=2048)
    _write_split(tmp / "valid", "valid", seqs[num_train:], labels[num_train:], shard_rows=2048)
    try:
        os.rename(tmp, root)
    except OSError:  # another rank won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return root

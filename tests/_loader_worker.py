"""Helpers for the loader tests, and a worker run as a real rank process by tests/test_loader.py.

    python tests/_loader_worker.py resume DATA CACHE RANK WORLD WORKERS N K OUT
        rank RANK of WORLD: an uninterrupted run of N+K batches, then N batches, state_dict, a fresh
        loader, load_state_dict, K batches; both written as batch digests to OUT/rank<RANK>.json.
        The loader needs no process group (agree=None): the plan is a pure function of the index.
"""

from __future__ import annotations

import hashlib
import json
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distlstm.config import DataConfig  # noqa: E402
from distlstm.data.shards.index import open_index  # noqa: E402
from distlstm.data.loader.batch_loader import build_loader  # noqa: E402

NUM_CLASSES = 4
VOCAB = 100


def sample_data(n: int, seed: int = 0, max_len: int = 80) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(20), 0.7, n)), 1, max_len).astype(np.int64)
    seqs = [rng.integers(1, VOCAB, size=int(k)).astype(np.int32) for k in lengths]
    return seqs, rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)


def write_parquet(folder: Path, n: int = 600, *, rows_per_group: int = 50, shards: int = 3, seed: int = 0,
                  seqs=None, labels=None) -> Path:
    """`shards` Parquet files of ragged row groups (`tokens` list<int32>, `label` int64)."""
    if seqs is None:
        seqs, labels = sample_data(n, seed)
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(seqs) // shards)
    for s in range(shards):
        lo, hi = s * per_shard, min(len(seqs), (s + 1) * per_shard)
        table = pa.table({"tokens": pa.array([x.tolist() for x in seqs[lo:hi]], type=pa.list_(pa.int32())),
                          "label": pa.array(labels[lo:hi], type=pa.int64())})
        pq.write_table(table, folder / f"train-{s:05d}.parquet", row_group_size=rows_per_group)
    return folder


def data_cfg(**kw) -> DataConfig:
    base = dict(max_tokens=256, min_batch_size=2, max_length=64, window_chunks=3, num_workers=0,
                prefetch_factor=2, seed=5)
    base.update(kw)
    return DataConfig(**base)


def make_loader(spec, cache, *, rank: int = 0, world: int = 1, workers: int = 0, max_epochs: int = 0,
                run_dir=None, task: str = "classify", index=None, **cfg):
    index = index if index is not None else open_index(str(spec), cache_dir=cache)
    return build_loader(index, data_cfg(**cfg), task=task, dp_rank=rank, dp_world_size=world, vocab_size=VOCAB,
                        num_classes=NUM_CLASSES, pin_memory=False, run_dir=run_dir, max_epochs=max_epochs,
                        num_workers=workers)


def digest(batch) -> dict:
    """Everything a batch carries, compact enough to ship between processes."""
    h = hashlib.sha256()
    for t in (batch.inputs, batch.lengths, batch.targets):
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.contiguous().numpy().tobytes())
    return {"ids": batch.sample_ids.tolist(), "tensors": h.hexdigest(), "weight": float(batch.weight),
            "epoch": int(batch.epoch), "consumed": int(batch.consumed), "skipped": int(batch.num_skipped)}


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    out = [digest(b) for b in islice(it, n)]
    it.close()  # shut the DataLoader workers down now, not at garbage collection
    return out


def _resume(data: str, cache: str, rank: str, world: str, workers: str, n: str, k: str, out: str) -> None:
    kw = dict(rank=int(rank), world=int(world), workers=int(workers), max_epochs=3)
    n, k = int(n), int(k)
    reference = take(make_loader(data, cache, **kw), n + k)
    first = make_loader(data, cache, **kw)
    before = take(first, n)
    state = first.state_dict()
    fresh = make_loader(data, cache, **kw)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint would carry it
    after = take(fresh, k)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"reference": reference, "resumed": before + after,
                                                         "state": state}))


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        _resume(*sys.argv[2:])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")

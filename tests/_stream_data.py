"""Stream-layout test data (shared by the stream tests and their workers): documents cut into Parquet
rows of at most `piece` tokens, with the `doc_start` column the way `distlstm.prep` writes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def documents(num_docs: int, *, seed: int = 0, min_len: int = 1, max_len: int = 60, vocab: int = 0) -> list[np.ndarray]:
    """`num_docs` documents of random lengths. vocab=0: token = stream position (every token unique,
    so a target names the position it came from); else random ids in [1, vocab)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, size=num_docs)
    if not vocab:
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        return [np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, lens)]
    return [rng.integers(1, vocab, size=n).astype(np.int64) for n in lens]


def write_stream_parquet(path: Path, docs: list[np.ndarray], *, piece: int = 16, rows_per_group: int = 7,
                         with_flags: bool = True) -> None:
    rows, flags = [], []
    for doc in docs:
        for i in range(0, len(doc), piece):
            rows.append(doc[i:i + piece].tolist())
            flags.append(i == 0)
    columns = {"tokens": pa.array(rows, pa.list_(pa.int32()))}
    if with_flags:
        columns["doc_start"] = pa.array(flags)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=rows_per_group)


def doc_starts(docs: list[np.ndarray]) -> np.ndarray:
    """Stream position of every document's first token."""
    return np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]]).astype(np.int64)


def trained_positions(docs: list[np.ndarray]) -> np.ndarray:
    """Every position a stream epoch trains as a target: all but position 0 and each document's first."""
    total = sum(len(d) for d in docs)
    return np.setdiff1d(np.arange(1, total), doc_starts(docs))

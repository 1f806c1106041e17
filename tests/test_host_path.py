"""The host path between the loader and the step (runs on CPU; the CUDA copies are in test_gpu.py).

A failure means that copying batches to the device one step ahead changes what the trainer
receives or in what order, or that a checkpoint taken mid-run counts the batch already copied ahead
as consumed, so a resumed run would skip it.
"""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loader_worker as lw  # noqa: E402

from distlstm.data.batch import Batch  # noqa: E402
from distlstm.data.loader.prefetch import prefetch_to_device  # noqa: E402

CPU = torch.device("cpu")


def test_prefetch_one_ahead_keeps_order_and_the_resume_position(tmp_path):
    data = lw.write_parquet(tmp_path / "pq", 600, rows_per_group=50, shards=3)
    cache = tmp_path / "cache"
    reference = lw.take(lw.make_loader(data, cache, max_epochs=2), 10_000)

    loader = lw.make_loader(data, cache, max_epochs=2)
    loader.device = CPU  # what train.py sets on a GPU: batches copied one ahead of the trainer
    it = iter(loader)
    got = [lw.digest(b) for b in islice(it, 7)]
    # The generator has pulled batch 8 from the workers already; the position must still say 7.
    state = loader.state_dict()
    it.close()
    assert (state["epoch"], state["consumed"]) == (0, 7)
    resumed = lw.make_loader(data, cache, max_epochs=2)
    resumed.device = CPU
    resumed.load_state_dict(state)
    got += lw.take(resumed, 10_000)
    assert got == reference


def _batch(i: int) -> Batch:
    x = torch.full((2, 3), i)
    return Batch(x, torch.tensor([3, 2]), x.clone(), torch.tensor([i, i]))


def test_prefetch_hands_out_every_batch_once():
    batches = [_batch(i) for i in range(5)]
    out = list(prefetch_to_device(iter(batches), CPU))
    assert [int(b.sample_ids[0]) for b in out] == list(range(5))
    assert list(prefetch_to_device(iter([]), CPU)) == []

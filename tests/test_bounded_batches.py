"""Bounded batch shapes through the real loader (data.shape_buckets), for every task.

A failure means a batch does not have the shape the plan announced (a CUDA graph per shape would
not match, or there would be more shapes than stated), or a dummy row (what fills a partial batch or
a skipped sample's place up to the shape) changes the loss, the gradient, or the token and item
counts the loader hands the trainer: training would differ from the same samples without padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distlstm.config import DataConfig, ModelConfig
from distlstm.data.shards.index import open_index
from distlstm.data.loader.batch_loader import build_loader
from distlstm.data.plan.epoch import EpochPlan
from distlstm.data.prep.prep import ShardWriter
from distlstm.models.lstm import build_model, loss_and_metrics
from distlstm.tasks import get_task

VOCAB, CLASSES, N = 50, 3, 503


def _write(folder: Path, task: str, bad_every: int = 0) -> Path:
    """Parquet shards of `task` written by the project's prep writer; every `bad_every`-th classify
    label is out of range (a bad sample)."""
    rng = np.random.default_rng(1)
    writer = ShardWriter(str(folder), "train", "parquet", task, False, 1 << 20, 40)
    for i in range(N):
        n = int(np.clip(np.exp(rng.normal(np.log(12), 0.6)), 2, 40))
        seq = rng.integers(0, VOCAB, n).astype(np.int32)
        label = {"classify": int(rng.integers(CLASSES)), "regress": float(rng.normal()),
                 "tag": rng.integers(0, CLASSES, n), "lm": None}[task]
        if bad_every and i % bad_every == 3:
            label = CLASSES + 5
        writer.add(seq, label)
    shards = writer.close()
    manifest = {"version": 1, "format": "parquet", "task": task, "sequence_column": "tokens",
                "label_column": {"tag": "tags", "lm": None}.get(task, "label"), "vocab_size": VOCAB,
                "num_classes": CLASSES if task in ("classify", "tag") else None, "input_size": None,
                "num_samples": N, "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _loader(folder: Path, task: str, cache: Path, **cfg):
    index = open_index(str(folder), cache_dir=cache)
    data = DataConfig(**{**dict(max_tokens=128, min_batch_size=2, max_length=32, window_chunks=2, num_workers=0,
                                seed=3, shape_buckets=6), **cfg})
    return build_loader(index, data, task=task, dp_rank=0, dp_world_size=1, vocab_size=VOCAB, num_classes=CLASSES,
                        pin_memory=False, run_dir=None, max_epochs=1)


def _counted_items(batch, task: str) -> int:
    real = batch.sample_ids >= 0
    if task in ("tag", "lm"):
        return int((batch.targets[real] != -100).sum())
    return int(real.sum())


@pytest.mark.parametrize("task", ["classify", "regress", "tag", "lm"])
@pytest.mark.parametrize("shape_buckets", [0, 6])
def test_batches_take_the_planned_shapes_and_counts(tmp_path, task, shape_buckets):
    loader = _loader(_write(tmp_path / "d", task), task, tmp_path / "cache", shape_buckets=shape_buckets)
    plan = EpochPlan(loader.index.chunk_offsets, loader.index.sample_lengths(), loader.params, seed=loader.seed, epoch=0)
    seen, dummies = [], 0
    for g, batch in enumerate(loader):
        real = batch.sample_ids >= 0
        seen.extend(batch.sample_ids[real].tolist())
        # Counted by the loader worker; the trainer no longer computes them from the tensors.
        assert batch.tokens == int(batch.lengths[real].sum())
        assert get_task(task).item_count(batch) == batch.items == _counted_items(batch, task)
        if not shape_buckets:
            assert real.all()
            continue
        rows, length = plan.batch_shape(g)
        assert tuple(batch.inputs.shape[:2]) == (rows, length - (task == "lm"))
        dummies += int((~real).sum())
        assert (batch.lengths[~real] == 1).all() and (batch.inputs[~real] == 0).all()
        no_target = batch.targets[~real]
        assert (torch.isnan(no_target) if task == "regress" else no_target == -100).all()
    assert sorted(seen) == list(range(N)), "every sample once"
    assert len(plan.shapes) <= 6
    if shape_buckets:
        assert dummies > 0, "the fixture should end a window on a partial batch"


@pytest.mark.parametrize("task", ["classify", "regress", "tag", "lm"])
def test_dummy_rows_change_neither_loss_nor_gradient(tmp_path, task):
    """The same batch with and without its dummy rows: equal loss sum, item count and gradients
    (float64, so 'equal' means to rounding)."""
    loader = _loader(_write(tmp_path / "d", task), task, tmp_path / "cache")
    batch = next(b for b in loader if (b.sample_ids < 0).any())
    n = int((batch.sample_ids >= 0).sum())
    torch.manual_seed(0)
    model = build_model(ModelConfig(task=task, input="tokens", hidden_size=8, embed_size=4, num_layers=2),
                        vocab_size=VOCAB, input_size=0, num_classes=CLASSES).double()

    def run(rows: slice):
        model.zero_grad(set_to_none=True)
        out = model(batch.inputs[rows], batch.lengths[rows])
        loss, count, _ = loss_and_metrics(task, out, batch.targets[rows], batch.lengths[rows])
        loss.backward()
        return loss.item(), count.item(), [p.grad.clone() for p in model.parameters()]

    padded, real = run(slice(None)), run(slice(0, n))
    assert padded[0] == pytest.approx(real[0], rel=1e-12) and padded[1] == real[1] == batch.items
    for a, b in zip(padded[2], real[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_skipped_samples_become_dummy_rows(tmp_path):
    """data.on_bad_sample=skip with bounded shapes: a bad sample's place is a dummy row, so the batch
    keeps its planned shape."""
    loader = _loader(_write(tmp_path / "d", "classify", bad_every=25), "classify", tmp_path / "cache",
                     on_bad_sample="skip")
    plan = EpochPlan(loader.index.chunk_offsets, loader.index.sample_lengths(), loader.params, seed=loader.seed, epoch=0)
    skipped = 0
    for g, batch in enumerate(loader):
        assert tuple(batch.inputs.shape) == plan.batch_shape(g)
        skipped += batch.num_skipped
        assert batch.items == int((batch.sample_ids >= 0).sum())
    assert skipped == len(range(3, N, 25))

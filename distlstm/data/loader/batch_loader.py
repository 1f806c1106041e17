"""The batch loader: DataLoader workers walk this rank's share of the plan, decode chunks, pad batches.

Resume state is `(epoch, consumed)`: the number of *global* batches of the epoch that all ranks
together have consumed. It counts what the trainer received, not what workers prefetched, and it
does not depend on the world size, so a checkpoint taken on N ranks resumes on M ranks exactly.

Workers: worker `w` of `W` produces this rank's local batches `k` with `k % W == w`; the DataLoader
pulls from workers round-robin, so batches arrive in plan order whatever `W` is.

Streams (`data.streams`, see plan.py): `auto` plans each epoch with `ranks x workers` streams, so
each chunk is decoded by exactly one worker of one rank. The number used for the epoch in progress
is part of the state: a run resumed on another world size finishes that epoch with the recorded
number (the plan, and so the position, stay exact) and plans later epochs with its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distlstm.data.batch import Batch, Chunk
from distlstm.data.errors import BadSampleError
from distlstm.data.shards.index import DatasetIndex
from distlstm.data.plan.epoch import EpochPlan, PlanParams
from distlstm.data.loader.fetch import WindowFetcher
from distlstm.data.loader.prefetch import prefetch_to_device
from distlstm.data.loader.workers import ship_failures, worker_batches
from distlstm.tasks import Task, per_sample_any, get_task

STATE_VERSION = 2  # 2: + "streams"; a version 1 state was saved with one stream
log = logging.getLogger(__name__)


def find_bad_samples(chunk: Chunk, *, task: str | Task, vocab_size: int, num_classes: int) -> dict[int, str]:
    """Vectorised checks of a decoded chunk: local index -> problem (plus what decoding found).
    Each check first runs as one cheap reduction over the chunk; the per-sample pass runs only when
    that reduction says something is wrong, so clean data costs one or two passes in all."""
    task = get_task(task)
    bad = dict(chunk.bad)
    n = len(chunk)
    if n == 0:
        return bad

    def flag(mask: np.ndarray, problem: str) -> None:
        for i in np.flatnonzero(mask).tolist():
            bad.setdefault(i, problem)

    lens = chunk.lengths
    flag(lens < task.min_length, "empty sequence" if task.min_length == 1 else
         f"fewer than {task.min_length} tokens for {task.name}")
    values, offsets = chunk.values, chunk.offsets
    if len(values):
        if values.dtype.kind == "f":
            if not np.isfinite(values.sum(dtype=np.float64)):
                flag(per_sample_any(~np.isfinite(values).all(axis=1), offsets), "NaN or infinite feature value")
        elif vocab_size and (values.min() < 0 or values.max() >= vocab_size):
            flag(per_sample_any((values < 0) | (values >= vocab_size), offsets),
                 f"token id outside [0, {vocab_size}) (model.vocab_size)")
    for mask, problem in task.check_labels(chunk.labels, offsets, num_classes):
        flag(mask, problem)
    return bad


def check_input_kind(chunk: Chunk, shard: str, input_size: int | None) -> None:
    """BadSampleError when a chunk's sequences are not what the model takes: token ids (`input_size`
    0) or float vectors of `input_size` features; None checks nothing. Without this a float shard
    among int ones, nested lists or another feature width fail deep inside numpy or torch, naming
    no file."""
    values = chunk.values
    if input_size is None or len(values) == 0:
        return
    is_tokens = values.ndim == 1 and values.dtype.kind in "iu"
    if input_size == 0 and not is_tokens:
        what = (f"float feature vectors ({values.shape[1]} per step)" if values.ndim == 2 else f"{values.dtype} values")
        raise BadSampleError(shard, "sequences", f"hold {what}, but the model takes integer token ids "
                             "(model.input=tokens)", fix="re-create the shard with integer token ids, or set "
                             "--model.input features and --model.input_size if the data are feature vectors")
    if input_size and (values.ndim != 2 or values.shape[1] != input_size):
        what = f"{values.shape[1]} features per step" if values.ndim == 2 else f"1-D {values.dtype} values"
        raise BadSampleError(shard, "sequences", f"hold {what}, but the model takes {input_size} features per "
                             "step (model.input_size)", fix="give every shard the same feature width, or set "
                             "--model.input_size to match the data")


class _Assembler:
    """Turns sample ids into a padded Batch from the joined buffers of the windows in use."""

    def __init__(self, index: DatasetIndex, *, task: str | Task, max_length: int, vocab_size: int,
                 num_classes: int, on_bad_sample: str, quarantine: Path | None, input_size: int | None = None):
        self.index, self.task, self.max_length = index, get_task(task), max_length
        self.input_size = input_size
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.on_bad_sample, self.quarantine = on_bad_sample, quarantine
        self._wins: OrderedDict[tuple, _Window] = OrderedDict()
        self.max_windows = 1
        self.fetcher = WindowFetcher(self._decode) if index.is_remote else None
        self.keep_whole = False
        """data.too_long=chunk: samples longer than max_length stay whole (the trainer cuts them into pieces)."""

    def chunk(self, c: int) -> tuple[Chunk, dict[int, str]]:
        """Decode chunk `c` and find its bad samples (once per window: the window keeps the data)."""
        rows = int(self.index.chunk_offsets[c + 1] - self.index.chunk_offsets[c])
        try:
            chunk = self.index.read_chunk(c, task=self.task.name)
            if len(chunk) != rows:
                shard = self.index.shards[self.index.chunk_shard[c]]
                raise BadSampleError(shard, f"chunk {int(self.index.chunk_local[c])}", f"has {len(chunk)} samples "
                                     f"but the index says {rows}: the file changed after it was indexed",
                                     fix="delete the index cache (data.cache_dir) or restore the file")
            check_input_kind(chunk, self.index.shards[self.index.chunk_shard[c]], self.input_size)
            bad = find_bad_samples(chunk, task=self.task, vocab_size=self.vocab_size, num_classes=self.num_classes)
        except BadSampleError as exc:
            if self.on_bad_sample == "error":
                raise
            empty = Chunk(values=np.zeros((0,), np.int64), offsets=np.zeros(rows + 1, np.int64), labels=None)
            chunk, bad = empty, {i: str(exc) for i in range(rows)}
        return chunk, bad

    def _report(self, sample_id: int, chunk: Chunk, local: int, problem: str, epoch: int) -> None:
        shard, row = self.index.locate(sample_id)
        where = chunk.where(local) if chunk.keys else row
        if self.on_bad_sample == "error":
            raise BadSampleError(shard, where, problem, fix="fix the data, or run with --data.on_bad_sample skip")
        if self.quarantine is not None:
            self.quarantine.parent.mkdir(parents=True, exist_ok=True)
            with open(self.quarantine, "a") as f:
                f.write(json.dumps({"epoch": epoch, "sample_id": sample_id, "shard": shard, "where": where,
                                    "problem": problem}) + "\n")

    def _decode_all(self, key: tuple) -> list[tuple[int, Chunk, dict[int, str]]]:
        if self.fetcher is not None:  # remote: on threads, maybe begun one window ahead
            return self.fetcher.take(key)
        return [self._decode(c) for c in key]

    def _decode(self, c: int) -> tuple[int, Chunk, dict[int, str]]:
        return (c, *self.chunk(c))

    def window_lengths(self, chunks: np.ndarray) -> np.ndarray:
        """The plan's `lengths_of`: the lengths of the samples of `chunks` from the decoded window
        (decoded once: the batches are then cut from the same window), checked against the index."""
        win = self._window(chunks)
        parts = [self.index.check_chunk_lengths(int(c), win.lens[win.base[k]:win.base[k + 1]],
                                                win.bad[win.base[k]:win.base[k + 1]])
                 for k, c in enumerate(win.key)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _window(self, chunks: np.ndarray) -> "_Window":
        """The decoded samples of one plan window joined into flat buffers, built once per window:
        a batch is then a handful of vectorised gathers, not a Python loop over its samples."""
        key = tuple(int(c) for c in chunks)
        if key in self._wins:
            self._wins.move_to_end(key)
            return self._wins[key]
        while len(self._wins) >= self.max_windows:
            self._wins.popitem(last=False)  # free before decoding the next
        decoded = self._decode_all(key)
        width = self.max_length
        if self.keep_whole:
            width = max([width] + [int(np.diff(ch.offsets).max()) for _, ch, _ in decoded if len(ch)])
        win = _Window(key, decoded, self.index.chunk_offsets, per_step=self.task.per_step, max_length=width)
        self._wins[key] = win
        return win

    def __call__(self, ids: np.ndarray, *, weight: float, epoch: int, consumed: int,
                 window: np.ndarray | None = None, shape: tuple[int, int] | None = None,
                 next_window: np.ndarray | None = None) -> Batch:
        """Pad the samples `ids` (all from the plan window `window`) into a Batch; with a bounded
        `shape` (rows, length) pad to exactly that, filling missing rows with dummy rows.
        `next_window`, the window this worker reads after it, is begun in the background for
        remote data."""
        win = self._window(window if window is not None else
                           np.unique(np.searchsorted(self.index.chunk_offsets, ids, side="right") - 1))
        if self.fetcher is not None and next_window is not None:
            self.fetcher.start(tuple(int(c) for c in next_window))
        pos = win.positions(ids)
        skipped = 0
        if win.any_bad:
            bad = win.bad[pos]
            if bad.any():
                if weight:  # a filler repeats a real batch: its bad samples were reported and counted there
                    for p, sid in zip(pos[bad].tolist(), ids[bad].tolist()):
                        chunk, local, problem = win.describe(p)
                        self._report(sid, chunk, local, problem, epoch)
                    skipped = int(bad.sum())
                ids, pos = ids[~bad], pos[~bad]
        if len(pos) == 0:  # every sample was bad: a zero-weight stand-in keeps the step count equal on all ranks
            if shape is None:
                return self._empty(epoch=epoch, consumed=consumed, skipped=skipped)
            weight = 0.0
        lens = win.lens[pos] if self.keep_whole else np.minimum(win.lens[pos], self.max_length)
        T = int(lens.max()) if shape is None else max(shape[1], self.task.min_length)
        mask = np.arange(T) < lens[:, None]
        # One row copy per sample from the window's sliding view (no per-token index array); rows
        # run past a sample's end into its neighbours, and the mask zeroes those steps.
        starts = win.starts[pos]
        inputs = win.rows[:, :T][starts]
        np.multiply(inputs, mask[..., None] if inputs.ndim == 3 else mask, out=inputs)
        # numpy, not torch, until the main process: tensors cross from a DataLoader worker through one
        # shared-memory segment each (about 1 ms per batch); numpy arrays travel inside the pickle.
        lens = lens.astype(np.int64)
        inputs, lens, y = self.task.batch_arrays(inputs, lens, win.labels, pos=pos, starts=starts, mask=mask)
        tokens = int(lens.sum())
        items = tokens if self.task.per_step else len(lens)
        ids = ids.astype(np.int64)
        if shape is not None and shape[0] > len(ids):
            inputs, lens, y, ids = _dummy_rows(shape[0] - len(ids), inputs, lens, y, ids, self.task.no_target)
        return Batch(inputs, lens, y, ids, weight, epoch, consumed, skipped, tokens=tokens, items=items)

    def _empty(self, *, epoch: int, consumed: int, skipped: int) -> Batch:
        """A one-sample, zero-weight batch of the right types (every sample of a batch was bad)."""
        dims = self.index.manifest.dims() if self.index.manifest else {}
        width = int(dims.get("input_size") or 0)
        targets = int(dims.get("num_targets") or 1)
        for win in self._wins.values():
            width = win.values.shape[1] if win.values.ndim == 2 and win.values.shape[1] else width
            if not self.task.per_step and win.labels is not None and win.labels.ndim == 2:
                targets = win.labels.shape[1]  # K-vector regression targets
        x = torch.zeros((1, 2, width) if width else (1, 2), dtype=torch.float32 if width else torch.int64)
        y = self.task.empty_targets(targets)
        return Batch(x, torch.tensor([2]), y, torch.tensor([-1]), 0.0, epoch, consumed, skipped)


def _dummy_rows(n: int, inputs: np.ndarray, lens: np.ndarray, targets: np.ndarray, ids: np.ndarray,
                no_target: float):
    """Append `n` dummy rows (bounded shapes: a partial batch, or skipped samples, padded to the
    plan's shape): zero inputs, length 1, no target (`Task.no_target`: -100, NaN for regression), id
    -1. They carry no loss and no gradient, and count neither as tokens nor as items."""
    return (np.concatenate([inputs, np.zeros((n,) + inputs.shape[1:], inputs.dtype)]),
            np.concatenate([lens, np.ones(n, lens.dtype)]),
            np.concatenate([targets, np.full((n,) + targets.shape[1:], no_target, targets.dtype)]),
            np.concatenate([ids, np.full(n, -1, np.int64)]))


class _Window:
    """Flat buffers over the chunks of one plan window: values, per-sample start/length/label/bad."""

    def __init__(self, key: tuple, chunks: list[tuple[int, Chunk, dict[int, str]]], chunk_offsets: np.ndarray,
                 *, per_step: bool, max_length: int):
        self.key = key
        ids = np.array([c for c, _, _ in chunks], dtype=np.int64)
        self._sorted = np.argsort(ids)
        self._chunk_first = chunk_offsets[ids]                     # global id of each chunk's sample 0
        self._first_sorted = self._chunk_first[self._sorted]
        counts = np.array([len(ch) for _, ch, _ in chunks], dtype=np.int64)
        self.base = np.concatenate([[0], np.cumsum(counts)])      # window position of each chunk's sample 0
        sizes = [len(ch.values) for _, ch, _ in chunks]
        value_base = np.concatenate([[0], np.cumsum(sizes)])
        self.starts = np.concatenate([ch.offsets[:-1] + vb for (_, ch, _), vb in zip(chunks, value_base)] or
                                     [np.zeros(0, np.int64)])
        self.lens = np.concatenate([np.diff(ch.offsets) for _, ch, _ in chunks] or [np.zeros(0, np.int64)])
        filled = [ch.values for _, ch, _ in chunks if len(ch.values)]
        if filled:
            # Features as float32; token ids keep a 32-bit type when they have one (nn.Embedding takes
            # int32 indices): half the bytes to gather, pickle and copy to the device.
            kind = filled[0].dtype
            dtype = np.float32 if kind.kind == "f" else kind if kind.itemsize <= 4 and kind.kind == "i" else np.int64
            tail = np.zeros((max_length,) + filled[0].shape[1:], dtype)
            self.values = np.concatenate(filled + [tail]).astype(dtype, copy=False)
        else:
            self.values = np.zeros(max_length, np.int64)
        # rows[i] = values[i : i + max_length] without a copy; the buffer ends with max_length zeros,
        # so every sample's row is in bounds.
        self.rows = sliding_window_view(self.values, max_length, axis=0)
        if self.values.ndim == 2:
            self.rows = self.rows.transpose(0, 2, 1)
        self.labels = self._join_labels(chunks, per_step, max_length)
        self.bad = np.zeros(int(self.base[-1]), dtype=bool)
        # Kept for messages about bad samples (keys, first row); not their data, which the joined
        # buffers above already hold: keeping both would double a worker's memory.
        self._chunks = [(c, dataclasses.replace(ch, values=np.zeros(0, np.int64), labels=None), bad)
                        for c, ch, bad in chunks]
        for k, (_, _, bad) in enumerate(chunks):
            if bad:
                self.bad[self.base[k] + np.fromiter(bad.keys(), dtype=np.int64)] = True
        self.any_bad = bool(self.bad.any())

    @staticmethod
    def _join_labels(chunks, per_step: bool, max_length: int) -> np.ndarray | None:
        present = [ch.labels for _, ch, _ in chunks if ch.labels is not None and len(ch.labels)]
        if not present:
            return None
        like = present[0]
        parts = [ch.labels if ch.labels is not None and len(ch.labels) else
                 np.zeros((len(ch.values) if per_step else len(ch),) + like.shape[1:], like.dtype)
                 for _, ch, _ in chunks]
        if per_step:  # aligned with `values`, tail included
            parts.append(np.zeros(max_length, like.dtype))
        return np.concatenate(parts)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Window positions of global sample ids (all inside this window)."""
        k = self._sorted[np.searchsorted(self._first_sorted, ids, side="right") - 1]
        return self.base[k] + ids - self._chunk_first[k]

    def describe(self, pos: int) -> tuple[Chunk, int, str]:
        k = int(np.searchsorted(self.base, pos, side="right") - 1)
        _, chunk, bad = self._chunks[k]
        local = pos - int(self.base[k])
        return chunk, local, bad[local]


class _Stream(IterableDataset):
    """This rank's batches from (epoch, consumed) on; each worker takes every W-th batch."""

    def __init__(self, index: DatasetIndex, params_for: Callable[[int], PlanParams], assembler: _Assembler, *,
                 seed: int, dp_rank: int, dp_world_size: int, epoch: int, consumed: int, max_epochs: int):
        self.index, self.params_for, self.assembler = index, params_for, assembler
        self.seed, self.dp_rank, self.dp_world_size = seed, dp_rank, dp_world_size
        self.epoch, self.consumed, self.max_epochs = epoch, consumed, max_epochs

    def _plan(self, epoch: int) -> EpochPlan:
        plan = EpochPlan.of(self.index.chunk_lengths, self.params_for(epoch), seed=self.seed, epoch=epoch)
        return plan.with_lengths(self.assembler.window_lengths)

    def __iter__(self) -> Iterator[Batch]:
        return ship_failures(self._batches())

    def _batches(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k, epoch, start, N = 0, self.epoch, self.consumed, self.dp_world_size
        # Remote Parquet: name the next window so that it is fetched while this one is batched. Not
        # for tar, where a chunk is a whole shard and a second window in memory could be gigabytes.
        ahead = self.assembler.fetcher is not None and "tar" not in self.index.formats
        plan = None
        while not self.max_epochs or epoch < self.max_epochs:
            plan = plan if plan is not None and plan.epoch == epoch else self._plan(epoch)
            if plan.num_batches == 0:
                raise ValueError("the plan has no batches: the dataset is empty or every sample was dropped "
                                 "(data.too_long=drop with a small data.max_length?)")
            # Windows this worker holds at once: one per stream it reads (streams / (ranks x workers)).
            self.assembler.max_windows = max(1, -(-plan.params.streams // (N * workers)))
            if ahead:
                self.assembler.fetcher.max_pending = self.assembler.max_windows
            count, following = plan.batches_per_rank(N, start), None
            for i in range(count):
                if k % workers == worker:
                    g = start + self.dp_rank + i * N
                    ids, filler = plan.rank_batch(i, dp_rank=self.dp_rank, dp_world_size=N, start=start)
                    upcoming = plan.next_window_chunks(g) if ahead else None
                    if ahead and upcoming is None and (not self.max_epochs or epoch + 1 < self.max_epochs):
                        # The stream's last window: the next is this worker's first of the next epoch.
                        following = following or self._plan(epoch + 1)
                        first = (worker - (k - i + count)) % workers
                        if first < following.batches_per_rank(N):
                            upcoming = following.window_chunks(self.dp_rank + first * N)
                    yield self.assembler(ids, weight=0.0 if filler else 1.0, epoch=epoch,
                                         consumed=start + (i + 1) * N, window=plan.window_chunks(g),
                                         shape=plan.batch_shape(g), next_window=upcoming)
                k += 1
            epoch, start, plan = epoch + 1, 0, following


class BatchLoader:
    """Iterable of this rank's `Batch`es with an O(1) `state_dict()` of what was consumed."""

    def __init__(self, index: DatasetIndex, params: PlanParams, *, task: str, seed: int, dp_rank: int,
                 dp_world_size: int, num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False,
                 max_epochs: int = 0, vocab_size: int = 0, num_classes: int = 0, on_bad_sample: str = "error",
                 quarantine: Path | None = None, agree: Callable[[int], bool] | None = None,
                 device: torch.device | None = None, input_size: int | None = None):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} outside dp_world_size={dp_world_size}")
        self.index, self.params, self.seed = index, params, seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.max_epochs, self.agree = max_epochs, agree
        self.device = device
        """Set: batches arrive on this device, copied one batch ahead (distlstm/data/loader/prefetch.py)."""
        self.assembler = _Assembler(index, task=task, max_length=params.max_length, vocab_size=vocab_size,
                                    num_classes=num_classes, on_bad_sample=on_bad_sample, quarantine=quarantine,
                                    input_size=input_size)
        self.assembler.keep_whole = params.too_long == "chunk"
        self.epoch, self.consumed = 0, 0
        self._resumed_streams: tuple[int, int] | None = None  # (epoch, streams) recorded in a loaded state
        if params.too_long == "error":
            self._refuse_too_long()

    def _refuse_too_long(self) -> None:
        """data.too_long=error: refuse before step 1, from the chunks' longest samples (the first
        offending chunk is decoded to name the row)."""
        M = self.params.max_length
        over_chunks = np.flatnonzero(self.index.chunk_lengths.longest > M)
        if not len(over_chunks):
            return
        total = sum(int(b.counts[b.lengths > M].sum()) for b in self.index.chunk_lengths.blocks())
        c = int(over_chunks[0])
        lengths = self.index.read_chunk(c, task=self.assembler.task.name).lengths
        local = int(np.flatnonzero(lengths > M)[0]) if (lengths > M).any() else 0
        shard, row = self.index.locate(int(self.index.chunk_offsets[c]) + local)
        raise ValueError(f"shard {shard}: {row}: length {int(self.index.chunk_lengths.longest[c])} exceeds "
                         f"data.max_length={M} ({total} samples in all); raise "
                         f"data.max_length or set data.too_long=truncate|drop")

    def params_for(self, epoch: int) -> PlanParams:
        """The plan parameters of `epoch`: the recorded number of streams for the epoch a loaded
        state was in, this loader's own for every other."""
        if self._resumed_streams is not None and self._resumed_streams[0] == epoch:
            return dataclasses.replace(self.params, streams=self._resumed_streams[1])
        return self.params

    def plan_hash(self, epoch: int) -> int:
        """What every rank must agree on before an epoch starts."""
        key = (f"{self.params_for(epoch).fingerprint()}|{self.index.fingerprint()}|{self.seed}|{epoch}|"
               f"{self.dp_world_size}")
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "little")  # 48 bits: exact in float64

    def __iter__(self) -> Iterator[Batch]:
        stream = _Stream(self.index, self.params_for, self.assembler, seed=self.seed, dp_rank=self.dp_rank,
                         dp_world_size=self.dp_world_size, epoch=self.epoch, consumed=self.consumed,
                         max_epochs=self.max_epochs)
        with worker_batches(stream, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor, seed=self.seed) as batches:
            if self.device is not None:
                batches = prefetch_to_device(batches, self.device)
            checked = None
            for batch in batches:
                batch = batch.as_tensors()
                if batch.epoch != checked and self.agree is not None:
                    if not self.agree(self.plan_hash(batch.epoch)):
                        raise RuntimeError(
                            f"rank {self.dp_rank}: the data plan for epoch {batch.epoch} differs between ranks "
                            f"(plan {self.params}, seed {self.seed}, dataset {self.index.fingerprint()}); every "
                            f"rank must see the same shards and data.* settings")
                    checked = batch.epoch
                plan_done = batch.consumed >= self._num_batches(batch.epoch)
                self.epoch, self.consumed = (batch.epoch + 1, 0) if plan_done else (batch.epoch, batch.consumed)
                yield batch

    def _num_batches(self, epoch: int) -> int:
        return EpochPlan.of(self.index.chunk_lengths, self.params_for(epoch), seed=self.seed,
                            epoch=epoch).num_batches

    def rewind(self) -> None:
        """Back to the start of epoch 0 (the validation loader, before each evaluation)."""
        self.epoch, self.consumed = 0, 0

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed,
                "world_size": self.dp_world_size, "seed": self.seed, "plan": _plan_fingerprint(self.params),
                "streams": self.params_for(self.epoch).streams, "dataset": self.index.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume on exactly the next global batch. A different world size is fine (the position is
        global, and the epoch in progress keeps the number of streams it was planned with); a
        different seed, plan or dataset is refused because the position would be meaningless."""
        if state.get("mode") == "stream":  # an lm stream position (distlstm/data/loader/stream_loader.py)
            raise ValueError("cannot resume: the checkpoint's data position is an lm stream position "
                             "(data.lm_mode=stream) and this run reads windows; restore --data.lm_mode stream, "
                             "or start fresh with --checkpoint.resume never")
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("plan", _plan_fingerprint(self.params)),
                          ("dataset", self.index.fingerprint())):
            if key == "dataset" and self.index.matches_fingerprint(state[key]):
                continue
            if state[key] != mine:
                raise ValueError(f"cannot resume the data position: {key} changed since the checkpoint "
                                 f"({state[key]} -> {mine}); restore the data.* settings and shards, or start "
                                 f"fresh with --checkpoint.resume never")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        streams = int(state.get("streams", 1))
        # At an epoch's start any plan fits the position (nothing consumed yet): plan it for this run.
        self._resumed_streams = (self.epoch, streams) if streams != self.params.streams and self.consumed else None
        if self._resumed_streams is not None:
            log.info("data: epoch %d continues with the %d streams it was planned with (now %d ranks x workers "
                     "would plan %d): some chunks of it are decoded by more than one worker", self.epoch,
                     streams, self.dp_world_size * max(self.num_workers, 1), self.params.streams)

    def describe(self, epoch: int = 0) -> str:
        """One line about the plan of `epoch`, for the run log."""
        plan = EpochPlan.of(self.index.chunk_lengths, self.params_for(epoch), seed=self.seed, epoch=epoch)
        fillers = plan.num_batches - plan.num_real_batches
        return (f"{plan.num_batches} global batches per epoch in {plan.params.streams} stream(s) of "
                f"{self.index.num_chunks} chunks ({fillers} fillers, {fillers / max(plan.num_batches, 1):.1%}), "
                f"{plan.batches_per_rank(self.dp_world_size)} per rank")


def _plan_fingerprint(params: PlanParams) -> str:
    """The plan parameters without the number of streams (recorded separately, since `auto`
    follows the world size); equal to a version 1 state's fingerprint of a one-stream plan."""
    return dataclasses.replace(params, streams=1).fingerprint()


def resolve_streams(streams: int | str, *, dp_world_size: int, num_workers: int, num_chunks: int,
                    min_chunks_per_stream: int = 1) -> int:
    """`data.streams`: `auto` = ranks x DataLoader workers per rank (the in-process loader counts
    as one), so that each chunk has one reader; for a dataset too small to give every stream
    `min_chunks_per_stream` chunks, the largest divisor of that count that does (each chunk is
    then read by ranks x workers / streams workers, and the log says so)."""
    if isinstance(streams, int):
        return streams
    readers = dp_world_size * max(1, num_workers)
    return max(k for k in range(1, readers + 1) if readers % k == 0 and (k == 1 or num_chunks >= k * min_chunks_per_stream))


def streams_for(data_cfg, index: DatasetIndex, *, dp_world_size: int, num_workers: int | None = None,
                shuffle: bool = True) -> int:
    """The number of streams a loader plans new epochs with. A training stream should get at least
    half a window of chunks (smaller windows mix less and pad more, and short streams end in
    fillers); an evaluation pass (no shuffling) needs only one chunk per stream."""
    workers = data_cfg.num_workers if num_workers is None else num_workers
    return resolve_streams(data_cfg.streams, dp_world_size=dp_world_size, num_workers=workers,
                           num_chunks=index.num_chunks,
                           min_chunks_per_stream=max(1, data_cfg.window_chunks // 2) if shuffle else 1)


def plan_params(data_cfg, *, shuffle: bool = True, streams: int = 1) -> PlanParams:
    """The plan parameters of a `[data]` config section; `streams` as resolved by `streams_for`.
    "auto" values that were not resolved for a device (distlstm/run/autotune.py) take their host
    meaning (`DataConfig.host_defaults`: the config decides what they mean, not the loader)."""
    data_cfg = data_cfg.host_defaults()
    max_tokens, shape_buckets = data_cfg.max_tokens, data_cfg.shape_buckets
    return PlanParams(max_tokens=max_tokens, min_batch_size=data_cfg.min_batch_size,
                      max_batch_size=data_cfg.max_batch_size, max_length=data_cfg.max_length,
                      too_long=data_cfg.too_long, window_chunks=data_cfg.window_chunks, shuffle=shuffle,
                      streams=streams, shape_buckets=shape_buckets)


def build_loader(index: DatasetIndex, data_cfg, *, task: str, dp_rank: int, dp_world_size: int,
                 vocab_size: int, num_classes: int, pin_memory: bool, run_dir: Path | None,
                 agree=None, shuffle: bool = True, max_epochs: int = 0, num_workers: int | None = None,
                 device: torch.device | None = None, input_size: int | None = None) -> BatchLoader:
    """`input_size`: what the model takes, checked per chunk: 0 = token ids, N = N features per
    step, None = unchecked."""
    workers = data_cfg.num_workers if num_workers is None else num_workers
    streams = streams_for(data_cfg, index, dp_world_size=dp_world_size, num_workers=workers, shuffle=shuffle)
    readers = dp_world_size * max(1, workers)
    if dp_rank == 0 and not isinstance(data_cfg.streams, int) and streams < readers:
        log.warning("data: %d chunks are too few for %d streams (ranks x workers); planning %d, so each chunk is "
                    "read by %d workers: write smaller row groups (prep --rows-per-group) for one reader per chunk",
                    index.num_chunks, readers, streams, readers // streams)
    elif dp_rank == 0 and streams > index.num_chunks:
        log.warning("data: %d chunks for data.streams=%d: the workers without a chunk of their own repeat "
                    "another's window as fillers", index.num_chunks, streams)
    params = plan_params(data_cfg, shuffle=shuffle, streams=streams)
    quarantine = run_dir / "quarantine" / f"rank{dp_rank:05d}.jsonl" if run_dir else None
    return BatchLoader(index, params, task=task, seed=data_cfg.seed, dp_rank=dp_rank, dp_world_size=dp_world_size,
                       num_workers=workers, prefetch_factor=data_cfg.prefetch_factor, pin_memory=pin_memory,
                       max_epochs=max_epochs, vocab_size=vocab_size, num_classes=num_classes,
                       on_bad_sample=data_cfg.on_bad_sample, quarantine=quarantine, agree=agree, device=device,
                       input_size=input_size)

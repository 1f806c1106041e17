"""The loader of lm stream mode (`data.lm_mode = stream`): this rank's rows of the stream layout
(distlstm/data/plan/stream.py), one `bptt`-target chunk per batch, with the resume state of that module.

A batch holds, for each of this rank's B rows, the next chunk's inputs and targets, and `reset`: the
columns before which the LSTM state of that row must be zeroed (a document or a discontinuous
stretch of the stream starts there; in training also random chunk starts, `data.state_reset`). The
trainer carries the state from one batch to the next (distlstm/run/bptt.py).

Reading: each row moves through the data sequentially, so a process keeps the few decoded chunks
(Parquet row groups, tar shards) its rows are in, about 2 per row. At most one DataLoader worker:
every batch holds all of this rank's rows, so W workers building every W-th batch would each read
and decode every chunk of those rows (W times the bytes per epoch); one worker reads each once, and
a batch of B x bptt tokens is cheap to build.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from distlstm.data.batch import Batch
from distlstm.data.errors import BadSampleError
from distlstm.data.shards.index import DatasetIndex
from distlstm.data.plan.stream import DOC_START_COLUMN, StreamLayout, StreamParams, state_resets
from distlstm.data.loader.workers import ship_failures, worker_batches
from distlstm.tasks import IGNORE_INDEX

STATE_VERSION = 1


class TokenStore:
    """Tokens and document starts at stream positions, decoded chunk by chunk, a few chunks cached."""

    def __init__(self, index: DatasetIndex, *, vocab_size: int = 0, max_chunks: int = 8):
        self.index, self.vocab_size, self.max_chunks = index, vocab_size, max_chunks
        # Stream position of each chunk's first token (per-chunk totals: nothing per sample).
        self.chunk_start = np.concatenate([[0], np.cumsum(index.chunk_lengths.tokens)]).astype(np.int64)
        self.num_tokens = int(self.chunk_start[-1])
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._pinned: set[int] = set()

    def read(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, starts-a-document) at stream positions `pos` (any shape, all < num_tokens)."""
        flat = pos.reshape(-1)
        tokens = np.zeros(flat.shape, np.int64)
        starts = np.zeros(flat.shape, bool)
        chunk = np.searchsorted(self.chunk_start, flat, side="right") - 1
        for c in np.unique(chunk).tolist():
            at = chunk == c
            values, offsets, doc_start = self._chunk(c)
            local = flat[at] - self.chunk_start[c]
            tokens[at] = values[local]
            row = np.searchsorted(offsets, local, side="right") - 1
            starts[at] = (offsets[row] == local) & doc_start[row]
        return tokens.reshape(pos.shape), starts.reshape(pos.shape)

    def sample_at(self, pos: np.ndarray) -> np.ndarray:
        """Global sample id holding each stream position (its chunk is decoded, or cached)."""
        chunk = np.searchsorted(self.chunk_start, pos, side="right") - 1
        out = np.zeros(pos.shape, np.int64)
        for c in np.unique(chunk).tolist():
            at = chunk == c
            offsets = self._chunk(c)[1]
            out[at] = self.index.chunk_offsets[c] + np.searchsorted(offsets, pos[at] - self.chunk_start[c],
                                                                    side="right") - 1
        return out

    def pin(self, pos: np.ndarray) -> None:
        """Keep the chunks holding stream positions `pos` once decoded, beyond the `max_chunks` of
        the LRU cache, until the next pin. For the rows' starts: the chunk where a row starts is also
        where the row before it ends, read at the start of the layout and again at its end; without
        the pin it would be read twice per epoch (once per row boundary)."""
        self._pinned = set((np.searchsorted(self.chunk_start, pos, side="right") - 1).tolist())

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        unpinned = [k for k in self._cache if k not in self._pinned]  # oldest first
        while len(unpinned) >= self.max_chunks:
            del self._cache[unpinned.pop(0)]
        self._cache[c] = self._decode(c)
        return self._cache[c]

    def _decode(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token values, row offsets into them, doc_start per row) of chunk `c`, checked."""
        index = self.index
        s = int(index.chunk_shard[c])
        shard, rows = index.shards[s], int(index.chunk_offsets[c + 1] - index.chunk_offsets[c])
        chunk = index.read_chunk(c, task="lm", flags_column=DOC_START_COLUMN)
        # A shard without the column (Parquet) or the sidecar's flags (tar): every row is a document.
        doc_start = chunk.flags if chunk.flags is not None else np.ones(len(chunk), bool)
        where = lambda i: chunk.where(i) if chunk.keys else f"row {chunk.first_row + i}"  # noqa: E731
        tokens = int(index.chunk_lengths.tokens[c])
        if len(chunk) != rows or int(chunk.offsets[-1] - chunk.offsets[0]) != tokens:
            raise BadSampleError(shard, f"chunk {int(index.chunk_local[c])}", f"has {len(chunk)} rows of "
                                 f"{int(chunk.offsets[-1] - chunk.offsets[0])} tokens but the index says {rows} rows "
                                 f"of {tokens}: the file changed after it was indexed",
                                 fix="delete the index cache (data.cache_dir) or restore the file")
        if chunk.bad:
            i, problem = next(iter(chunk.bad.items()))
            raise BadSampleError(shard, where(i), problem, fix=_FIX)
        values = chunk.values
        if values.dtype.kind != "i" or values.ndim != 1:
            raise BadSampleError(shard, "schema", f"'{index.sequence_column}' holds {values.dtype} vectors, but "
                                 "data.lm_mode=stream needs token ids", fix="set --data.sequence_column to the token column")
        if self.vocab_size and len(values) and (values.min() < 0 or values.max() >= self.vocab_size):
            bad = int(np.flatnonzero((values < 0) | (values >= self.vocab_size))[0])
            row = int(np.searchsorted(chunk.offsets, bad, side="right") - 1)
            raise BadSampleError(shard, where(row), f"token id {int(values[bad])} outside [0, {self.vocab_size}) "
                                 f"(model.vocab_size)", fix=_FIX)
        return values, (chunk.offsets - chunk.offsets[0]).astype(np.int64), doc_start


_FIX = "fix the data (data.on_bad_sample=skip is not available with data.lm_mode=stream)"


class _StreamDataset(IterableDataset):
    """This rank's batches from a position on; each worker takes every W-th batch."""

    def __init__(self, index: DatasetIndex, params: StreamParams, *, seed: int, dp_rank: int, rows: int,
                 vocab_size: int, max_epochs: int, start: tuple):
        self.index, self.params, self.seed, self.vocab_size = index, params, seed, vocab_size
        self.rows, self.max_epochs, self.start = rows, max_epochs, start
        self.mine = np.arange(dp_rank * params.batch_size, (dp_rank + 1) * params.batch_size)
        self.num_tokens = index.num_tokens

    def __iter__(self) -> Iterator[Batch]:
        return ship_failures(self._batches())

    def _batches(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # About two decoded chunks per row: where the row's targets are, and where their inputs are.
        store = TokenStore(self.index, vocab_size=self.vocab_size, max_chunks=2 * self.params.batch_size + 4)
        epoch, relayouts, segments, offset = self.start
        k = 0
        while not self.max_epochs or epoch < self.max_epochs:
            layout = make_layout(self.num_tokens, self.rows, segments)
            first, valid, _ = layout.positions(self.mine, 0, 1)
            store.pin(np.clip(first[valid][:, None] + np.arange(-2, 1), 0, self.num_tokens - 1).reshape(-1))
            for start, length in layout.chunk_offsets(self.params, seed=self.seed, epoch=epoch, relayouts=relayouts,
                                                      offset=offset):
                if k % workers == worker:
                    also = state_resets(self.params, seed=self.seed, epoch=epoch, relayouts=relayouts,
                                        offset=start, rows=self.rows, mine=self.mine)
                    yield build_batch(store, layout, self.mine, start, length, epoch=epoch, also_reset=also)
                k += 1
            epoch, relayouts, segments, offset = epoch + 1, 0, None, 0


def make_layout(num_tokens: int, rows: int, segments: np.ndarray | None) -> StreamLayout:
    """An epoch's fresh layout (segments None), or one re-laid out on resume."""
    return StreamLayout.initial(num_tokens, rows) if segments is None else StreamLayout(segments, rows)


def build_batch(store: TokenStore, layout: StreamLayout, rows: np.ndarray, offset: int, length: int, *,
                epoch: int, also_reset: np.ndarray | None = None) -> Batch:
    """The chunk `[offset, offset + length)` of `rows`: inputs, targets, lengths, resets (numpy).
    `also_reset` (one bool per row): rows whose state is also zeroed before the chunk's first column
    (`data.state_reset`, drawn by `state_resets`)."""
    pos, valid, seam = layout.positions(rows, offset, length)

    def at(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # past a row's end: 0 / False, nothing read
        tokens, starts = np.zeros(p.shape, np.int64), np.zeros(p.shape, bool)
        tokens[valid], starts[valid] = store.read(p[valid])
        return tokens, starts

    tok, doc = at(pos)
    prev, prev_doc = at(pos - 1)
    inputs = prev
    # A document's first token is not predicted (its context is another document), and the state is
    # zeroed before a document's first token goes in.
    targets = np.where(valid & ~doc, tok, IGNORE_INDEX).astype(np.int64)
    reset = seam | prev_doc
    if also_reset is not None:
        reset[:, 0] |= also_reset
    reset &= valid
    lengths = valid.sum(axis=1).astype(np.int64)
    first = np.where(valid[:, 0], store.sample_at(pos[:, 0]), -1).astype(np.int64)
    return Batch(inputs, lengths, targets, first, weight=1.0, epoch=epoch, consumed=offset + length,
                 tokens=int(lengths.sum()), items=int((targets != IGNORE_INDEX).sum()), reset=reset)


class StreamLoader:
    """Iterable of this rank's stream `Batch`es, with the layout's resume state (see stream.py)."""

    def __init__(self, index: DatasetIndex, params: StreamParams, *, seed: int, dp_rank: int, dp_world_size: int,
                 num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False, max_epochs: int = 0,
                 vocab_size: int = 0, agree: Callable[[int], bool] | None = None,
                 log: Callable[[str], object] = print, split: str = "train"):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} outside dp_world_size={dp_world_size}")
        self.index, self.params, self.seed = index, params, seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        if num_workers > 1:
            log(f"data: lm stream mode reads with 1 DataLoader worker, not data.num_workers={num_workers} (every "
                f"batch holds all of a rank's rows, so each worker would read every chunk again)")
            num_workers = 1
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.max_epochs, self.vocab_size, self.agree, self.log = max_epochs, vocab_size, agree, log
        self.rows = params.batch_size * dp_world_size
        self.num_tokens = index.num_tokens
        if self.num_tokens - 1 < self.rows:
            raise ValueError(f"the {split} stream has {max(0, self.num_tokens - 1)} targets, fewer than its "
                             f"{self.rows} rows (data.batch_size={params.batch_size} x {dp_world_size} ranks); "
                             f"lower data.batch_size")
        self.rewind()

    # ---- position
    def rewind(self) -> None:
        """Back to the start of epoch 0 (the validation loader, before each evaluation)."""
        self.epoch, self.relayouts, self.segments, self.offset = 0, 0, None, 0
        self._row_length_of: tuple[np.ndarray | None, int] | None = None

    @property
    def consumed(self) -> int:
        """Targets of every row consumed in the current layout."""
        return self.offset

    def make_layout(self, segments: np.ndarray | None = None) -> StreamLayout:
        return make_layout(self.num_tokens, self.rows, segments)

    def _row_length(self) -> int:
        """Targets per row of the current layout, computed when the layout changes, not per batch
        (the segments are replaced, never changed in place)."""
        if self._row_length_of is None or self._row_length_of[0] is not self.segments:
            self._row_length_of = (self.segments, self.make_layout(self.segments).row_length)
        return self._row_length_of[1]

    def layout_key(self) -> str:
        """Where the next batch continues: the carried LSTM state belongs to exactly this."""
        layout = self.make_layout(self.segments)
        return f"{self.epoch}:{self.relayouts}:{layout.key()}:{self.offset}:{self.dp_rank}"

    def plan_hash(self) -> int:
        """What every rank must agree on before it takes batches."""
        key = (f"{self.params.fingerprint()}|{self.index.fingerprint()}|{self.seed}|{self.epoch}|{self.relayouts}|"
               f"{self.make_layout(self.segments).key()}|{self.offset}|{self.dp_world_size}")
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "little")

    def describe(self) -> str:
        """One line about the layout, for the run log."""
        layout = self.make_layout(self.segments)
        return (f"lm stream: {self.num_tokens} tokens in {self.rows} rows of ~{layout.row_length} targets "
                f"({self.params.batch_size} per rank), {self.steps_per_epoch()} chunks of {self.params.bptt} "
                f"per epoch{' (variable length)' if self.params.jitter else ''}")

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Batches of a whole epoch (from its start) on every rank."""
        return len(self.make_layout().chunk_offsets(self.params, seed=self.seed, epoch=epoch, relayouts=0))

    # ---- iteration
    def __iter__(self) -> Iterator[Batch]:
        dataset = _StreamDataset(self.index, self.params, seed=self.seed, dp_rank=self.dp_rank, rows=self.rows,
                                 vocab_size=self.vocab_size, max_epochs=self.max_epochs,
                                 start=(self.epoch, self.relayouts, self.segments, self.offset))
        # Workers as the windows loader has them (distlstm/data/loader/workers.py): stop signals left to the
        # trainer, errors shipped whole, their own generator.
        with worker_batches(dataset, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor, seed=self.seed) as batches:
            checked = None
            for batch in batches:
                batch = batch.as_tensors()
                if self.agree is not None and checked != (self.epoch, self.relayouts):
                    if not self.agree(self.plan_hash()):
                        raise RuntimeError(
                            f"rank {self.dp_rank}: the stream layout of epoch {self.epoch} differs between ranks "
                            f"({self.params}, seed {self.seed}, dataset {self.index.fingerprint()}); every rank "
                            f"must see the same shards and data.* settings")
                    checked = (self.epoch, self.relayouts)
                self._advance(batch)
                yield batch

    def _advance(self, batch: Batch) -> None:
        if batch.epoch != self.epoch:  # the first batch of the next epoch: its fresh layout
            self.epoch, self.relayouts, self.segments = batch.epoch, 0, None
        self.offset = batch.consumed
        if self.offset >= self._row_length():
            self.epoch, self.relayouts, self.segments, self.offset = self.epoch + 1, 0, None, 0

    # ---- checkpoint
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "mode": "stream", "epoch": self.epoch, "relayouts": self.relayouts,
                "segments": None if self.segments is None else self.segments.tolist(), "rows": self.rows,
                "offset": self.offset, "world_size": self.dp_world_size, "seed": self.seed,
                "dataset": self.index.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the checkpoint stopped. Same number of rows: exactly (the carried state is
        restored with the rank's state). Another number (world size or data.batch_size changed): the
        targets not yet consumed are laid out afresh over the new rows, and the state starts at zero."""
        if state.get("version") != STATE_VERSION or state.get("mode") != "stream":
            raise ValueError(f"cannot resume: the checkpoint's data position is not a stream position "
                             f"(mode {state.get('mode', 'windows')!r}); data.lm_mode changed since the checkpoint? "
                             f"restore it, or start fresh with --checkpoint.resume never")
        for key, mine in (("seed", self.seed), ("dataset", self.index.fingerprint())):
            if state[key] != mine:
                raise ValueError(f"cannot resume the data position: {key} changed since the checkpoint "
                                 f"({state[key]} -> {mine}); restore the data.* settings and shards, or start "
                                 f"fresh with --checkpoint.resume never")
        segments = None if state["segments"] is None else np.asarray(state["segments"], np.int64).reshape(-1, 2)
        self.epoch, self.relayouts, self.offset = int(state["epoch"]), int(state["relayouts"]), int(state["offset"])
        if int(state["rows"]) == self.rows:
            self.segments = segments
            if int(state["world_size"]) != self.dp_world_size:
                self.log(f"stream: the checkpoint has {state['world_size']} ranks, this run {self.dp_world_size}: "
                         f"the stream continues at the same position over the same {self.rows} rows, and the "
                         f"carried LSTM state starts from zero")
            return
        saved = StreamLayout.initial(self.num_tokens, int(state["rows"])) if segments is None else \
            StreamLayout(segments, int(state["rows"]))
        rest = saved.remaining(self.offset)
        left = int(sum(rest[:, 1] - rest[:, 0]))
        self.log(f"stream: the checkpoint has {int(state['rows'])} rows ({state['world_size']} ranks), this run "
                 f"{self.rows}: the {left} targets of epoch {self.epoch} not yet trained are laid out again over "
                 f"{self.rows} rows, and the carried LSTM state starts from zero")
        self.segments, self.relayouts, self.offset = rest, self.relayouts + 1, 0
        if len(rest) == 0 or self.make_layout(rest).row_length == 0:
            self.epoch, self.relayouts, self.segments = self.epoch + 1, 0, None
        elif left < self.rows:
            raise ValueError(f"cannot resume on {self.rows} rows: only {left} targets of epoch {self.epoch} are "
                             f"left; lower data.batch_size or resume on fewer ranks")


def build_stream_loader(index: DatasetIndex, data_cfg, *, dp_rank: int, dp_world_size: int, vocab_size: int,
                        pin_memory: bool, agree=None, max_epochs: int = 0, num_workers: int | None = None,
                        log: Callable[[str], object] = print, split: str = "train") -> StreamLoader:
    """The stream loader of `split` with the data.* settings. data.state_reset applies to training
    only: evaluation carries the state over the whole stream (the standard perplexity)."""
    check_stream_data(index, split, log)
    params = StreamParams(batch_size=data_cfg.batch_size, bptt=data_cfg.bptt, jitter=data_cfg.bptt_jitter,
                          state_reset=data_cfg.state_reset if split == "train" else 0.0)
    return StreamLoader(index, params, seed=data_cfg.seed, dp_rank=dp_rank, dp_world_size=dp_world_size,
                        num_workers=data_cfg.num_workers if num_workers is None else num_workers,
                        prefetch_factor=data_cfg.prefetch_factor, pin_memory=pin_memory, max_epochs=max_epochs,
                        vocab_size=vocab_size, agree=agree, log=log, split=split)


def check_stream_data(index: DatasetIndex, split: str, log: Callable[[str], object] = print) -> None:
    """Say so when the data is prep's overlapping windows: without `doc_start` flags every row is a
    document of its own (so no token is trained twice), but no context crosses from one row to the next."""
    m = index.manifest
    if m is not None and m.extra.get("lm_layout") == "windows":
        log(f"stream: the {split} data was prepared as independent windows (prep --lm-layout windows): every row "
            f"is read as a document of its own, so the LSTM state is reset at each row; re-run distlstm.prep with "
            f"--lm-layout stream to carry context across rows, or set --data.lm_mode windows")

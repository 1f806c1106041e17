"""CUDA graphs for the training step (`train.cuda_graphs`).

An LSTM step on a GPU is thousands of small kernels (cuDNN runs the recurrence step by step), so
an eager step is bound by the host launching them. With bounded batch shapes (data.shape_buckets)
a run sees a few dozen shapes; `StepGraphs` captures each shape's step once and then replays it: one
launch per step instead of thousands.

What one graph holds (per micro-batch shape and role) is the step's own device body, the code an
eager step runs (distlstm/run/step.py, `TrainStep`), not a copy of it:
- every micro-batch but the last: `TrainStep.backward` (forward, masked loss scaled by the step's
  global item count, backward accumulating into the gradients) under DDP's no_sync;
- the last (with accum_steps=1, the whole step): the same with DDP's gradient all-reduce, then
  `TrainStep.update` (clipping, the non-finite guard, the fused optimizer), and zeroing the
  gradients for the next step.
`StepGraphs.step` returns what it did (`StepOutcome`); the trainer keeps its host counters and steps
its LR schedule itself. The graphs themselves come from a backend (`CudaGraphs`; tests run the
same orchestration on a CPU with tests/fake_graphs.py).
The LR schedule stays on the host: each replay first writes the group's LR into a device tensor the
captured optimizer reads; likewise the per-micro-batch loss scale. Inputs are copied into static
buffers (device to device: the loader already put the batch on the GPU).

Memory rules that make replays safe, in any order, from one shared memory pool: everything that
outlives a replay (parameters, gradients, optimizer state, the trainer's loss/grad-norm/bad-step
tensors, static inputs) is allocated outside the graphs and updated in place inside them; the
graph pool only ever holds a step's intermediates. Hence gradients are zeroed, never set to None,
while graphs are on.

When a step runs eagerly instead: a shape seen for the first time (its eager run is the warm-up:
cuDNN/cuBLAS state, optimizer state, DDP's bucket rebuild), DDP's first 11 iterations (the PyTorch
recipe for capturing DDP), the graph limit reached, or any rank not ready. Ranks agree on that
each step with one host all-reduce on the gloo control group, so a step is either graphs on every
rank or eager on every rank (NCCL all-reduces then match in kind and order).

lm stream mode (`train.cuda_graphs=on` only, until measured on a GPU): the reset mask and the carried
(h, c) are static buffers too; the graph runs the LSTM column by column, every column a possible reset
(`_record`), and writes the state after the last column back in place.

Capture needs the whole run on one non-default stream (DDP's retained AccumulateGrad nodes belong
to the stream DDP was built on): `use_training_stream` sets it before the model is wrapped. See
docs/design.md, "CUDA graphs", for what the PyTorch issues say about cuDNN RNNs and DDP in graphs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, NamedTuple

import torch

from distlstm.config import ConfigError
from distlstm.distributed.parallel import all_reduce_host, unwrap
from distlstm.run.bptt import Piece, uses_stream

DDP_WARMUP_STEPS = 11
"""Eager DDP iterations before the first capture (PyTorch's CUDA graphs notes, "Usage with
DistributedDataParallel"): DDP rebuilds its buckets and samples runtime statistics early on."""


def graphs_decision(cfg, device: torch.device, world_size: int = 1) -> tuple[bool, str]:
    """(use CUDA graphs, why) for `train.cuda_graphs` auto|on|off on `world_size` ranks; `on` where
    graphs cannot work raises ConfigError naming the setting at fault."""
    mode, t = cfg.train.cuda_graphs, cfg.train

    def refuse(why: str, fix: str) -> tuple[bool, str]:
        if mode == "on":
            raise ConfigError(f"train.cuda_graphs=on {why}; {fix}, or set --train.cuda_graphs auto|off")
        return False, why

    if mode == "off":
        return False, "train.cuda_graphs=off"
    if device.type != "cuda":
        return refuse(f"needs a CUDA device (the device is {device.type})", "run on a GPU")
    if world_size > 1 and t.backend == "gloo":
        return refuse(f"cannot capture gloo's gradient all-reduce (train.backend=gloo, {world_size} ranks: a host "
                      "operation, not a CUDA kernel)", "use --train.backend nccl (or auto)")
    if t.precision == "fp16":
        return refuse("does not support train.precision=fp16 (the GradScaler decides on the host whether a "
                      "step is skipped, one sync per step)", "use --train.precision bf16 (no scaler)")
    if cfg.model.bidirectional:
        return refuse("does not support model.bidirectional=true (packed sequences change shape with every "
                      "batch)", "use a unidirectional model")
    if t.debug:
        return refuse("does not work with train.debug (anomaly detection syncs with the host)",
                      "drop --train.debug")
    if cfg.data.too_long == "chunk":
        # Not yet: a batch's pieces vary in number with its length.
        return refuse("does not carry the LSTM state from one piece of a batch to the next (data.too_long=chunk)",
                      "set --data.too_long truncate")
    if uses_stream(cfg):
        # The carried (h, c) and the reset mask live in static buffers; the graph runs the LSTM column by
        # column so that a document may start at any column (StepGraphs._record). Not yet run on a GPU.
        if mode == "auto":
            return False, ("data.lm_mode=stream: graphs are opt-in (--train.cuda_graphs on) until measured on a "
                           "GPU")
        return True, "lm stream mode: the carried state and reset columns in static buffers, one shape"
    if cfg.data.shape_buckets == 0:
        if mode == "auto":
            return False, "data.shape_buckets=0 (every batch may be a new shape)"
        return True, "data.shape_buckets=0: only repeated shapes are captured, up to the limit"
    return True, "each batch shape's step captured once, then replayed"


def use_training_stream(device: torch.device) -> torch.cuda.Stream:
    """Run everything from here on (DDP construction included) on one side stream: a graph cannot
    be captured on the default stream, and capturing on another stream than the one the eager steps
    and DDP's gradient hooks use would make the capture wait on uncaptured work."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    torch.cuda.set_stream(stream)
    return stream


def allow_capture(optimizer: torch.optim.Optimizer) -> None:
    """Let `optimizer.step()` be captured. PyTorch refuses capture unless every group is
    `capturable`, and warns once when a capturable optimizer steps eagerly (our warm-up and fallback
    steps do, on purpose). The one private attribute we touch is set here."""
    for group in optimizer.param_groups:
        group["capturable"] = True
    optimizer._warned_capturable_if_run_uncaptured = True


class CudaGraphs:
    """The graph backend StepGraphs uses by default: CUDA graphs captured on the training stream,
    all from one memory pool (so graphs may replay in any order; see the module docstring).

    A backend has one method, `capture(body, setup)`: record `body()` (the step's device work) into
    a graph while `setup()` holds (what the body must see as it is recorded: the optimizer reading
    its LR from device tensors), and return the graph, whose `replay()` runs the recorded work again.
    Capturing runs nothing. Tests substitute a backend that runs on a CPU (tests/fake_graphs.py)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.current_stream(device)
        if self.stream == torch.cuda.default_stream(device):
            raise RuntimeError("StepGraphs needs the training stream set first (graphs.use_training_stream)")
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, body: Callable[[], None], setup: Callable[[], ContextManager]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with setup(), torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            body()
        return graph


class StepOutcome(NamedTuple):
    """What `StepGraphs.step` did: `replayed` the whole step, or left it to the eager path; this
    rank's real `items` and the step's `global_items` (all ranks: the eager step's loss scale)."""

    replayed: bool
    items: float
    global_items: float


@dataclass
class _Static:
    """A graph and the buffers it reads: the batch and the per-replay scalars."""

    inputs: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    scale: torch.Tensor   # the loss scale of this micro-batch: world size / global items x weight
    weight: torch.Tensor  # 1, or 0 for a filler batch
    graph: Any = None     # what the backend's capture returned (a torch.cuda.CUDAGraph)
    # lm stream mode: the reset mask (rows, columns) and the carried state, in and out (in place)
    reset: torch.Tensor | None = None
    h: torch.Tensor | None = None
    c: torch.Tensor | None = None


class StepGraphs:
    """Captures and replays the training step (`trainer.stepper`, distlstm/run/step.py) of `trainer`
    (a distlstm.run.trainer.Trainer). It reads the trainer's step, control group and world size and
    writes nothing of the trainer: `step` says what it did, the trainer keeps its counters."""

    def __init__(self, trainer, *, limit: int, log=print, backend=None):
        self.stepper, self.group, self.world_size = trainer.stepper, trainer.group, trainer.world.world_size
        self.limit, self.log = limit, log
        self.device = trainer.device
        self.backend = backend if backend is not None else CudaGraphs(self.device)
        model, optimizer = self.stepper.model, self.stepper.optimizer
        self.ddp = unwrap(model) is not model
        if self.ddp:
            # DDP times its hooks with CUDA events every 100th iteration; a capture falling on one of
            # those iterations would record the timing events into the graph. Sample (practically) never.
            model._set_ddp_runtime_logging_sample_rate(2**31 - 1)
        allow_capture(optimizer)
        self.graphs: dict[tuple, _Static] = {}
        self.seen: set[tuple] = set()
        self.eager_steps = 0
        self.replays = 0
        self.disabled = False
        self._told_limit = False
        # The LR the captured optimizer reads, one per parameter group; written before every replay.
        self.lrs = [torch.zeros((), dtype=torch.float32, device=self.device) for _ in optimizer.param_groups]

    # ------------------------------------------------------------------ per step
    def step(self, micro_batches: list) -> StepOutcome:
        """Run one optimizer step as graph replays if every rank can; `replayed=False`: the caller
        runs it eagerly (and this rank's shapes count as warmed up). The LR schedule and the host
        counters are the caller's."""
        keys = [_key(b, final=i == len(micro_batches) - 1) for i, b in enumerate(micro_batches)]
        ready = not self.disabled and all(k in self.graphs or self._may_capture(k) for k in keys)
        local_items = self.stepper.items(micro_batches)
        global_items, not_ready = all_reduce_host([local_items, 0.0 if ready else 1.0], self.group)
        if not_ready:
            self.seen.update(keys)
            self.eager_steps += 1
            return StepOutcome(False, local_items, global_items)
        scale = self.stepper.loss_scale(global_items)
        # Capture what is missing first (capturing runs nothing), so that a failed capture leaves
        # the step untouched for the eager path.
        for batch, key in zip(micro_batches, keys):
            if key not in self.graphs and not self._capture(key, batch, scale):
                self.eager_steps += 1
                return StepOutcome(False, local_items, global_items)
        self._load_lrs()
        for batch, key in zip(micro_batches, keys):
            static = self.graphs[key]
            self._load(static, batch, scale)
            static.graph.replay()
            if static.h is not None:
                self.stepper.carry.state = (static.h, static.c)  # where the replay left the carried state
        self.replays += 1
        return StepOutcome(True, local_items, global_items)

    def _may_capture(self, key: tuple) -> bool:
        if key not in self.seen or (self.ddp and self.eager_steps < DDP_WARMUP_STEPS):
            return False
        if len(self.graphs) >= self.limit:
            if not self._told_limit:
                self.log(f"cuda graphs: limit of {self.limit} graphs reached (train.cuda_graph_limit); "
                         f"steps of other shapes run eagerly")
                self._told_limit = True
            return False
        return True

    def _load(self, static: _Static, batch, scale: float) -> None:
        """Copy the batch into the graph's buffers and write the replay's scalars (all on the
        training stream, before the replay: no host sync; fill_ takes the value as a kernel argument)."""
        static.inputs.copy_(batch.inputs, non_blocking=True)
        static.lengths.copy_(batch.lengths, non_blocking=True)
        static.targets.copy_(batch.targets, non_blocking=True)
        static.scale.fill_(scale * batch.weight)
        static.weight.fill_(batch.weight)
        if static.h is not None:
            static.reset.copy_(batch.reset, non_blocking=True)
            state = self.stepper.carry.state
            if state is None:
                static.h.zero_()
                static.c.zero_()
            else:  # carried from the previous step (eager or replayed) or a checkpoint
                static.h.copy_(state[0])
                static.c.copy_(state[1])

    def _load_lrs(self) -> None:
        """The groups' LRs into the device tensors the captured optimizer reads (once per step)."""
        for lr, group in zip(self.lrs, self.stepper.optimizer.param_groups):
            lr.fill_(group["lr"])

    # ------------------------------------------------------------------ capture
    def _buffers(self, key: tuple) -> _Static:
        (in_shape, in_dtype), (tg_shape, tg_dtype), batch_rows, _ = key
        dev = self.device
        static = _Static(inputs=torch.zeros(in_shape, dtype=in_dtype, device=dev),
                         lengths=torch.ones(batch_rows, dtype=torch.int64, device=dev),
                         targets=torch.zeros(tg_shape, dtype=tg_dtype, device=dev),
                         scale=torch.zeros((), dtype=torch.float32, device=dev),
                         weight=torch.zeros((), dtype=torch.float32, device=dev))
        if self.stepper.carry.stream:
            lstm = unwrap(self.stepper.model).lstm
            state = self.stepper.carry.state
            dtype = state[0].dtype if state is not None else torch.float32
            layers = lstm.num_layers
            static.reset = torch.zeros(in_shape[:2], dtype=torch.bool, device=dev)
            static.h = torch.zeros((layers, batch_rows, lstm.proj_size or lstm.hidden_size), dtype=dtype, device=dev)
            static.c = torch.zeros((layers, batch_rows, lstm.hidden_size), dtype=dtype, device=dev)
        return static

    @contextlib.contextmanager
    def _device_lrs(self):
        """While a step is recorded: the optimizer reads its LR from `self.lrs` (device tensors the
        replays write) instead of baking in today's float; the floats are put back after."""
        groups = self.stepper.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        try:
            for g, lr in zip(groups, self.lrs):
                g["lr"] = lr
            yield
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr

    def _capture(self, key: tuple, batch, scale: float) -> bool:
        """Capture the graph for `key` (with `batch` in its buffers); False if capture failed in a
        single process (graphs are then off for the run; with several ranks it raises)."""
        final = key[-1]
        static = self._buffers(key)
        self._load(static, batch, scale)
        self._load_lrs()
        # Again at every capture: loading a checkpoint (after this object was made) resets the flags.
        allow_capture(self.stepper.optimizer)
        started = time.perf_counter()
        try:
            static.graph = self.backend.capture(lambda: self._record(static, final), self._device_lrs)
        except Exception as exc:
            self.disabled = True
            if self.world_size > 1:
                raise RuntimeError(f"CUDA graph capture of the training step failed ({type(exc).__name__}: {exc}); "
                                   f"run with --train.cuda_graphs off") from exc
            self.log(f"cuda graphs: capture failed ({type(exc).__name__}: {exc}); continuing eagerly "
                     f"(--train.cuda_graphs off skips the attempt)")
            return False
        self.graphs[key] = static
        self.log(f"cuda graphs: captured the {'step' if final else 'accumulation'} graph for batch shape "
                 f"{tuple(key[0][0])} ({len(self.graphs)} of at most {self.limit}; "
                 f"{(time.perf_counter() - started) * 1e3:.0f} ms)")
        return True

    def _record(self, static: _Static, final: bool) -> None:
        """The work captured for one micro-batch: the step's own device body (TrainStep.backward, and
        for the last micro-batch TrainStep.update), on the static buffers and scalars."""
        s = self.stepper
        resets = None
        if static.h is not None:
            # lm stream mode: start from the carried state in the static buffers, and let every column
            # be a reset column (rows zeroed where the static mask says so): the eager step splits the
            # LSTM at the batch's reset columns only, which a graph cannot know in advance. The same
            # math, one LSTM call per column.
            outside, s.carry.state = s.carry.state, (static.h, static.c)
            resets = [(col, static.reset[:, col]) for col in range(static.inputs.shape[1])]
        piece = Piece(static.inputs, static.lengths, static.targets, lengths_cpu=None, resets=resets, last=True)
        s.backward(piece, static.scale, static.weight, sync=final, autocast=s.amp.autocast(cache=False))
        if static.h is not None:
            h, c = s.carry.state  # the state after the last column, carried into the next step in place
            static.h.copy_(h)
            static.c.copy_(c)
            # Python runs once, at capture, not at a replay: leave the carrier as it was (step() points
            # it at the static state after each replay).
            s.carry.state = outside
        if final:
            s.update()
            s.zero_grads_in_place()

    def summary(self) -> str:
        return (f"cuda graphs: {len(self.graphs)} captured, {self.replays} steps replayed, "
                f"{self.eager_steps} eager")


def _key(batch, *, final: bool) -> tuple:
    """What a graph is specific to: input and target shapes and dtypes, rows, and its role."""
    return ((tuple(batch.inputs.shape), batch.inputs.dtype), (tuple(batch.targets.shape), batch.targets.dtype),
            int(batch.inputs.shape[0]), final)

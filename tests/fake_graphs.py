"""A graph backend that runs on a CPU, for testing StepGraphs' orchestration without a GPU.

`StepGraphs(trainer, ..., backend=FakeGraphs())` runs the real StepGraphs (warm-up, agreement
between ranks, the capture limit, eager fallback, static buffers, the device LRs) around a fake of
the one thing a CPU cannot do, recording a CUDA graph:

- `capture(body, setup)` records the step body (runs nothing, as a CUDA capture runs nothing);
- `replay()` re-runs that body on the same static buffers, under the same `setup` the capture saw
  (the optimizer reading its LR from the device tensors StepGraphs writes before each replay).

What a real graph would do differently, the fake turns into a failure instead of hiding it:
- a graph holds the addresses it was captured with: `watch` (a function returning the tensors that
  outlive a replay: parameters, gradients, optimizer state, the step's counters) is read at the
  first replay of each graph, and every later replay fails if one of them has moved (re-allocated,
  or a gradient set to None and made anew);
- a captured body cannot read a value back to the host: replays run under tests/sync_detector.py's
  `no_host_reads`.
The body re-run draws random numbers from the generator at replay time, as a CUDA graph's philox
offset advances with each replay: dropout masks are fresh every replay (see docs/design.md).
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch

from tests.sync_detector import no_host_reads


class FakeGraph:
    def __init__(self, body: Callable[[], None], setup: Callable[[], ContextManager],
                 watch: Callable[[], list[torch.Tensor]] | None):
        self.body, self.setup, self.watch = body, setup, watch
        self.replays = 0
        self.addresses: list[tuple[int, int]] | None = None

    def _addresses(self) -> list[tuple[int, int]]:
        return [(id(t), t.data_ptr()) for t in self.watch()] if self.watch is not None else []

    def replay(self) -> None:
        if self.addresses is not None and self._addresses() != self.addresses:
            raise AssertionError("a tensor the graph was captured with has moved: a CUDA graph would keep "
                                 "reading and writing the old memory")
        with self.setup(), no_host_reads():
            self.body()
        if self.addresses is None:
            self.addresses = self._addresses()
        self.replays += 1


class FakeGraphs:
    """The backend (see distlstm/run/graphs.py `CudaGraphs`). `fail`: make every capture raise it."""

    def __init__(self, watch: Callable[[], list[torch.Tensor]] | None = None, fail: str | None = None):
        self.watch, self.fail = watch, fail
        self.captured: list[FakeGraph] = []

    def capture(self, body: Callable[[], None], setup: Callable[[], ContextManager]) -> FakeGraph:
        if self.fail:
            raise RuntimeError(self.fail)
        graph = FakeGraph(body, setup, self.watch)
        self.captured.append(graph)
        return graph


def persistent_tensors(trainer) -> Callable[[], list[torch.Tensor]]:
    """What outlives a replay of `trainer`'s step: parameters, gradients, optimizer state, counters."""
    def tensors() -> list[torch.Tensor]:
        s = trainer.stepper
        out = [t for p in s.params for t in (p, p.grad) if t is not None]
        out += [v for state in s.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return out + [s.loss_sum, s.grad_norm, s.bad_run, s.skipped]
    return tensors

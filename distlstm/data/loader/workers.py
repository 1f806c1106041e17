"""DataLoader worker processes: how they treat stop signals, how their exceptions reach the training
process, and that none outlives it.

- `worker_init` (the DataLoader's worker_init_fn): workers ignore SIGTERM, SIGINT and SIGUSR1, which
  srun, scancel, torchrun's shutdown, `kill -TERM -<pgid>` and Ctrl-C send to every process of the
  job, so the trainer alone decides to stop (commit a checkpoint at the step boundary); they die
  with the trainer instead (PR_SET_PDEATHSIG), and leftovers are SIGKILLed at exit.
- `WorkerFailure`: an exception in a worker travels to the main process whole, instead of being
  rebuilt there from torch's 18-line "Caught X in DataLoader worker process 0" text.
- `worker_batches`: a loader's batches from its workers (or from its own process), all of the above
  applied, the workers stopped when the loader stops.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader


def worker_init(worker_id: int) -> None:
    """Leave stop signals to the training process. srun, scancel, torchrun's shutdown and
    `kill -TERM -<pgid>` signal every process of the job: a worker that died of it would fail the
    step in progress ("DataLoader worker ... killed by signal") before the trainer could commit the
    preemption checkpoint, and Ctrl-C would print a KeyboardInterrupt from each worker. A worker
    ignores them and dies with its parent instead (PR_SET_PDEATHSIG), so none outlives a killed trainer."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()


_started_workers: weakref.WeakSet = weakref.WeakSet()


def track_workers(batches) -> None:
    """Remember this DataLoader iterator's worker processes, so that `_kill_leftover_workers` can end
    them at exit. The one place that touches the private `_workers` (tests/test_hostile_data.py
    checks it is there)."""
    workers = getattr(batches, "_workers", None)
    if workers is None:
        raise RuntimeError("torch's DataLoader iterator has no `_workers` any more; update "
                           "distlstm.data.loader.workers.track_workers for this torch version")
    _started_workers.update(workers)


@atexit.register
def _kill_leftover_workers() -> None:
    """Workers ignore SIGTERM (see worker_init), and at interpreter exit torch's shutdown is a no-op
    while multiprocessing's own terminates (SIGTERM) then joins every daemonic child without a
    timeout: a worker whose iterator was still alive (an exception's traceback holding it) would
    hang the exit forever. SIGKILL them first (registered after multiprocessing's handler, so it
    runs before it)."""
    leftover = [p for p in list(_started_workers) if p.is_alive()]
    if leftover and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would report each of them as a worker that died ("killed by signal").
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in leftover:
        process.kill()


def _die_with_parent() -> None:
    """Die (SIGKILL) when the process that started this worker dies, and exit now if the training
    process is already gone. The worker's parent, which PR_SET_PDEATHSIG watches, is the training
    process under fork and spawn; under forkserver (Python 3.14's default on Linux) it is the
    forkserver, a child of the training process that exits as soon as the training process does
    (EOF on the pipe it holds from it), so the worker still dies with the trainer."""
    import ctypes
    import multiprocessing

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: DataLoader's own watchdog still ends the worker
        return
    trainer = multiprocessing.parent_process()  # the training process, whatever the start method
    if trainer is None:
        return
    parent = os.getppid()
    if parent != trainer.pid and _parent_pid(parent) != trainer.pid:
        os._exit(1)  # the training process (or its forkserver) died before the prctl


def _parent_pid(pid: int) -> int | None:
    """The parent of process `pid` (Linux /proc), or None if it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    fields = stat[stat.rfind(b")") + 1:].split()
    return int(fields[1]) if len(fields) > 1 else None


class WorkerFailure:
    """An exception raised in a DataLoader worker, yielded to the main process instead of raised.

    Raised in the worker, torch would re-raise it in the main process as `type(exc)(message)` with the
    message replaced by 18 lines of "Caught BadSampleError in DataLoader worker process 0 ... Original
    Traceback ...", the shard and row only at the very end. Shipped as an item, the main process
    raises the original exception (fields and message intact) with the worker's traceback as its
    cause, which --train.debug shows."""

    def __init__(self, exc: BaseException, traceback_text: str):
        self.exc, self.traceback_text = exc, traceback_text

    @classmethod
    def of(cls, exc: BaseException) -> "WorkerFailure":
        import pickle
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            pickle.loads(pickle.dumps(exc))  # an exception that does not survive pickling would be lost
        except Exception:  # noqa: BLE001
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        return cls(exc, text)

    def reraise(self) -> None:
        raise self.exc from WorkerTraceback(self.traceback_text)


@contextmanager
def worker_batches(dataset: Iterable, *, num_workers: int, pin_memory: bool, prefetch_factor: int | None,
                   seed: int) -> Iterator[Iterator]:
    """The batches of `dataset` (an IterableDataset yielding whole batches) from `num_workers`
    DataLoader worker processes, or from this process with 0 (where the DataLoader would only add
    per-batch overhead). Workers get a generator of their own: by default, starting them draws their
    base seed from the global torch RNG, which also drives dropout, so a resumed run's dropout would
    shift. On leaving the `with` the workers are stopped at once: after a worker error the
    exception's traceback keeps the DataLoader iterator alive, and its delayed shutdown waits 5 s
    per worker."""
    if num_workers:
        source = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 prefetch_factor=prefetch_factor, persistent_workers=False,
                                 generator=torch.Generator().manual_seed(seed), worker_init_fn=worker_init))
        track_workers(source)
        batches = raise_worker_failures(source)
    else:
        source = batches = (b.pin_memory() if pin_memory else b for b in iter(dataset))
    try:
        yield batches
    finally:
        batches.close()
        shutdown = getattr(source, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def ship_failures(batches: Iterator) -> Iterator:
    """A dataset's batches: in a DataLoader worker, an exception goes to the training process whole,
    as a `WorkerFailure` in place of a batch (`raise_worker_failures` raises it there); in the
    training process itself it is raised as it is."""
    from torch.utils.data import get_worker_info
    if get_worker_info() is None:
        yield from batches
        return
    try:
        yield from batches
    except Exception as exc:  # noqa: BLE001 -- shipped whole to the training process
        yield WorkerFailure.of(exc)


def raise_worker_failures(batches: Iterator) -> Iterator:
    """`batches`, raising the exception a worker shipped instead of a batch."""
    for batch in batches:
        if isinstance(batch, WorkerFailure):
            batch.reraise()
        yield batch


class WorkerTraceback(Exception):
    """Where a DataLoader worker's exception was raised (its traceback, as text)."""

    def __str__(self) -> str:
        return "the DataLoader worker's traceback:\n" + self.args[0]

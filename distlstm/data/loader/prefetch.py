"""Batches reach the GPU one step ahead, off the training thread's critical path.

`prefetch_to_device` wraps the loader's stream of pinned host batches. When it hands out batch k
(already on the device), the copy of batch k+1 is already queued on a side stream, so it runs while
step k's kernels run; the training stream waits for a copy with an event on the device, never with a
host sync. The training thread's per-batch work is issuing three asynchronous copies.

The loader's resume position must follow what the trainer received, not what was copied ahead:
BatchLoader updates it from each batch it yields (`Batch.epoch`, `Batch.consumed`), after this
generator, so the batch in flight is not counted.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from distlstm.data.batch import Batch


_COPY_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def copy_stream(device: torch.device) -> "torch.cuda.Stream":
    """The host-to-device copy stream of `device`: one per process and device, taken once. A new
    stream each epoch would cycle through torch's pool of side streams, one of which the CUDA-graph
    capture and replay of the step uses: a copy on it would serialise with the step."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COPY_STREAMS:
        _COPY_STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
    return _COPY_STREAMS[index]


def prefetch_to_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """`batches` moved to `device`, each copy issued one batch ahead. On CUDA the copies run on the
    device's copy stream (`copy_stream`) from pinned memory; elsewhere `to()` is a plain move (still
    one ahead, so the bookkeeping is the same on every device)."""
    stream = copy_stream(device) if device.type == "cuda" else None

    def issue(host: Batch) -> tuple[Batch, torch.cuda.Event | None]:
        host = host.as_tensors()
        if stream is None:
            return host.to(device), None
        with torch.cuda.stream(stream):
            moved = host.to(device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        return moved, copied

    source = iter(batches)
    first = next(source, None)
    pending = issue(first) if first is not None else None
    while pending is not None:
        batch, copied = pending
        following = next(source, None)
        pending = issue(following) if following is not None else None
        if copied is not None:
            consumer = torch.cuda.current_stream(device)
            consumer.wait_event(copied)
            # Allocated on the copy stream, used on the training stream: without this the allocator
            # could hand the memory to a later copy while the step still reads it.
            for t in (batch.inputs, batch.lengths, batch.targets):
                t.record_stream(consumer)
        yield batch

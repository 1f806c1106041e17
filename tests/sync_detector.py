"""Host syncs made loud: `no_host_reads()` makes every host read of a tensor raise `HostSync`.

On a GPU, reading a tensor on the host (`.item()`, `float(t)`, `int(t)`, `bool(t)`, `.tolist()`,
`.cpu()`, `.numpy()`) waits for every kernel queued before it: one such read in the training step
stops the host from running ahead, and makes CUDA graphs impossible. On a CPU nothing waits, so a
sync slips in unnoticed; under `no_host_reads()` it fails the test, naming the line.

Reads of tensors that live on the host in a GPU run too (the stream loader's reset mask) are
allowed at their call site: `ALLOWED` lists each (file, function) with why it reads no device
value. Calls made inside torch are attributed to the first frame of ours (e.g. `pad_packed_sequence`'s
`.cpu()` to the distlstm function that called it).

Not caught on a CPU: blocking host-to-device copies (`.to(device)` of a host tensor), ops whose
output size depends on the data (`nonzero`, boolean-mask indexing) and explicit synchronizes. On
a GPU, `torch.cuda.set_sync_debug_mode("error")` catches those (bench/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")

ALLOWED: dict[tuple[str, str], str] = {
    ("distlstm/run/bptt.py", "pieces"): "reads the stream loader's reset mask on the host batch, which stays on the host",
}

_ROOT = Path(__file__).resolve().parents[1]


class HostSync(AssertionError):
    """A host read of a tensor where the training step must not read one."""


def _call_site() -> tuple[str, str, int]:
    """(file relative to the repository, function, line) of the first caller outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path != Path(__file__) and "torch" not in path.parts:
            try:
                rel = path.resolve().relative_to(_ROOT).as_posix()
            except ValueError:
                rel = path.as_posix()
            return rel, frame.f_code.co_name, frame.f_lineno
        frame = frame.f_back
    return "?", "?", 0


@contextlib.contextmanager
def no_host_reads(allowed: dict[tuple[str, str], str] = ALLOWED):
    """Inside: a host read of a tensor raises HostSync, except at the call sites in `allowed`.
    Yields the list of allowed reads that happened, as (file, function, line, method)."""
    seen: list[tuple[str, str, int, str]] = []
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    own = {name for name in _READS if name in vars(torch.Tensor)}  # the rest come from the C base class

    def guard(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            file, function, line = _call_site()
            if (file, function) not in allowed:
                raise HostSync(f"{file}:{line} ({function}) reads a tensor on the host with Tensor.{name}: "
                               f"on a GPU this waits for every queued kernel")
            seen.append((file, function, line, name))
            return original(self, *args, **kwargs)
        return read

    for name in _READS:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)

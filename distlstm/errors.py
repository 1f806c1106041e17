"""Failures whose message says all there is to say: what, where, and the fix.

`python -m distlstm.train` prints these (and ValueError / OSError, which is how bad input and I/O
failures arrive) as one line and exits 2; `--train.debug` shows the traceback instead.
"""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException


class RunError(RuntimeError):
    """The run cannot go on, for a reason the message explains completely."""


# What main() reports as one line. CheckpointException derives from BaseException (so that DCP's
# own `except Exception` clauses let it through); it is listed so that `except` clauses here do not.
USER_ERRORS = (ValueError, OSError, RunError, CheckpointException)


def failure_text(exc: BaseException) -> str:
    """``Type: message`` of `exc`; a CheckpointException becomes its ranks' underlying errors instead
    of DCP's multi-line report with one traceback per rank."""
    if isinstance(exc, CheckpointException):
        parts = []
        for rank, failure in sorted(exc.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {failure_text(inner)}")
        return "; ".join(parts) or "CheckpointException"
    return f"{type(exc).__name__}: {exc}"


def message(exc: BaseException) -> str:
    """What main() prints for `exc`: its own message (which names file, key and fix), or for DCP's
    CheckpointException the underlying errors."""
    return failure_text(exc) if isinstance(exc, CheckpointException) else str(exc)

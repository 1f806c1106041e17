"""The one error type for unusable data, shared by the Parquet and tar readers and the loader."""

from __future__ import annotations

_DEFAULT_FIX = ("re-create the shard with `python -m distlstm.prep`, or let the loader skip bad samples "
                "(--data.on_bad_sample skip)")


class BadSampleError(ValueError):
    """A shard, or one sample in it, cannot be used as training data.

    ``shard`` is the (redacted) shard URL, ``where`` says where in it ("sample 000123", "row 17",
    "row group 3", "schema", "file"), ``problem`` what is wrong, ``fix`` what the user can do.
    Message: ``shard X: WHERE: PROBLEM; fix: FIX``.
    """

    def __init__(self, shard: str, where: str | int | None = None, problem: str | None = None,
                 fix: str | None = None):
        from distlstm.data.sources import redact  # late: sources imports fsspec

        if where is None and problem is None:
            # Re-created from a bare message (torch's DataLoader re-raises worker errors as
            # `type(exc)(message)`): keep the message, the fields are unknown.
            self.shard, self.where, self.problem, self.fix = None, None, None, None
            super().__init__(redact(str(shard)))
            return
        self.shard = redact(str(shard))
        self.where = where
        self.problem = redact(str(problem))
        self.fix = fix or _DEFAULT_FIX
        super().__init__(f"shard {self.shard}: {where}: {self.problem}; fix: {self.fix}")

    def __reduce__(self):
        # Exceptions pickle as type(exc)(*exc.args); keep the fields across worker processes.
        if self.shard is None:
            return (type(self), (self.args[0],))
        return (type(self), (self.shard, self.where, self.problem, self.fix))

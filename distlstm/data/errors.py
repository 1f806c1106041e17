"""The error types for unusable data, shared by the Parquet and tar readers, the loader and the trainer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from distlstm.data.sources import redact

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

        if where is None and problem is None:
            # Re-created from a bare message (torch's DataLoader re-raises worker errors as
            # `type(exc)(message)`): keep the message, the fields are unknown.
            self.shard, self.where, self.problem, self.fix = None, None, None, None
            super().__init__(redact(str(shard)))
            return
        self.shard = redact(str(shard))
        self.where = where
        # One line, always: Arrow's and tarfile's messages span several ("...thrift: TProtocolException:
        # Invalid data\n", "could not be opened successfully:\n- method gz: ...").
        self.problem = redact(" ".join(str(problem).split()))
        self.fix = fix or _DEFAULT_FIX
        super().__init__(f"shard {self.shard}: {where}: {self.problem}; fix: {self.fix}")

    def __reduce__(self):
        # Exceptions pickle as type(exc)(*exc.args); keep the fields across worker processes.
        if self.shard is None:
            return (type(self), (self.args[0],))
        return (type(self), (self.shard, self.where, self.problem, self.fix))


class TooManyBadSamples(ValueError):
    """With data.on_bad_sample=skip, more of the data was skipped than data.max_bad_fraction allows."""


# Below this many samples seen, a mid-run check could fail a run on the luck of its first batches
# (2 bad samples in a first batch of 64 is 3%); the check at the end of the run has no such floor.
_MIN_BAD_SAMPLES_MID_RUN = 10


def check_bad_fraction(bad: int, trained: int, max_fraction: float, *, final: bool,
                       quarantine_dir: Path | None = None) -> None:
    """Raise TooManyBadSamples when `bad` of `bad + trained` samples is more than `max_fraction`.

    Mid-run (`final=False`) only once at least ten bad samples would be needed to exceed it, so
    an unlucky first batch does not stop a run; at the end always, and a run that trained on no
    sample at all fails whatever the fraction.
    """
    seen = bad + trained
    if final and trained == 0 and seen:
        reason = f"every one of the {seen} samples seen was bad and skipped: nothing was trained"
        fix = "fix the data, or the model settings it is checked against (model.num_classes, model.vocab_size)"
    elif bad > max_fraction * seen and (final or seen * max_fraction >= _MIN_BAD_SAMPLES_MID_RUN
                                        or (max_fraction == 0 and bad)):
        reason = (f"{bad} of {seen} samples seen ({100 * bad / seen:.1f}%) were bad and skipped, more than "
                  f"data.max_bad_fraction={max_fraction}")
        fix = "fix the data, or raise data.max_bad_fraction if so many bad samples are expected"
    else:
        return
    raise TooManyBadSamples(f"data: {reason}; {_summary(quarantine_dir)}fix: {fix}")


def _summary(quarantine_dir: Path | None) -> str:
    """'most common problems: ... (in quarantine/); ' from this rank's quarantine file, if any."""
    if quarantine_dir is None or not quarantine_dir.is_dir():
        return ""
    counts: Counter = Counter()
    for path in sorted(quarantine_dir.glob("rank*.jsonl"))[:1]:  # this rank's view is enough for a summary
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                counts[f"{record.get('shard')}: {record.get('problem')}"] += 1
    if not counts:
        return ""
    top = "; ".join(what for what, _ in counts.most_common(3))
    return f"most common problems: {top} (every sample is listed in {quarantine_dir}); "

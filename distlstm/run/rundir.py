"""Where a run lives when `train.run_dir` is not given, and what starting a finished run again does.

The directory is derived from the command, not the clock: `runs/<config name>-<8 hex digits>`, the
digits a hash of the whole config as given (every section, except the few options in NOT_HASHED
that change how a run executes or reports but not what it trains: run_dir, resume, progress bar,
worker and thread counts, timeout, the data checks data.verify and data.max_bad_fraction, so that
a run stopped by too many bad samples resumes with a raised limit). So the same command (same
config file and overrides) always names the same directory: after a stop, a crash or a preemption, starting it again resumes from the
newest valid checkpoint there (`checkpoint.resume=auto`). Any changed option names a new
directory, so two different experiments never share one.

A finished run (its `final.json` is written last) is never overwritten silently: starting the
same command again prints where its results are and exits without training. To continue a finished
run for more steps, name its directory with `--train.run_dir` and raise `--train.max_steps`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from distlstm.config import Config, to_toml


# Options that change how a run executes or reports, not what it trains: left out of the hash, so
# e.g. `--log.progress false` or another worker count still finds (and resumes) the same run.
NOT_HASHED = {"train": ("run_dir", "threads", "timeout_s"), "checkpoint": ("resume",),
              "log": ("progress",), "data": ("num_workers", "prefetch_factor", "verify", "max_bad_fraction")}


def default_run_dir(cfg: Config, config_name: str = "default") -> str:
    defaults = Config()
    key = dataclasses.replace(cfg, **{
        section: dataclasses.replace(getattr(cfg, section),
                                     **{k: getattr(getattr(defaults, section), k) for k in keys})
        for section, keys in NOT_HASHED.items()})
    digest = hashlib.sha256(to_toml(key).encode()).hexdigest()[:8]
    return f"runs/{config_name}-{digest}"


def finished_message(cfg: Config, run_dir: Path) -> str | None:
    """A message when `run_dir` holds a finished run that this config would not train further."""
    try:
        final = json.loads((run_dir / "final.json").read_text())
    except (OSError, ValueError):
        return None
    step = int(final.get("step", 0))
    if cfg.train.max_steps and step < cfg.train.max_steps and final.get("stopped") == "finished":
        return None  # train.max_steps was raised: continue from the last checkpoint
    return (f"run directory {run_dir} already holds a finished run (step {step}, stopped: "
            f"{final.get('stopped', '?')}; results in {run_dir / 'final.json'}): nothing to train. To train "
            f"again, pass --train.run_dir with a new directory (or delete this one); to train it further, "
            f"pass --train.run_dir {run_dir} with a larger --train.max_steps")

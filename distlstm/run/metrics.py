"""What the run reports: per-interval meters, JSONL, TensorBoard and a progress bar on the leader."""

from __future__ import annotations

import json
import sys
import math
import time
from pathlib import Path

from tqdm import tqdm


class Reporter:
    """Writes metrics (leader only): stdout lines or a progress bar, `metrics.jsonl`, TensorBoard."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int | None, progress: bool,
                 tensorboard: bool, start_step: int = 0, sinks: list | None = None):
        self.enabled = enabled
        self.sinks = list(sinks or []) if enabled else []
        """Experiment trackers (distlstm/run/loggers.py): each gets every record metrics.jsonl gets."""
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        # A bar is for a terminal; in a batch log it would be thousands of
                        # carriage-return lines, so there the interval lines are printed instead.
                        disable=not (enabled and progress and sys.stderr.isatty())) if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for sink in self.sinks:
            sink.log(kind, step, values, record["time"])
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)
        if self.bar is not None and not self.bar.disable and kind == "train":
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.3g}")
        elif self.bar is None or self.bar.disable or kind != "train":
            self.print(f"[{kind}] step {step} " + " ".join(_fmt(k, v) for k, v in values.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"

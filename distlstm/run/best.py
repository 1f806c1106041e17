"""The best validation value so far: which checkpoint `checkpoint.keep_best` keeps, and when
`train.early_stop_patience` stops a run.

Both watch a metric of the evaluation the trainer logs (`valid_loss`, or `valid_<the task's metric>`:
valid_accuracy for classify/tag, valid_perplexity for lm, valid_mse for regress); the direction comes
from the Task (loss, perplexity and mse: lower is better; accuracy: higher). The record lives in
`TrainState.best` ({"keep_best": {"metric", "value", "step"}, "early_stop": {... "since"}}, "since"
= evaluations without a new best),
so it is saved in every checkpoint and a resumed run continues it. Every rank computes the same
evaluation (summed over ranks), so every rank takes the same decisions without talking.
"""

from __future__ import annotations

from distlstm.config import Config
from distlstm.tasks import Task


def metrics_of(task: Task) -> dict[str, bool]:
    """The metrics an evaluation of `task` reports, each with higher_is_better."""
    return {"valid_loss": False, f"valid_{task.metric}": task.higher_is_better}


def improves(value: float, best: float | None, higher_is_better: bool) -> bool:
    if best is None:
        return value == value  # nan never counts as a best
    return value > best if higher_is_better else value < best


class Watch:
    """The metrics `checkpoint.keep_best` and `train.early_stop_patience` follow, for one run."""

    def __init__(self, cfg: Config, task: Task, *, has_valid: bool):
        self.keep_best = cfg.checkpoint.keep_best
        self.patience = cfg.train.early_stop_patience
        self.stop_metric = cfg.train.early_stop_metric
        known = metrics_of(task)
        for key, metric in (("checkpoint.keep_best", self.keep_best),
                            ("train.early_stop_metric", self.stop_metric if self.patience else "")):
            if not metric:
                continue
            if metric not in known:
                raise ValueError(f"{key}={metric!r}: model.task={task.name!r} evaluates {', '.join(known)}; "
                                 f"use one of those")
            if not has_valid:
                raise ValueError(f"{key}={metric!r} needs validation data; set data.valid")
        self.higher = known

    def update(self, best: dict, result: dict, step: int, *, cadence: bool = True) -> tuple[bool, bool]:
        """Record an evaluation's `result` (valid_* values) in `best` (TrainState.best, in place);
        returns (keep_best's metric improved, early stopping says stop). `cadence=False` (the
        end-of-run evaluation) does not count toward the patience, so a finished run continued with a
        larger train.max_steps stops where one longer run would have."""
        improved = stop = False
        if self.keep_best and self.keep_best in result:
            entry = best.get("keep_best")
            if not entry or entry.get("metric") != self.keep_best:
                entry = best["keep_best"] = {"metric": self.keep_best, "value": None, "step": None}
            improved = improves(float(result[self.keep_best]), entry["value"], self.higher[self.keep_best])
            if improved:
                entry.update(value=float(result[self.keep_best]), step=step)
        if self.patience and cadence and self.stop_metric in result:
            entry = best.get("early_stop")
            if not entry or entry.get("metric") != self.stop_metric:
                entry = best["early_stop"] = {"metric": self.stop_metric, "value": None, "step": None, "since": 0}
            if improves(float(result[self.stop_metric]), entry["value"], self.higher[self.stop_metric]):
                entry.update(value=float(result[self.stop_metric]), step=step, since=0)
            else:
                entry["since"] += 1
            stop = entry["since"] >= self.patience
        return improved, stop

    def best_step(self, best: dict) -> int | None:
        """The step of keep_best's best checkpoint (after a resume)."""
        entry = best.get("keep_best") or {}
        return entry.get("step") if self.keep_best and entry.get("metric") == self.keep_best else None

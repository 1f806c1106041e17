"""What the run reports: per-interval meters, JSONL, TensorBoard and a progress bar on the leader."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distlstm.config import Config, to_dict
from distlstm.data.sources import redact


class Reporter:
    """Writes metrics (leader only): stdout lines or a progress bar, `metrics.jsonl`, TensorBoard."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int | None, progress: bool,
                 tensorboard: bool, start_step: int = 0, sinks: list | None = None):
        self.enabled = enabled
        self.sinks = list(sinks or []) if enabled else []
        """Experiment trackers (below): each gets every record metrics.jsonl gets."""
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
        else:
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


# ---------------------------------------------------------------------------------------------- experiment trackers
# Experiment trackers besides metrics.jsonl and TensorBoard: MLflow and Weights & Biases
# (`log.backends = "mlflow,wandb"`), each an optional extra.
#
# Every record the Reporter writes to metrics.jsonl (train and valid, at the log cadence) goes to each
# backend as `<kind>/<key>` at the same step, so the three agree; the resolved config goes as
# parameters / run config. Where the run goes is the backend's own business: MLflow reads
# MLFLOW_TRACKING_URI (a server, `sqlite:///mlflow.db` with the full mlflow package, or a folder
# `file:./mlruns`, which MLflow 3 accepts only with MLFLOW_ALLOW_FILE_STORE=true), W&B reads WANDB_MODE / WANDB_API_KEY
# (`WANDB_MODE=offline` needs no account; `wandb sync` uploads later). The backend's run id is kept
# in the run directory (`mlflow.json`, `wandb.json`), so a resumed run logs into the same tracker run.
# Only the leader rank logs.


EXTRAS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}  # backend -> (module, extra)


def backend_names(cfg: Config) -> list[str]:
    return [b.strip() for b in cfg.log.backends.split(",") if b.strip()]


def check_backends(cfg: Config) -> None:
    """A one-line error for a backend whose package is not installed (before any training)."""
    import importlib
    for name in backend_names(cfg):
        module, extra = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(f"log.backends={name} needs the {module} package: pip install 'distlstm[{extra}]' "
                             f"(or remove {name} from log.backends)") from None


def _numbers(kind: str, values: dict) -> dict[str, float]:
    return {f"{kind}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _params(cfg: Config) -> dict[str, str]:
    out = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            out[f"{section}.{key}"] = "***" if key == "storage_options" and value else redact(str(value))
    return out


class MlflowSink:
    def __init__(self, cfg: Config, run_dir: Path):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient()
        saved = run_dir / "mlflow.json"
        if saved.is_file():
            self.run_id = json.loads(saved.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(cfg.log.experiment)
            exp_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.log.experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            from mlflow.entities import Param
            self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in _params(cfg).items()])
            saved.write_text(json.dumps({"run_id": self.run_id, "experiment": cfg.log.experiment}))

    def log(self, kind: str, step: int, values: dict, timestamp: float) -> None:
        from mlflow.entities import Metric
        metrics = [Metric(k, v, int(timestamp * 1000), step) for k, v in _numbers(kind, values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path):
        import wandb
        saved = run_dir / "wandb.json"
        run_id = json.loads(saved.read_text())["run_id"] if saved.is_file() else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=cfg.log.experiment, name=run_dir.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=_params(cfg))
        saved.write_text(json.dumps({"run_id": run_id, "project": cfg.log.experiment}))

    def log(self, kind: str, step: int, values: dict, timestamp: float) -> None:
        self.run.log(_numbers(kind, values), step=step)

    def close(self) -> None:
        self.run.finish()


def build_sinks(cfg: Config, run_dir: Path) -> list[Any]:
    """The backends log.backends names (leader only); check_backends has checked they exist."""
    kinds = {"mlflow": MlflowSink, "wandb": WandbSink}
    sinks = []
    for name in backend_names(cfg):
        try:
            sinks.append(kinds[name](cfg, run_dir))
        except Exception as exc:  # the tracker's own exception types; say which backend and why, in one line
            for sink in sinks:
                sink.close()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"log.backends={name}: could not start a {name} run: {first}") from exc
    return sinks

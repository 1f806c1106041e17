"""Host cost per training step outside the model: what the training thread spends per step on
everything but launching the model's work (loader iterator, batch bookkeeping, counters, logging).

    python bench/host_path.py            # 80,000 ragged lm samples, 65,536-token batches, 1 worker
    python bench/host_path.py --quick    # smaller, for a smoke run
    python bench/host_path.py --device cuda   # on a GPU: batches copied to the device one ahead too

It runs the real `Trainer.fit` loop over the real loader (DataLoader worker process, bounded shapes
as on a GPU) with the model step left out (`train_step` does nothing), and records the training
thread's CPU time (time.thread_time: waiting for the worker does not count) between consecutive
steps. The model-free baseline is a bare loop over the same batches already in memory. Also printed:
what the per-step item count cost on the training thread before the loader counted it
((targets != -100).sum() on a 64k-token batch). Target: median host cost < 1 ms per step.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_e2e import lognormal_lengths, write_dataset  # noqa: E402

from distlstm.config import Config, DataConfig, ModelConfig, TrainConfig, LogConfig  # noqa: E402
from distlstm.data.shards.index import open_index  # noqa: E402
from distlstm.data.loader.batch_loader import build_loader  # noqa: E402
from distlstm.models.lstm import build_model  # noqa: E402
from distlstm.distributed.parallel import AmpPolicy  # noqa: E402
from distlstm.run.trainer import Trainer, build_optimizer  # noqa: E402
from distlstm.distributed.world import detect_world  # noqa: E402


class HostOnlyTrainer(Trainer):
    """The real fit() loop with the model step left out; records the training thread's CPU clock
    at every step."""

    clock: list[float]

    def train_step(self, micro_batches) -> None:
        self.clock.append(time.thread_time())


def per_step_ms(clock: list[float]) -> np.ndarray:
    return np.diff(np.asarray(clock)) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=80_000)
    ap.add_argument("--max-tokens", type=int, default=65_536)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.quick:
        a.samples, a.steps = 12_000, 40
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        lengths = lognormal_lengths(a.samples, 200, 0.8, 8, 1024)
        data = write_dataset(Path(tmp) / "data", lengths, 256, 1024, 20_000)
        index = open_index(str(data), cache_dir=Path(tmp) / "cache")
        cfg = Config(data=DataConfig(max_tokens=a.max_tokens, num_workers=a.workers, shape_buckets=64),
                     model=ModelConfig(task="lm", input="tokens", hidden_size=8, embed_size=8),
                     train=TrainConfig(max_steps=a.steps, eval_every=0), log=LogConfig(progress=False))

        def loader(workers: int):
            return build_loader(index, cfg.data, task="lm", dp_rank=0, dp_world_size=1, vocab_size=256,
                                num_classes=0, pin_memory=device.type == "cuda", run_dir=None,
                                num_workers=workers, device=device if device.type == "cuda" else None)

        model = build_model(cfg.model, vocab_size=256, input_size=0, num_classes=0).to(device)
        optimizer, scheduler = build_optimizer(model, cfg.optim, a.steps, device)
        rows = []
        for workers in sorted({a.workers, 0}, reverse=True):
            trainer = HostOnlyTrainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                                      amp=AmpPolicy("fp32", device), device=device, train_loader=loader(workers))
            trainer.clock = []
            trainer.fit()
            rows.append((f"distlstm Trainer.fit + loader ({workers} workers)", per_step_ms(trainer.clock[5:])))

        staged = list(islice(iter(loader(a.workers)), 64))
        clock = []
        for batch in staged * max(1, a.steps // 64):
            clock.append(time.thread_time())
            _ = batch  # a bare loop's host work per step besides the model: taking the next batch
        rows.append(("model-free baseline: bare loop over batches in memory", per_step_ms(clock)))

        counts = []
        for batch in staged:
            start = time.perf_counter()
            int((batch.targets != -100).sum())
            counts.append((time.perf_counter() - start) * 1e3)

    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {torch.get_num_threads()} torch threads; {a.samples} samples, max_tokens {a.max_tokens}, "
          f"bounded shapes (64), device {device}; {a.steps} steps")
    print(f"{'training-thread CPU time per step (ms)':58s} {'median':>8s} {'mean':>8s} {'p90':>8s}")
    for label, ms in rows:
        print(f"{label:58s} {np.median(ms):8.3f} {ms.mean():8.3f} {np.percentile(ms, 90):8.3f}")
    print(f"item count on the training thread before the loader counted it: {np.median(counts):.3f} ms per "
          f"step (median; now 0)")
    median = float(np.median(rows[0][1]))
    print(f"{'PASS' if median < 1.0 else 'FAIL'}: host cost outside the model {median:.3f} ms per step "
          f"(target < 1 ms; baseline {np.median(rows[-1][1]):.4f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

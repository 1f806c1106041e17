"""Distinct batch shapes and padding of the data plan, exact vs bounded (data.shape_buckets), on the
GPU benchmark's length distribution. Pure plan, CPU only, a few seconds: how the default of 64 was
chosen (docs/design.md, "Bounded shapes").

    python bench/plan_shapes.py
    python bench/plan_shapes.py --samples 80000 --rows-per-chunk 1024 --buckets 0 32 48 64 96

Every number is over one epoch of the plan: padding = 1 - real tokens / padded tokens, where a
bounded batch counts its full (rows x length) shape, dummy rows included.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distlstm.data.plan import shapes as bounded  # noqa: E402
from distlstm.data.plan.epoch import EpochPlan, PlanParams, padding_fraction  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=80_000)
    ap.add_argument("--rows-per-chunk", type=int, default=1024)
    ap.add_argument("--window-chunks", type=int, default=16)
    ap.add_argument("--budgets", type=int, nargs="+", default=[8192, 65536, 262144])
    ap.add_argument("--buckets", type=int, nargs="+", default=[0, 32, 48, 64, 96])
    ap.add_argument("--min-window-batches", type=int, default=bounded.MIN_WINDOW_BATCHES,
                    help="bounded windows hold at least this many batches of tokens (0: window_chunks only)")
    a = ap.parse_args()
    bounded.MIN_WINDOW_BATCHES = a.min_window_batches
    rng = np.random.default_rng(0)
    lengths = np.clip(np.exp(rng.normal(np.log(200), 0.8, a.samples)), 8, 1024).astype(np.int32)
    offsets = np.r_[np.arange(0, a.samples, a.rows_per_chunk), a.samples].astype(np.int64)
    print(f"{a.samples} samples, log-normal lengths (median 200, sigma 0.8, 8..1024), {a.rows_per_chunk} rows per "
          f"chunk, window_chunks {a.window_chunks}, bounded windows >= {a.min_window_batches} batches of tokens")
    print(f"{'max_tokens':>10s} {'shape_buckets':>13s} {'windows':>7s} {'batches':>7s} {'padding':>8s} "
          f"{'shapes':>6s} {'plan s':>6s}")
    for budget in a.budgets:
        for k in a.buckets:
            params = PlanParams(max_tokens=budget, min_batch_size=8, window_chunks=a.window_chunks, shape_buckets=k)
            started = time.perf_counter()
            plan = EpochPlan(offsets, lengths, params, seed=1, epoch=0)
            batches = [plan.batch(g) for g in range(plan.num_batches)]
            shapes = [plan.batch_shape(g) for g in range(plan.num_batches)] if k else None
            seconds = time.perf_counter() - started
            distinct = len(set(shapes)) if k else len({(len(b), int(lengths[b].max())) for b in batches})
            pad = padding_fraction(lengths, batches, 1024, shapes)
            print(f"{budget:10d} {k or 'exact':>13} {plan.num_windows:7d} {plan.num_batches:7d} {pad * 100:7.2f}% "
                  f"{distinct:6d} {seconds:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Planning memory and time against the number of samples (issue 17).

For each size (virtual datasets: chunks of `--rows` samples with lengths 4..64, as histograms,
distlstm/data/plan/chunks.py), a fresh process measures:
- open: building the per-chunk values (a real dataset: reading the index cache / footers);
- plan: the epoch plan of 8 ranks x 2 workers (16 streams), counts only (what the main process does);
- first batch: rank 3's first batch (one window materialised);
- walk: every batch of worker 0 of rank 3 for the epoch (sizes up to --walk-max);
- memory: resident (VmRSS) and peak (VmHWM) above the same process before it opened anything.

The baseline is the same measurement with every sample's length in an array (what the plan held
before, in every process): with `--baseline-src DIR` (a checkout of an earlier commit, e.g.
`git worktree add /tmp/old 2df030e`) it runs that commit's planner; without, today's planner fed
the array. Sizes above --baseline-max are not run for the baseline (4 bytes per sample, plus the
planner's temporaries). Prints a table, the ratios, and the growth fitted from 1e6 to 1e8.

    python bench/plan_scale.py                       # 1e6, 1e7, 1e8, 1e9
    python bench/plan_scale.py --baseline-src /tmp/old --sizes 1e6,1e7,1e8,1e9
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(key: str) -> float:
    """VmRSS / VmHWM of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(mode: str, n: int, rows: int, walk_max: int) -> dict:
    import numpy as np
    try:
        from distlstm.data.plan.epoch import EpochPlan, PlanParams
    except ImportError:  # an earlier layout (the baseline source, e.g. 2df030e)
        from distlstm.data.plan import EpochPlan, PlanParams  # type: ignore
    import importlib.util
    # Today's VirtualLengths (a pure module) generates the lengths in both modes, so both plan the
    # same data, whichever distlstm plans them.
    spec = importlib.util.spec_from_file_location("chunks_today", ROOT / "distlstm" / "data" / "plan" / "chunks.py")
    chunks = importlib.util.module_from_spec(spec)
    sys.modules["chunks_today"] = chunks  # dataclasses look their module up
    spec.loader.exec_module(chunks)
    VirtualLengths = chunks.VirtualLengths
    if mode == "chunks":
        from distlstm.data.plan.chunks import VirtualLengths  # the planner's own class

    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    virtual = VirtualLengths(num_chunks=n // rows, rows=rows, low=4, high=64, seed=1)
    params = PlanParams(max_tokens=16384, streams=16, max_length=1024, window_chunks=16)
    if mode == "chunks":
        stats = virtual.chunk_lengths()
        t1 = time.perf_counter()
        plan = EpochPlan.of(stats, params, seed=1, epoch=0)
        lengths_of = virtual.lengths_of
    else:
        offsets = np.arange(n // rows + 1, dtype=np.int64) * rows
        lengths = np.concatenate([np.repeat(b.lengths, b.counts).astype(np.int32) for b in virtual.blocks()])
        t1 = time.perf_counter()
        plan = EpochPlan(offsets, lengths, params, seed=1, epoch=0)
        lengths_of = None
    t2 = time.perf_counter()
    rss_plan = _status("VmRSS")
    walker = plan.with_lengths(lengths_of) if lengths_of is not None else plan
    walker.rank_batch(0, dp_rank=3, dp_world_size=8)
    t3 = time.perf_counter()
    walk = None
    if n <= walk_max:
        for i in range(0, walker.batches_per_rank(8), 2):  # worker 0 of 2
            walker.rank_batch(i, dp_rank=3, dp_world_size=8)
        walk = time.perf_counter() - t3
    return {"open_s": t1 - t0, "plan_s": t2 - t1, "first_batch_s": t3 - t2, "walk_s": walk,
            "rss_mb": rss_plan - rss0, "peak_mb": _status("VmHWM") - rss0, "batches": plan.num_batches,
            "chunks": n // rows}


def _run(mode: str, n: int, rows: int, walk_max: int, src: Path, timeout: int) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", mode, str(n), "--rows", str(rows), "--walk-max", str(walk_max)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, unit="") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}{unit}" if v < 100 else f"{v:.0f}{unit}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e6,1e7,1e8,1e9", help="comma-separated sample counts")
    ap.add_argument("--rows", type=int, default=1024, help="samples per chunk (row group)")
    ap.add_argument("--walk-max", type=float, default=1e8, help="largest size whose epoch is walked")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="a checkout of an earlier commit to plan the baseline with (default: today's planner "
                         "fed every sample's length)")
    ap.add_argument("--baseline-max", type=float, default=1e8, help="largest size run for the baseline")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), args.rows, int(args.walk_max))))
        return
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    src = (args.baseline_src or ROOT).resolve()
    results = {}
    print(f"{'samples':>8} {'mode':>9} {'chunks':>8} {'open s':>7} {'plan s':>7} {'1st batch s':>11} "
          f"{'walk s':>7} {'RSS MB':>7} {'peak MB':>8}")
    for n in sizes:
        for mode in ("chunks", "per-sample"):
            if mode == "per-sample" and n > args.baseline_max:
                continue
            r = _run(mode, n, args.rows, int(args.walk_max), src if mode == "per-sample" else ROOT, args.timeout)
            results[(n, mode)] = r
            if "error" in r:
                print(f"{n:>8.0e} {mode:>9}  {r['error']}")
                continue
            print(f"{n:>8.0e} {mode:>9} {r['chunks']:>8} {_fmt(r['open_s']):>7} {_fmt(r['plan_s']):>7} "
                  f"{_fmt(r['first_batch_s']):>11} {_fmt(r['walk_s']):>7} {_fmt(r['rss_mb']):>7} "
                  f"{_fmt(r['peak_mb']):>8}", flush=True)
    print("\nratios per-sample / chunks (same run):")
    for n in sizes:
        a, b = results.get((n, "chunks")), results.get((n, "per-sample"))
        if a and b and "error" not in a and "error" not in b:
            t_a = a["open_s"] + a["plan_s"] + a["first_batch_s"]
            t_b = b["open_s"] + b["plan_s"] + b["first_batch_s"]
            print(f"  {n:.0e}: open->first batch {t_b / t_a:.1f}x, peak memory {b['peak_mb'] / max(a['peak_mb'], 1):.1f}x")
    good = [n for n in sizes if 10**6 <= n <= 10**8 and "error" not in results[(n, "chunks")]]
    if len(good) >= 2:
        lo, hi = results[(good[0], "chunks")], results[(good[-1], "chunks")]
        decades = math.log10(good[-1] / good[0])
        for key in ("plan_s", "peak_mb"):
            growth = (max(hi[key], 1e-3) / max(lo[key], 1e-3)) ** (1 / decades)
            print(f"fitted growth of {key} per 10x samples (chunks, {good[0]:.0e}..{good[-1]:.0e}): {growth:.2f}x "
                  f"(the chunk count grows 10x)")
    if 10**9 in sizes and "error" not in results.get((10**9, "chunks"), {"error": 1}):
        r = results[(10**9, "chunks")]
        t = r["open_s"] + r["plan_s"] + r["first_batch_s"]
        print(f"1e9: open to first batch {t:.1f} s (target <= 10), peak {r['peak_mb']:.0f} MB above an empty "
              f"process (target <= 256)")


if __name__ == "__main__":
    main()

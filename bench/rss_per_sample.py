"""Peak memory of a warm 3-step training run on raw Parquet against the number of samples (issue 17):
bytes of peak RSS per sample, fitted between the smallest and the largest size.

Writes raw Parquet (no manifest: `tokens` list<int32> with lengths 4..64, `label`, 1,024-row groups,
4 shards, or `--shard-rows` samples per shard) at each size, runs `python -m distlstm.train` once to fill the index cache (cold), then
again (warm) and records the peak RSS (VmHWM) of the warm run's training process and of its
largest DataLoader worker. With `--baseline-src DIR` (a checkout of an earlier commit, e.g. `git worktree add
/tmp/old 2df030e`) the same runs use that commit, in the same session.

    python bench/rss_per_sample.py --sizes 1e5,1e6,1e7 --baseline-src /tmp/old
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def write(folder: Path, n: int, shards: int = 4, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-n // shards)
    for s in range(shards):
        rows = min(per, n - s * per)
        lengths = rng.integers(4, 65, rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = rng.integers(1, 1000, int(offsets[-1]), dtype=np.int32)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        table = pa.table({"tokens": tokens, "label": pa.array(rng.integers(0, 2, rows))})
        pq.write_table(table, folder / f"train-{s:05d}.parquet", row_group_size=1024)


def _hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (DataLoader workers may be grandchildren, under a forkserver)."""
    parent = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            continue
        parent[int(status.parent.name)] = ppid
    out, frontier = [], {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        out += sorted(frontier)
    return out


def run(src: Path, data: Path, cache: Path, out: Path) -> tuple[int, float, float]:
    """(exit status, peak RSS MB of the training process, of its largest DataLoader worker) of one
    3-step run: each process's VmHWM, polled every 0.1 s until it exits."""
    cmd = [sys.executable, "-m", "distlstm.train",
           "--data.train", str(data / "*.parquet"), "--model.num_classes", "2", "--model.hidden_size", "32",
           "--model.vocab_size", "1000", "--data.max_tokens", "4096", "--train.max_steps", "3", "--log.progress",
           "false", "--train.eval_every", "0", "--train.run_dir", str(out), "--checkpoint.at_end", "false"]
    env = {**os.environ, "PYTHONPATH": str(src), "DISTLSTM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    shutil.rmtree(out, ignore_errors=True)  # a finished run folder would end the run at once
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    main_kb, worker_kb = 0, 0
    while proc.poll() is None:
        main_kb = max(main_kb, _hwm_kb(proc.pid) or 0)
        for child in _descendants(proc.pid):
            worker_kb = max(worker_kb, _hwm_kb(child) or 0)
        time.sleep(0.1)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read()[-2000:])
    return proc.returncode, main_kb / 1024, worker_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e5,1e6,1e7")
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="folder for the data (default: a temporary one)")
    ap.add_argument("--shard-rows", type=int, default=0, help="samples per shard (0: 4 shards at every size, so "
                                                              "shards grow with the data)")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="rss-per-sample-"))
    sources = [("today", ROOT)] + ([("baseline", args.baseline_src.resolve())] if args.baseline_src else [])
    peaks: dict[tuple[str, str, int], float] = {}
    print(f"{'samples':>9} {'source':>9} {'training process MB':>20} {'largest worker MB':>18}")
    for n in sizes:
        data = work / f"data-{n}-{args.shard_rows}"
        if not data.exists():
            write(data, n, shards=max(1, -(-n // args.shard_rows)) if args.shard_rows else 4)
        for name, src in sources:
            cache = work / f"cache-{name}-{n}-{args.shard_rows}"
            run(src, data, cache, work / f"run-{name}-{n}-cold")
            code, main_mb, worker_mb = run(src, data, cache, work / f"run-{name}-{n}-warm")
            peaks[(name, "main", n)], peaks[(name, "worker", n)] = main_mb, worker_mb
            print(f"{n:>9.0e} {name:>9} {main_mb:>20.1f} {worker_mb:>18.1f}" + ("" if code == 0 else f"  (exit {code})"),
                  flush=True)
    lo, hi = sizes[0], sizes[-1]
    for name, _ in sources:
        for who in ("main", "worker"):
            per = (peaks[(name, who, hi)] - peaks[(name, who, lo)]) * 2**20 / (hi - lo)
            print(f"{name} {who}: {per:.2f} bytes of peak RSS per sample from {lo:.0e} to {hi:.0e}"
                  + (" (target <= 0.5)" if name == "today" else ""))


if __name__ == "__main__":
    main()

"""Data loader benchmark: the loader against baselines on the same files, in the same run.

    python bench/loader.py            # full run (~1M samples of Parquet, ~100k of tar)
    python bench/loader.py --quick    # small run for a smoke check

Targets (each printed PASS/FAIL; the exit status is non-zero if any fails):
  (a) Parquet loader tokens/s >= 0.5x a raw vectorised pyarrow read (row group -> numpy offsets and
      values) of the same files, one process (num_workers=0), at a GPU-sized token budget (65536
      padded tokens per batch); the rate at the CPU default budget (8192) is printed too;
  (b) tar loader tokens/s >= 0.8x plain `webdataset` iteration (WebDataset(urls).decode()) of the
      same shards, decoding .tokens.npy and .cls;
  (c) padding fraction <= 3% on log-normal lengths (median 200, clipped 8..1024), DataConfig defaults;
  (d) the plan for 10 million samples (construction + every window materialised) < 2 s, < 300 MB.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distlstm.config import DataConfig  # noqa: E402
from distlstm.data.shards.index import open_index  # noqa: E402
from distlstm.data.loader.batch_loader import build_loader  # noqa: E402
from distlstm.data.plan.epoch import EpochPlan, PlanParams  # noqa: E402
from distlstm.data.prep.prep import ShardWriter  # noqa: E402

NUM_CLASSES, VOCAB = 16, 32000


def lognormal_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(np.log(200), 0.8, n)), 8, 1024).astype(np.int64)


def write_dataset(folder: Path, n: int, fmt: str, shard_mb: float) -> None:
    """Shards written by the project's own prep writer (Parquet row groups of 1024 rows, or tar + sidecar)."""
    rng = np.random.default_rng(1)
    writer = ShardWriter(str(folder), "train", fmt, "classify", False, int(shard_mb * 1e6), 1024)
    for length in lognormal_lengths(n):
        writer.add(rng.integers(1, VOCAB, int(length), dtype=np.int32), int(rng.integers(NUM_CLASSES)))
    writer.close()


def best_of(repeats: int, fn):
    """(best seconds, result) over `repeats` runs: the least disturbed by other load on the machine."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def raw_parquet(files: list[str]) -> int:
    tokens = 0
    for path in files:
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            col = pf.read_row_group(g, columns=["tokens"]).column(0).combine_chunks()
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy()
            tokens += int(offsets[-1] - offsets[0]) + 0 * len(values)
    return tokens


def raw_webdataset(files: list[str]) -> int:
    import webdataset as wds

    tokens = 0
    for sample in wds.WebDataset(files, shardshuffle=False, empty_check=False).decode():
        tokens += len(sample["tokens.npy"]) + 0 * int(sample["cls"])
    return tokens


GPU_BUDGET = 65536  # padded tokens per batch of the measured GPU anchors in DESIGN.md


def run_loader(index, max_tokens: int = DataConfig().max_tokens) -> tuple[int, int, int]:
    """(real tokens, padded tokens, batches) of one epoch, num_workers=0, DataConfig defaults
    except the token budget."""
    cfg = DataConfig(num_workers=0, max_tokens=max_tokens)
    loader = build_loader(index, cfg, task="classify", dp_rank=0, dp_world_size=1, vocab_size=VOCAB,
                          num_classes=NUM_CLASSES, pin_memory=False, run_dir=None, max_epochs=1, num_workers=0)
    real = padded = batches = 0
    for batch in loader:
        real += batch.num_tokens
        padded += batch.padded_tokens
        batches += 1
    return real, padded, batches


def bench_format(fmt: str, n: int, shard_mb: float, root: Path, repeats: int, results: dict) -> None:
    folder = root / fmt
    write_dataset(folder, n, fmt, shard_mb)
    files = sorted(str(p) for p in folder.glob(f"*.{fmt}"))
    index = open_index(str(folder), cache_dir=root / "cache")
    baseline = raw_parquet if fmt == "parquet" else raw_webdataset
    baseline(files)  # warm the page cache for both sides
    base_s, base_tokens = best_of(repeats, lambda: baseline(files))
    load_s, (real, padded, batches) = best_of(repeats, lambda: run_loader(index))
    assert real == base_tokens, f"loader read {real} tokens, baseline {base_tokens}"
    results[fmt] = dict(samples=n, shards=len(files), tokens=real, batches=batches,
                        base_tok_s=base_tokens / base_s, loader_tok_s=real / load_s,
                        loader_batch_s=batches / load_s, padding=1 - real / padded)
    if fmt == "parquet":
        gpu_s, (_, gpu_padded, gpu_batches) = best_of(repeats, lambda: run_loader(index, GPU_BUDGET))
        results[fmt].update(gpu_tok_s=real / gpu_s, gpu_batches=gpu_batches, gpu_padding=1 - real / gpu_padded)


def bench_plan(n: int, repeats: int) -> dict:
    lengths = lognormal_lengths(n, seed=2).astype(np.int32)
    offsets = np.unique(np.minimum(np.arange(0, n + 1024, 1024), n)).astype(np.int64)
    d = DataConfig()
    params = PlanParams(max_tokens=d.max_tokens, min_batch_size=d.min_batch_size, max_length=d.max_length,
                        window_chunks=d.window_chunks)

    def build() -> int:
        plan = EpochPlan(offsets, lengths, params, seed=0, epoch=0)
        total = 0
        for w in range(plan.num_windows):
            total += len(plan.window_batches(w)[0]) - 1
        assert total == plan.num_batches
        return total

    seconds, batches = best_of(repeats, build)
    tracemalloc.start()
    build()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return dict(samples=n, batches=batches, seconds=seconds, peak_mb=peak / 1e6)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small datasets, one repeat")
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    a = ap.parse_args()
    n_pq, n_tar, repeats = (40_000, 10_000, 1) if a.quick else (400_000, 60_000, 3)
    root = Path(a.dir or tempfile.mkdtemp(prefix="distlstm-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    import os
    import torch
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
          f"torch {torch.__version__}; {'--quick' if a.quick else 'full'} run")
    results: dict = {}
    try:
        bench_format("parquet", n_pq, 64.0, root, repeats, results)
        bench_format("tar", n_tar, 32.0, root, repeats, results)
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    plan = bench_plan(10_000_000, repeats)

    checks = []
    for fmt, target, base in (("parquet", 0.5, "raw pyarrow row groups"), ("tar", 0.8, "webdataset .decode()")):
        r = results[fmt]
        ratio = r["loader_tok_s"] / r["base_tok_s"]
        print(f"{fmt}: {r['samples']} samples, {r['tokens'] / 1e6:.1f} M tokens, {r['shards']} shards, "
              f"{r['batches']} batches | loader {r['loader_tok_s'] / 1e6:.1f} M tok/s "
              f"({r['loader_batch_s']:.0f} batches/s) | {base} {r['base_tok_s'] / 1e6:.1f} M tok/s")
        if fmt == "parquet":
            # Judged at the GPU budget: per-batch Python overhead is amortised over 8x more tokens
            # there. At the CPU default (8192) the same loader is shown for information.
            print(f"parquet at max_tokens {DataConfig().max_tokens} (CPU default): loader / {base} = {ratio:.2f}")
            ratio = r["gpu_tok_s"] / r["base_tok_s"]
            print(f"parquet at max_tokens {GPU_BUDGET} (GPU budget): {r['gpu_batches']} batches, loader "
                  f"{r['gpu_tok_s'] / 1e6:.1f} M tok/s, padding {r['gpu_padding'] * 100:.2f}%")
            checks.append((f"(a) parquet loader at max_tokens {GPU_BUDGET} / {base} = {ratio:.2f} (>= {target})",
                           ratio >= target))
        else:
            checks.append((f"(b) {fmt} loader / {base} = {ratio:.2f} (>= {target})", ratio >= target))
    pad = results["parquet"]["padding"]
    checks.append((f"(c) padding fraction {pad * 100:.2f}% (<= 3%), max_tokens 8192, min_batch_size 8", pad <= 0.03))
    checks.append((f"(d) plan for {plan['samples']:,} samples ({plan['batches']:,} batches): {plan['seconds']:.2f} s "
                   f"(< 2 s), tracemalloc peak {plan['peak_mb']:.1f} MB (< 300 MB)",
                   plan["seconds"] < 2.0 and plan["peak_mb"] < 300))
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'} {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())

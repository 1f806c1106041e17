"""A short torch.profiler summary of distlstm's training step on ragged data: kernel launches, kernels
and GPU busy time per step, eager and with CUDA graphs (issue 8: ~3,700 launches per eager step).

    python bench/gpu_profile.py                  # on a GPU: H=1024 x 2, bf16, 65,536-token batches
    python bench/gpu_profile.py --tiny           # any machine: small sizes (CPU: eager only)
    python bench/gpu_profile.py --out DIR        # also write DIR/<mode>.json (Chrome traces)

The pieces are built as `python -m distlstm.train` builds them (index, model, auto settings, loader
with device prefetch, Trainer, StepGraphs). A fixed set of the loader's batches is stepped through
three times (warm-up: a shape's first step is eager, its second captures) and profiled on the fourth.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_e2e import lognormal_lengths, write_dataset  # noqa: E402

from distlstm.run.autotune import resolve_auto  # noqa: E402
from distlstm.config import load_config  # noqa: E402
from distlstm.data.shards.index import open_index  # noqa: E402
from distlstm.data.loader.batch_loader import build_loader  # noqa: E402
from distlstm.run.graphs import StepGraphs, use_training_stream  # noqa: E402
from distlstm.models.lstm import build_model  # noqa: E402
from distlstm.distributed.parallel import AmpPolicy  # noqa: E402
from distlstm.run.trainer import Trainer, build_optimizer  # noqa: E402
from distlstm.distributed.world import detect_world  # noqa: E402

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cuGraphLaunch", "cudaMemcpyAsync",
                "cudaMemsetAsync")


def build(args, data: Path, cache: Path, graphs: bool, device: torch.device):
    overrides = ["--model.task", "lm", "--data.lm_mode", "windows", "--model.input", "tokens", "--model.embed_size", str(args.hidden), "--model.hidden_size", str(args.hidden),
                 "--model.num_layers", str(args.layers), "--data.max_tokens", str(args.max_tokens),
                 "--data.num_workers", "1", "--train.precision", args.precision,
                 "--train.cuda_graphs", "on" if graphs else "off", "--data.shape_buckets", str(args.shape_buckets)]
    cfg = load_config(None, overrides)
    index = open_index(str(data), cache_dir=cache)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=index.manifest.vocab_size, input_size=0, num_classes=0).to(device)
    amp = AmpPolicy(cfg.train.precision, device)
    cfg = resolve_auto(cfg, device=device, model=model, amp=amp, log=lambda m: None)
    if cfg.train.cuda_graphs == "on":
        use_training_stream(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, 10_000, device)
    loader = build_loader(index, cfg.data, task="lm", dp_rank=0, dp_world_size=1, vocab_size=index.manifest.vocab_size,
                          num_classes=0, pin_memory=device.type == "cuda", run_dir=None,
                          device=device if device.type == "cuda" else None)
    trainer = Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler, amp=amp,
                      device=device, train_loader=loader)
    if cfg.train.cuda_graphs == "on":
        trainer.graphs = StepGraphs(trainer, limit=256, log=lambda m: None)
    return trainer, loader


def profile_mode(args, data: Path, cache: Path, graphs: bool, device: torch.device, out: Path | None) -> dict:
    trainer, loader = build(args, data, cache, graphs, device)
    it = iter(loader)
    batches = list(islice(it, args.batches))
    it.close()
    for _ in range(3):
        for b in batches:
            trainer.train_step([b])
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for b in batches:
            trainer.train_step([b])
        sync(device)
    wall = time.perf_counter() - started
    if out is not None:
        prof.export_chrome_trace(str(out / f"{'graphs' if graphs else 'eager'}.json"))
    n = len(batches)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernel_count = sum(e.count for e in kernels)
    busy_us = sum(e.self_device_time_total for e in kernels)
    tokens = sum(b.num_tokens for b in batches)
    summary = {"mode": "cuda graphs" if graphs else "eager", "steps": n, "wall_ms_per_step": wall / n * 1e3,
               "launch_calls_per_step": launches / n, "kernels_per_step": kernel_count / n,
               "gpu_busy_ms_per_step": busy_us / n / 1e3, "tokens_per_s": tokens / wall,
               "replayed": getattr(trainer.graphs, "replays", 0)}
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    summary["top"] = events.table(sort_by=sort, row_limit=args.top)
    return summary


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", "--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=65_536)
    ap.add_argument("--shape-buckets", type=int, default=64)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.tiny:
        args.samples, args.hidden, args.layers, args.max_tokens, args.batches = 2000, 32, 1, 4096, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "data", lognormal_lengths(args.samples, 200, 0.8, 8, 1024), 256, 1024, 20_000)
        modes = [False, True] if device.type == "cuda" else [False]
        results = []
        for graphs in modes:
            results.append(profile_mode(args, data, Path(tmp) / "cache", graphs, device, out))
            torch.cuda.set_stream(torch.cuda.default_stream()) if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}; H={args.hidden} x {args.layers}, {args.precision}, max_tokens {args.max_tokens}; "
          f"{args.batches} profiled steps per mode")
    for r in results:
        print(f"\n== {r['mode']}: {r['wall_ms_per_step']:.2f} ms per step, {r['launch_calls_per_step']:.0f} launch "
              f"calls per step, {r['kernels_per_step']:.0f} kernels per step, GPU busy "
              f"{r['gpu_busy_ms_per_step']:.2f} ms per step, {r['tokens_per_s'] / 1e6:.3f} M tok/s "
              f"(replayed steps so far: {r['replayed']})")
        print(r["top"])
    if device.type != "cuda":
        print("cuda graphs: not measured (no CUDA device)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Checkpoint benchmarks: save/load throughput, the training stall of sync vs async save, resume cost.

    python bench/checkpoint.py            # ~97M-parameter LSTM LM + AdamW, 200k-sample dataset (a few minutes)
    python bench/checkpoint.py --quick    # small model and dataset, for a smoke run (under a minute)

Single process, CPU, everything in a temporary directory that is removed at the end. Every ratio is
computed from numbers measured in the same run. Three parts:

(a) save and load of model + AdamW state through CheckpointManager (sync): MB, seconds, MB/s. A save
    includes the sha256 manifest and fsyncs; a load includes verifying every file against the
    manifest. The load right after a save reads from the page cache (no cache drop: shared machine).
(b) the stall a training loop sees at a checkpoint step: the blocking time of `save()` with
    async_save=False vs True, plus how much slower the steps that overlap the background write get,
    and what is left to wait for at the next `wait()`.
(c) resume cost at 1% vs 99% of an epoch: `BatchLoader.load_state_dict` + the first batch of a
    fresh iterator, on a synthetic Parquet dataset. The state is (epoch, consumed global batches), so
    this should not grow with the position.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distlstm.checkpoint.manager import CheckpointManager
from distlstm.config import DataConfig, ModelConfig, OptimConfig
from distlstm.data.shards.index import open_index
from distlstm.data.loader.batch_loader import build_loader
from distlstm.data.plan.epoch import EpochPlan
from distlstm.data.prep.synthetic import VOCAB_SIZE, ensure_synthetic
from distlstm.models.lstm import build_model, num_parameters
from distlstm.run.trainer import build_optimizer

MB = 1e6


def quiet(msg: str) -> None:
    pass


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_state(cfg: ModelConfig, vocab: int, seed: int = 0) -> dict:
    """Model + AdamW with its moments filled (one step on random gradients), as the trainer builds them."""
    torch.manual_seed(seed)
    model = build_model(cfg, vocab_size=vocab, input_size=0, num_classes=0)
    optimizer, _ = build_optimizer(model, OptimConfig(), max_steps=1000, device=torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"model": model, "optim": optimizer, "extra": {"step": 1}, "rank_state": {}}


def train_step(state: dict, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """A real (small) step: forward, masked LM loss, backward, AdamW step."""
    from distlstm.models.lstm import loss_and_metrics

    model, optimizer = state["model"], state["optim"]
    inputs, lengths, targets = batch
    loss, count, _ = loss_and_metrics("lm", model(inputs, lengths), targets, lengths)
    (loss / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def lm_batch(vocab: int, batch_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch_size, length + 1), generator=g)
    lengths = torch.full((batch_size,), length, dtype=torch.int64)
    return tokens[:, :-1].contiguous(), lengths, tokens[:, 1:].contiguous()


# ---------------------------------------------------------------- (a) save / load throughput


def bench_save_load(tmp: Path, cfg: ModelConfig, vocab: int, repeats: int) -> dict:
    state = build_state(cfg, vocab)
    params = num_parameters(state["model"])
    saves, loads, size = [], [], 0
    for r in range(repeats):
        run = tmp / f"saveload-{r}"
        mgr = CheckpointManager(run, rank=0, world_size=1, keep_last=1, log=quiet)
        t0 = time.perf_counter()
        path = mgr.save(1, state)
        saves.append(time.perf_counter() - t0)
        mgr.close()
        size = dir_bytes(path)
        fresh = build_state(cfg, vocab, seed=1)  # different weights: the load must overwrite them
        mgr = CheckpointManager(run, rank=0, world_size=1, log=quiet)
        t0 = time.perf_counter()
        loaded = mgr.load_latest(fresh)
        loads.append(time.perf_counter() - t0)
        mgr.close()
        if loaded is None or not all(torch.equal(a, b) for a, b in
                                     zip(state["model"].state_dict().values(), fresh["model"].state_dict().values())):
            raise SystemExit("load did not restore the saved weights")
        del fresh
        shutil.rmtree(run)
    save_s, load_s = statistics.median(saves), statistics.median(loads)
    print(f"(a) model: {params:,} parameters ({params * 4 / MB:.0f} MB fp32) + AdamW state; "
          f"checkpoint {size / MB:.0f} MB")
    print(f"    save: {save_s:.2f} s ({size / MB / save_s:.0f} MB/s)  [median of {repeats}: "
          + ", ".join(f"{s:.2f}" for s in saves) + "]")
    print(f"    load: {load_s:.2f} s ({size / MB / load_s:.0f} MB/s)  [median of {repeats}: "
          + ", ".join(f"{s:.2f}" for s in loads) + "]  (page cache warm; includes sha256 verification)")
    return {"params": params, "size_mb": size / MB, "save_s": save_s, "load_s": load_s}


# ---------------------------------------------------------------- (b) training stall, sync vs async


def bench_stall(tmp: Path, cfg: ModelConfig, vocab: int, steps_after: int, batch) -> dict:
    """Steps, a save, more steps, then wait(): the save() blocking time is what training stalls for."""
    state = build_state(cfg, vocab)
    train_step(state, batch)  # warm-up (allocator, first-call overheads)
    out = {}
    for mode in (False, True):
        mgr = CheckpointManager(tmp / f"stall-{'async' if mode else 'sync'}", rank=0, world_size=1,
                                keep_last=1, async_save=mode, log=quiet)
        t0 = time.perf_counter()
        train_step(state, batch)
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        mgr.save(1, state)
        blocked = time.perf_counter() - t0
        after = []
        for _ in range(steps_after):
            t0 = time.perf_counter()
            train_step(state, batch)
            after.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mgr.wait()  # the next save() (or close()) would block this long
        left = time.perf_counter() - t0
        mgr.close()
        name = "async" if mode else "sync"
        out[name] = {"blocked": blocked, "step": base, "after": after, "left": left}
        print(f"(b) {name:5s}: save() blocked {blocked:.2f} s; step before {base:.2f} s, steps after: "
              + ", ".join(f"{s:.2f}" for s in after) + f" s; then wait() {left:.2f} s")
        shutil.rmtree(tmp / f"stall-{name}")
    ratio = out["async"]["blocked"] / out["sync"]["blocked"]
    wall = {k: v["blocked"] + sum(v["after"]) + v["left"] for k, v in out.items()}
    print(f"    stall ratio async/sync = {ratio:.3f}; wall time of save() + {steps_after} steps + wait(): "
          f"sync {wall['sync']:.2f} s, async {wall['async']:.2f} s (the background write competes with "
          f"the steps for the cores)")
    out["wall"] = wall
    out["ratio"] = ratio
    return out


# ---------------------------------------------------------------- (c) resume position


def bench_resume(tmp: Path, samples: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    root = ensure_synthetic(tmp / "data", num_train=samples, num_valid=16)
    index = open_index(str(root / "train"), cache_dir=tmp / "data")
    print(f"(c) dataset: {index.num_samples:,} samples, {len(index.shards)} Parquet shards, "
          f"{len(index.chunk_offsets) - 1} row groups (written and indexed in {time.perf_counter() - t0:.0f} s)")
    data_cfg = DataConfig()
    results = {}
    for workers in (0, 1):
        def fresh():
            return build_loader(index, data_cfg, task="classify", dp_rank=0, dp_world_size=1,
                                vocab_size=VOCAB_SIZE, num_classes=4, pin_memory=False, run_dir=None,
                                num_workers=workers)

        loader = fresh()
        plan = EpochPlan(index.chunk_offsets, index.sample_lengths(), loader.params, seed=loader.seed, epoch=0)
        total = plan.num_batches
        times = {}
        for frac in (0.01, 0.99):
            consumed = int(round(frac * total))
            state = {**loader.state_dict(), "epoch": 0, "consumed": consumed}
            want = np.sort(plan.rank_batch(0, dp_rank=0, dp_world_size=1, start=consumed)[0])
            runs = []
            for _ in range(repeats):
                resumed = fresh()
                t0 = time.perf_counter()
                resumed.load_state_dict(state)
                it = iter(resumed)
                batch = next(it)
                runs.append(time.perf_counter() - t0)
                del it  # shuts the worker down
                if not np.array_equal(np.sort(batch.sample_ids.numpy()), want):
                    raise SystemExit(f"resume at batch {consumed}: first batch is not plan batch {consumed}")
            times[frac] = statistics.median(runs)
            print(f"    workers={workers}: resume at batch {consumed:>5d}/{total} ({frac:.0%}): "
                  f"{times[frac] * 1000:.0f} ms  [median of {repeats}: "
                  + ", ".join(f"{r * 1000:.0f}" for r in runs) + " ms]")
        ratio = times[0.99] / times[0.01]
        print(f"    workers={workers}: resume-time ratio 99%/1% = {ratio:.2f}")
        results[workers] = {"start": times[0.01], "end": times[0.99], "ratio": ratio, "batches": total}
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model and dataset (smoke run)")
    p.add_argument("--repeats", type=int, default=0, help="repetitions per measurement (default 3, quick 1)")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a fresh temporary directory)")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    repeats = args.repeats or (1 if args.quick else 3)
    vocab, samples = (4000, 20_000) if args.quick else (32_000, 200_000)
    cfg = ModelConfig(task="lm", input="tokens", embed_size=128 if args.quick else 512,
                      hidden_size=256 if args.quick else 1536, num_layers=2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model lm vocab {vocab} embed "
          f"{cfg.embed_size} hidden {cfg.hidden_size} x {cfg.num_layers} layers")
    tmp = Path(tempfile.mkdtemp(prefix="distlstm-bench-ckpt-", dir=args.dir))
    try:
        bench_save_load(tmp, cfg, vocab, repeats)
        b = bench_stall(tmp, cfg, vocab, steps_after=3, batch=lm_batch(vocab, 4, 32))
        c = bench_resume(tmp, samples, repeats=max(repeats, 3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok_stall = b["ratio"] < 0.5
    ok_resume = all(r["ratio"] < 2 for r in c.values())
    print(f"{'PASS' if ok_stall else 'FAIL'}: async save stall {b['async']['blocked']:.2f} s < 0.5 x sync "
          f"{b['sync']['blocked']:.2f} s (ratio {b['ratio']:.3f})")
    print(f"{'PASS' if ok_resume else 'FAIL'}: resume-time ratio end/start < 2 ("
          + ", ".join(f"workers={w}: {r['ratio']:.2f}" for w, r in c.items()) + ")")
    return 0 if ok_stall and ok_resume else 1


if __name__ == "__main__":
    sys.exit(main())

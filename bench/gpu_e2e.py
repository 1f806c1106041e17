"""GPU throughput on ragged data, end to end (issue 8): distlstm's real training path against bare
PyTorch loops over the same data, in one run.

    python bench/gpu_e2e.py                    # on a GPU: the full measurement (a few minutes)
    python bench/gpu_e2e.py --tiny             # any machine: small sizes, a smoke run (~1-2 min on CPU)
    python bench/gpu_e2e.py --only ragged      # or: --only wordlm
    python bench/gpu_e2e.py --out results.json # also write every number as JSON

Ragged part. The dataset: Parquet shards + manifest (`--samples` 80,000 samples, log-normal lengths
with median 200 and sigma 0.8 clipped to 8..1024, vocab 256, task lm; `--rows-per-group` 1024). On it:
- distlstm eager and distlstm with CUDA graphs: `python -m distlstm.train` as a subprocess (the CLI,
  DataLoader workers included; H=1024 x 2, bf16, `--max-tokens` 65,536), both with the same bounded
  shapes (`--shape-buckets` 64) and seed, so the same batches step by step (the bench checks it from
  their `log.sample_ids` records): graphs on vs off is the only difference;
- bare loop: the same layers (nn.Embedding -> nn.LSTM -> nn.Linear), masked cross-entropy, clipping,
  fused AdamW, over distlstm's own batches (the samples of each of its steps, in order), pre-staged
  on the GPU (first and second pass);
- random-batch baseline: the same bare loop on random batches of 256 samples.
Word-LM part: H=1024 x 2, batch 128, 35-token chunks, vocab 30,000 (`--wordlm-vocab`): distlstm in lm
stream mode (the lm default: the LSTM state carried from chunk to chunk; CUDA graphs where
`train.cuda_graphs=auto` captures it) and in windows mode on fixed-length samples (one batch shape,
CUDA graphs), against the pytorch/examples word_language_model training loop (dropout 0.2,
log-softmax + NLL, clip 0.25, hand-written SGD, hidden state carried across batches) in fp32, as such
loops are usually written, and the same loop under bf16 autocast.

Rates are wall-clock: real tokens over the time between two metrics records, which the trainer
writes after reading the interval's device values (so after the steps ran, not when they were
queued); the first log interval is left out, and "steady" starts after the first epoch.

Verdicts (issue 8's acceptance) are printed only on CUDA; elsewhere every line says "not measured".
Exit status 0 either way: a measurement, not a gate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(samples=1500, median=40, max_length=128, vocab=64, hidden=32, layers=1, max_tokens=2048, shape_buckets=16,
            log_every=5, workers=0, random_batches=10, steps=40, wordlm_vocab=300, wordlm_hidden=32, wordlm_batch=8,
            wordlm_bptt=10, wordlm_samples=20, wordlm_steps=30, wordlm_bare_steps=20)
"""--tiny: sizes for a smoke run on any machine (each can still be set explicitly; fp32 on a CPU)."""


# ---------------------------------------------------------------------------------------------- data

def lognormal_lengths(n: int, median: float, sigma: float, lo: int, hi: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(np.log(median), sigma, n)), lo, hi).astype(np.int64)


def write_dataset(folder: Path, lengths: np.ndarray, vocab: int, rows_per_group: int, shard_rows: int,
                  seed: int = 1) -> Path:
    """lm shards (a `tokens` list<int32> column, `rows_per_group` rows per row group) + manifest.json,
    the layout `python -m distlstm.prep` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for s, lo in enumerate(range(0, len(lengths), shard_rows)):
        lens = lengths[lo:lo + shard_rows]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        values = rng.integers(0, vocab, int(offsets[-1]), dtype=np.int32)
        table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
        name = f"train-{s:05d}.parquet"
        pq.write_table(table, folder / name, row_group_size=rows_per_group)
        shards.append({"path": name, "num_samples": len(lens), "num_tokens": int(lens.sum()),
                       "bytes": (folder / name).stat().st_size})
    manifest = {"version": 1, "format": "parquet", "task": "lm", "sequence_column": "tokens", "label_column": None,
                "vocab_size": vocab, "num_classes": None, "input_size": None, "num_samples": int(len(lengths)),
                "num_tokens": int(lengths.sum()), "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def read_dataset(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of every sample, read back from the shards (what the bare loops train on)."""
    parts, lens = [], []
    for shard in json.loads((folder / "manifest.json").read_text())["shards"]:
        column = pq.read_table(folder / shard["path"], columns=["tokens"]).column("tokens").combine_chunks()
        parts.append(column.values.to_numpy())
        lens.append(np.diff(column.offsets.to_numpy()))
    lengths = np.concatenate(lens)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), np.concatenate(parts)


# ---------------------------------------------------------------------------------------------- distlstm

def run_distlstm(data: Path, work: Path, name: str, args, extra: list[str], *, steady_after: int,
                 lm_mode: str = "windows") -> dict:
    """`python -m distlstm.train` on `data`: wall-clock rates of real tokens from its metrics.jsonl
    over the steps after `steady_after` (steady) and up to it (first), and the sample ids of every
    step's batch (`log.sample_ids`: what a bare loop trains on to see the same batches)."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "distlstm.train", "--data.train", str(data), "--data.cache_dir", str(work / "cache"),
           "--model.task", "lm", "--data.lm_mode", lm_mode, "--train.precision", args.precision,
           "--train.eval_every", "0", "--log.sample_ids", "true",
           "--checkpoint.at_end", "false", "--checkpoint.resume", "never", "--log.progress", "false",
           "--log.tensorboard", "false", "--train.run_dir", str(run_dir), "--optim.warmup_steps", "20",
           "--data.num_workers", str(args.workers), "--train.device", "cuda" if args.cuda else "cpu", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name}: distlstm.train failed ({proc.returncode}):\n{' '.join(cmd)}\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    out = {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1), "steps": train[-1]["step"] if train else 0,
           "graph_lines": [line for line in proc.stdout.splitlines() if line.startswith("cuda graphs:")],
           "batches": recorded_batches(run_dir)}
    last = train[-1]["step"] if train else 0
    out["first"] = wall_rate(train, train[0]["step"] if train else 0, min(steady_after, last))
    out["steady"] = wall_rate(train, steady_after, last)
    return out


def recorded_batches(run_dir: Path) -> list[list[int]]:
    """The sample ids of each step's batch (one rank, one micro-batch per step), from log.sample_ids."""
    batches = []
    for line in (run_dir / "samples" / "rank00000.txt").read_text().splitlines():
        step, _epoch, *ids = line.split()
        batches.append([int(i) for i in ids])
    return batches


def wall_rate(records: list[dict], after: int, upto: int) -> dict | None:
    """Real tokens/s and padding over the steps in (after, upto], by the wall clock: the tokens of the
    log intervals that end in that span over the time between the record at `after` (or the latest
    before it) and the one at `upto`. A record's time is taken after the trainer read the interval's
    device values, so after its steps ran on the device, not when they were queued; the first
    interval (from the start of the run) has no start time and is left out."""
    start = [r for r in records if r["step"] <= after]
    chosen = [r for r in records if after < r["step"] <= upto]
    if not start or not chosen:
        return None
    seconds = chosen[-1]["time"] - start[-1]["time"]
    tokens = sum(r["tokens"] for r in chosen)
    padded = sum(r["tokens"] / max(1e-9, 1 - r["padding"]) for r in chosen)
    if seconds <= 0:
        return None
    return {"tokens_per_s": tokens / seconds, "padding": 1 - tokens / max(padded, 1.0), "seconds": seconds,
            "steps": chosen[-1]["step"] - start[-1]["step"]}


# ---------------------------------------------------------------------------------------------- bare loops

class BareLM(nn.Module):
    """nn.Embedding -> nn.LSTM -> nn.Linear: the model a hand-written loop would train."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embedding(x))[0])


def random_batches(n: int, size: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i:i + size] for i in range(0, n, size)]


def stage(batches: list[np.ndarray], offsets: np.ndarray, values: np.ndarray, device) -> tuple[list, int, int]:
    """Padded lm batches (inputs, targets with -100, real-target count) on `device`; real and padded tokens."""
    staged, real, padded = [], 0, 0
    for ids in batches:
        lens = offsets[ids + 1] - offsets[ids]
        T = int(lens.max())
        x = np.zeros((len(ids), T), np.int64)
        for r, i in enumerate(ids):
            x[r, :lens[r]] = values[offsets[i]:offsets[i + 1]]
        inputs = torch.from_numpy(x[:, :-1])
        targets = torch.from_numpy(x[:, 1:].copy())
        targets[torch.arange(T - 1)[None, :] >= torch.from_numpy(lens - 1)[:, None]] = -100
        count = int((lens - 1).sum())
        staged.append((inputs.to(device), targets.to(device), float(count)))
        real += count
        padded += len(ids) * (T - 1)
    return staged, real, padded


def bare_loop(model: BareLM, staged: list, precision: str, device: torch.device) -> float:
    """One pass: forward, masked cross-entropy (mean over real targets), backward, clip, fused AdamW.
    Returns seconds."""
    opt = getattr(model, "_opt", None) or torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model._opt = opt
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    sync(device)
    started = time.perf_counter()
    for inputs, targets, count in staged:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction="sum") / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - started


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- word LM

class ExamplesRNNModel(nn.Module):
    """pytorch/examples word_language_model's RNNModel (LSTM, untied): embedding + dropout, LSTM,
    dropout, decoder, log-softmax; sequence-first tensors."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.ntoken, self.nlayers, self.nhid = ntoken, nlayers, nhid

    def forward(self, x, hidden):
        emb = self.drop(self.encoder(x))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int, device):
        return (torch.zeros(self.nlayers, bsz, self.nhid, device=device),
                torch.zeros(self.nlayers, bsz, self.nhid, device=device))


def textbook_word_lm(vocab: int, hidden: int, layers: int, batch: int, bptt: int, steps: int, precision: str,
                     device: torch.device) -> float:
    """pytorch/examples word_language_model's train(): tokens/s over `steps` batches after 5 warm-up."""
    torch.manual_seed(0)
    model = ExamplesRNNModel(vocab, hidden, hidden, layers).to(device)
    data = torch.randint(0, vocab, ((steps + 6) * bptt + 1, batch), device=device)
    criterion = nn.NLLLoss()
    dtype = torch.bfloat16 if precision == "bf16" else None
    lr, clip = 20.0, 0.25
    model.train()
    hidden_state = model.init_hidden(batch, device)
    started = None
    for k in range(steps + 5):
        if k == 5:
            sync(device)
            started = time.perf_counter()
        i = k * bptt
        x, y = data[i:i + bptt], data[i + 1:i + 1 + bptt].reshape(-1)
        model.zero_grad()
        hidden_state = tuple(h.detach() for h in hidden_state)  # repackage_hidden
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            output, hidden_state = model(x, hidden_state)
        loss = criterion(output.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
    sync(device)
    return steps * batch * bptt / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------- main

def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1e6:.3f} M"


def ragged(args, work: Path, device: torch.device, results: dict) -> list[tuple[str, float | None, float]]:
    lengths = lognormal_lengths(args.samples, args.median, 0.8, 8, args.max_length)
    data = write_dataset(work / "ragged", lengths, args.vocab, args.rows_per_group, args.shard_rows)
    offsets, values = read_dataset(data)
    lm_tokens = int((lengths - 1).sum())
    # Steps in one epoch at this budget (bounded or exact plans differ by a few %; near enough to
    # split the run into a first epoch and a steady part).
    epoch_steps = max(1, int(round(lengths.sum() / (args.max_tokens * 0.97))))
    steady_after = epoch_steps if args.steps > epoch_steps + 20 else args.steps // 2
    # Both distlstm runs get the same bounded shapes (data.shape_buckets) and seed, so the same
    # batches in the same order: graphs on vs off is the only difference (checked below).
    model_args = ["--model.embed_size", str(args.hidden), "--model.hidden_size", str(args.hidden),
                  "--model.num_layers", str(args.layers), "--data.max_tokens", str(args.max_tokens),
                  "--data.max_length", str(args.max_length), "--train.max_steps", str(args.steps),
                  "--log.every_steps", str(args.log_every), "--data.shape_buckets", str(args.shape_buckets)]
    print(f"ragged data: {args.samples} samples, {int(lengths.sum())} tokens ({lm_tokens} lm targets), "
          f"median length {int(np.median(lengths))}, vocab {args.vocab}; budget {args.max_tokens}, "
          f"{args.shape_buckets} shapes; H={args.hidden} x {args.layers}, {args.precision}; {args.steps} steps, "
          f"steady after {steady_after}", flush=True)
    rows = {}
    for name, graphs in (("distlstm eager", "off"), ("distlstm cuda graphs", "on" if args.cuda else "off")):
        r = run_distlstm(data, work, name.replace(" ", "-"), args, model_args + ["--train.cuda_graphs", graphs],
                         steady_after=steady_after)
        rows[name] = r
        print(f"  {name}: steady {fmt_rate((r['steady'] or {}).get('tokens_per_s'))} tok/s, padding "
              f"{(r['steady'] or {}).get('padding', float('nan')) * 100:.1f}%; first epoch "
              f"{fmt_rate((r['first'] or {}).get('tokens_per_s'))} tok/s; {r['wall_s']} s wall", flush=True)
        for line in r["graph_lines"][-2:]:
            print(f"    {line}")
    batches = rows["distlstm eager"].pop("batches")
    same = batches == rows["distlstm cuda graphs"].pop("batches")
    rows["same batches"] = same
    print(f"  graphs on and off trained on the same batches, step by step: {same}", flush=True)

    # The bare loop trains on distlstm's own batches (the samples of each step, in order), padded to
    # each batch's longest sample: the same work minus the framework (and minus its bounded shapes'
    # extra padding, which is the framework's cost).
    torch.manual_seed(0)
    model = BareLM(args.vocab, args.hidden, args.hidden, args.layers).to(device)
    staged, real, padded = stage([np.asarray(b) for b in batches], offsets, values, device)
    first = bare_loop(model, staged, args.precision, device)
    second = bare_loop(model, staged, args.precision, device)
    rows["bare same batches"] = {"first": real / first, "second": real / second, "padding": 1 - real / padded,
                                 "batches": len(staged)}
    print(f"  bare loop on distlstm's {len(staged)} batches, staged on the device: first pass "
          f"{fmt_rate(real / first)}, second {fmt_rate(real / second)} tok/s, padding {(1 - real / padded) * 100:.1f}%",
          flush=True)
    del staged
    rand = random_batches(len(lengths), 256, seed=0)[:args.random_batches or None]
    staged, real, padded = stage(rand, offsets, values, device)
    seconds = bare_loop(model, staged, args.precision, device)
    rows["bare random 256"] = {"tokens_per_s": real / seconds, "padding": 1 - real / padded, "batches": len(staged)}
    print(f"  bare loop, random batches of 256: {fmt_rate(real / seconds)} tok/s, padding "
          f"{(1 - real / padded) * 100:.1f}%, {len(staged)} batches", flush=True)
    del staged, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["ragged"] = rows

    eager = (rows["distlstm eager"]["steady"] or {}).get("tokens_per_s")
    graphs = (rows["distlstm cuda graphs"]["steady"] or {}).get("tokens_per_s")
    bare = max(rows["bare same batches"]["first"], rows["bare same batches"]["second"])
    rand_rate = rows["bare random 256"]["tokens_per_s"]
    best = max(v for v in (eager, graphs) if v) if (eager or graphs) else None
    return [("distlstm eager / bare loop, same batches (best pass)", ratio(eager, bare), 1.0),
            ("distlstm cuda graphs / distlstm eager, same batches", ratio(graphs, eager) if same else None, 1.0),
            ("distlstm cuda graphs / bare eager loop, same batches (best pass)", ratio(graphs, bare), 1.8),
            ("distlstm (best) / random-batch baseline", ratio(best, rand_rate), 3.0)]


def wordlm(args, work: Path, device: torch.device, results: dict) -> list[tuple[str, float | None, float | None]]:
    T, B = args.wordlm_bptt, args.wordlm_batch
    n = B * args.wordlm_samples
    print(f"word-LM shape: H={args.wordlm_hidden} x 2, batch {B}, {T} steps, vocab {args.wordlm_vocab}", flush=True)
    size = ["--model.embed_size", str(args.wordlm_hidden), "--model.hidden_size", str(args.wordlm_hidden),
            "--model.num_layers", "2", "--train.max_steps", str(args.wordlm_steps),
            "--log.every_steps", str(max(1, args.wordlm_steps // 10))]
    # The lm default, stream mode (what the textbook loop does: B contiguous rows of one token stream,
    # T-token chunks, the LSTM state carried from chunk to chunk), on 4 long documents.
    stream_data = write_dataset(work / "wordlm-stream", np.full(4, B * T * (args.wordlm_steps + 10) // 4 + 1),
                                args.wordlm_vocab, 4096, 50_000, seed=2)
    stream = run_distlstm(stream_data, work, "distlstm-wordlm-stream", args,
                          size + ["--data.batch_size", str(B), "--data.bptt", str(T), "--train.cuda_graphs", "auto"],
                          steady_after=args.wordlm_steps // 3, lm_mode="stream")
    # Windows mode on fixed-length samples: one batch shape, so CUDA graphs on a GPU.
    windows_data = write_dataset(work / "wordlm", np.full(n, T + 1), args.wordlm_vocab, 4096, 50_000, seed=2)
    windows = run_distlstm(windows_data, work, "distlstm-wordlm", args,
                           size + ["--data.max_length", str(T + 1), "--data.max_tokens", str(B * (T + 1)),
                                   "--data.min_batch_size", str(B), "--data.max_batch_size", str(B),
                                   "--data.shape_buckets", "1", "--train.cuda_graphs", "on" if args.cuda else "off"],
                           steady_after=args.wordlm_steps // 3)
    for r in (stream, windows):
        r.pop("batches")
    ours, ours_windows = ((r["steady"] or {}).get("tokens_per_s") for r in (stream, windows))
    fp32 = textbook_word_lm(args.wordlm_vocab, args.wordlm_hidden, 2, B, T, args.wordlm_bare_steps, "fp32", device)
    try:
        bf16 = textbook_word_lm(args.wordlm_vocab, args.wordlm_hidden, 2, B, T, args.wordlm_bare_steps, "bf16", device)
    except RuntimeError as exc:
        if device.type == "cuda":
            raise
        # oneDNN on a CPU without bf16 instructions (no AVX-512 BF16) has no bf16 LSTM under autocast.
        print(f"  textbook loop under bf16 autocast: not measured on this CPU ({str(exc).splitlines()[0][:80]})")
        bf16 = None
    graphed = [line for line in stream["graph_lines"] if "captured" in line]
    print(f"  distlstm stream mode ({args.precision}, {'cuda graphs' if graphed else 'eager'}): {fmt_rate(ours)} tok/s; "
          f"windows mode ({'cuda graphs' if args.cuda else 'eager'}): {fmt_rate(ours_windows)} tok/s; "
          f"textbook loop fp32 {fmt_rate(fp32)}, bf16 {fmt_rate(bf16)} tok/s", flush=True)
    results["wordlm"] = {"distlstm stream": stream, "distlstm windows": windows, "textbook fp32": fp32,
                         "textbook bf16": bf16}
    return [("word LM, stream mode: distlstm / textbook fp32 loop", ratio(ours, fp32), 3.0),
            ("word LM, stream mode: distlstm / textbook bf16 loop", ratio(ours, bf16), 1.5),
            ("word LM, windows mode (graphs): distlstm / textbook fp32 loop", ratio(ours_windows, fp32), None)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", "--quick", action="store_true", help="small sizes for a smoke run on any machine "
                                                                   "(explicit options still apply)")
    ap.add_argument("--only", choices=["ragged", "wordlm"], help="run one part")
    ap.add_argument("--samples", type=int, default=80_000)
    ap.add_argument("--median", type=float, default=200)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--rows-per-group", type=int, default=1024)
    ap.add_argument("--shard-rows", type=int, default=20_000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=65_536)
    ap.add_argument("--shape-buckets", type=int, default=64)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=0, help="distlstm steps; 0 = one epoch + 150")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--random-batches", type=int, default=120, help="random batches timed; 0 = all")
    ap.add_argument("--wordlm-vocab", type=int, default=30_000)
    ap.add_argument("--wordlm-hidden", type=int, default=1024)
    ap.add_argument("--wordlm-batch", type=int, default=128)
    ap.add_argument("--wordlm-bptt", type=int, default=35)
    ap.add_argument("--wordlm-samples", type=int, default=400, help="batches of word-LM data written")
    ap.add_argument("--wordlm-steps", type=int, default=300)
    ap.add_argument("--wordlm-bare-steps", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per distlstm.train run")
    ap.add_argument("--work", default="", help="folder for data and runs; default a temporary one")
    ap.add_argument("--out", default="", help="write all numbers as JSON here")
    if {"--tiny", "--quick"} & set(sys.argv[1:]):
        ap.set_defaults(**TINY, precision="bf16" if torch.cuda.is_available() else "fp32")
    args = ap.parse_args()
    args.cuda = torch.cuda.is_available()
    if not args.steps:
        lengths_sum = args.samples * args.median * 1.33  # mean of the clipped log-normal, sigma 0.8
        args.steps = int(lengths_sum / args.max_tokens) + 150
    device = torch.device("cuda" if args.cuda else "cpu")
    name = torch.cuda.get_device_name() if args.cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(f"device: {name}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}", flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": name, "torch": torch.__version__, "command": " ".join(sys.argv), "args": {
        k: v for k, v in vars(args).items() if k not in ("work", "out")}}
    checks = []
    try:
        if args.only in (None, "ragged"):
            checks += ragged(args, work, device, results)
        if args.only in (None, "wordlm"):
            checks += wordlm(args, work, device, results)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    results["checks"] = []
    for label, value, target in checks:
        shown = "n/a" if value is None else f"{value:.2f}x"
        if target is None:
            verdict = "a measurement, no target" if args.cuda else "not measured (no CUDA device)"
        elif not args.cuda:
            verdict = "not measured (no CUDA device: CPU smoke numbers, no verdict)"
        elif value is None:
            verdict = "not measured (no steady-state interval; raise --steps)"
        else:
            verdict = "PASS" if value >= target else "FAIL"
        print(f"{label}: {shown}{'' if target is None else f' (target >= {target}x)'}: {verdict}")
        results["checks"].append({"check": label, "ratio": value, "target": target, "verdict": verdict})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

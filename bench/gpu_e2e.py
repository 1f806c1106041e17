"""GPU throughput on ragged data, end to end (issue 8): distlstm's real training path against bare
PyTorch loops over the same data, in one run.

    python bench/gpu_e2e.py                    # on a GPU: the full measurement (a few minutes)
    python bench/gpu_e2e.py --tiny             # any machine: small sizes, a smoke run (~1-2 min on CPU)
    python bench/gpu_e2e.py --only ragged      # or: --only wordlm
    python bench/gpu_e2e.py --out results.json # also write every number as JSON

Ragged part. The dataset: Parquet shards + manifest (`--samples` 80,000 samples, log-normal lengths
with median 200 and sigma 0.8 clipped to 8..1024, vocab 256, task lm; `--rows-per-group` 1024). On it:
- distlstm eager and distlstm with CUDA graphs: `python -m distlstm.train` as a subprocess (the CLI,
  DataLoader workers included; H=1024 x 2, bf16, `--max-tokens` 65,536), real tokens/s read from
  its metrics.jsonl over the steps after the first epoch (steady state; the first epoch, with its
  warm-up and graph captures, is printed too);
- bare loop: the same layers (nn.Embedding -> nn.LSTM -> nn.Linear), masked cross-entropy, clipping,
  fused AdamW, over length-sorted token-budget batches of the same shards pre-staged on the GPU
  (first and second pass);
- random-batch baseline: the same bare loop on random batches of 256 samples.
Word-LM part: H=1024 x 2, batch 128, 35 steps, vocab 30,000 (`--wordlm-vocab`): distlstm (CLI, bf16,
one batch shape, so CUDA graphs) against the pytorch/examples word_language_model training loop
(dropout 0.2, log-softmax + NLL, clip 0.25, hand-written SGD, hidden state carried across batches)
in fp32, as such loops are usually written, and the same loop under bf16 autocast.

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

def run_distlstm(data: Path, work: Path, name: str, args, extra: list[str], *, steady_after: int) -> dict:
    """`python -m distlstm.train` on `data`; real tokens/s and padding from its metrics.jsonl, over
    the log intervals that end after step `steady_after` (steady) and up to it (first)."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "distlstm.train", "--data.train", str(data), "--data.cache_dir", str(work / "cache"),
           "--model.task", "lm", "--data.lm_mode", "windows", "--train.precision", args.precision,
           "--train.eval_every", "0",
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
           "graph_lines": [line for line in proc.stdout.splitlines() if line.startswith("cuda graphs:")]}
    for part, chosen in (("first", [r for r in train if r["step"] <= steady_after]),
                         ("steady", [r for r in train if r["step"] > steady_after])):
        out[part] = _interval_rate(train, chosen)
    return out


def _interval_rate(all_records: list[dict], chosen: list[dict]) -> dict | None:
    """Time-weighted tokens/s and padding over `chosen` log intervals: an interval lasts from the
    previous record's time to its own (the first from the start of the run is left out)."""
    times = {r["step"]: r["time"] for r in all_records}
    steps = sorted(times)
    total_t = tokens = padded = 0.0
    for r in chosen:
        i = steps.index(r["step"])
        if i == 0:
            continue
        dt = r["time"] - times[steps[i - 1]]
        real = r["tokens_per_s"] * dt
        total_t, tokens = total_t + dt, tokens + real
        padded += real / max(1e-9, 1 - r["padding"])
    if total_t == 0:
        return None
    return {"tokens_per_s": tokens / total_t, "padding": 1 - tokens / max(padded, 1.0), "seconds": total_t}


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


def sorted_batches(lengths: np.ndarray, budget: int, seed: int) -> list[np.ndarray]:
    """Length-sorted batches of consecutive samples, rows x longest <= budget, in random order."""
    order = np.argsort(lengths, kind="stable")
    sl = lengths[order]
    out, i = [], 0
    while i < len(order):
        n = 1
        while i + n < len(order) and (n + 1) * sl[i + n] <= budget:
            n += 1
        out.append(order[i:i + n])
        i += n
    rng = np.random.default_rng(seed)
    return [out[k] for k in rng.permutation(len(out))]


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
    model_args = ["--model.embed_size", str(args.hidden), "--model.hidden_size", str(args.hidden),
                  "--model.num_layers", str(args.layers), "--data.max_tokens", str(args.max_tokens),
                  "--data.max_length", str(args.max_length), "--train.max_steps", str(args.steps),
                  "--log.every_steps", str(args.log_every)]
    print(f"ragged data: {args.samples} samples, {int(lengths.sum())} tokens ({lm_tokens} lm targets), "
          f"median length {int(np.median(lengths))}, vocab {args.vocab}; budget {args.max_tokens}; "
          f"H={args.hidden} x {args.layers}, {args.precision}; {args.steps} steps, steady after {steady_after}",
          flush=True)
    rows = {}
    for name, extra in (("distlstm eager", ["--train.cuda_graphs", "off"]),
                        ("distlstm cuda graphs", ["--train.cuda_graphs", "on" if args.cuda else "off",
                                                  "--data.shape_buckets", str(args.shape_buckets)])):
        if name.endswith("graphs") and not args.cuda:
            extra = ["--train.cuda_graphs", "off", "--data.shape_buckets", str(args.shape_buckets)]
        r = run_distlstm(data, work, name.replace(" ", "-"), args, model_args + extra, steady_after=steady_after)
        rows[name] = r
        print(f"  {name}: steady {fmt_rate((r['steady'] or {}).get('tokens_per_s'))} tok/s, padding "
              f"{(r['steady'] or {}).get('padding', float('nan')) * 100:.1f}%; first epoch "
              f"{fmt_rate((r['first'] or {}).get('tokens_per_s'))} tok/s; {r['wall_s']} s wall", flush=True)
        for line in r["graph_lines"][-2:]:
            print(f"    {line}")

    torch.manual_seed(0)
    model = BareLM(args.vocab, args.hidden, args.hidden, args.layers).to(device)
    staged, real, padded = stage(sorted_batches(lengths, args.max_tokens, seed=0), offsets, values, device)
    first = bare_loop(model, staged, args.precision, device)
    second = bare_loop(model, staged, args.precision, device)
    rows["bare sorted"] = {"first": real / first, "second": real / second, "padding": 1 - real / padded,
                           "batches": len(staged)}
    print(f"  bare loop, length-sorted {args.max_tokens}-token batches on the device: first pass "
          f"{fmt_rate(real / first)}, second {fmt_rate(real / second)} tok/s, padding {(1 - real / padded) * 100:.1f}%, "
          f"{len(staged)} batches", flush=True)
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
    bare = max(rows["bare sorted"]["first"], rows["bare sorted"]["second"])
    rand_rate = rows["bare random 256"]["tokens_per_s"]
    best = max(v for v in (eager, graphs) if v) if (eager or graphs) else None
    return [("distlstm eager / bare loop (best pass)", ratio(eager, bare), 1.0),
            ("distlstm cuda graphs / bare eager loop (best pass)", ratio(graphs, bare), 1.8),
            ("distlstm (best) / random-batch baseline", ratio(best, rand_rate), 3.0)]


def wordlm(args, work: Path, device: torch.device, results: dict) -> list[tuple[str, float | None, float]]:
    T, B = args.wordlm_bptt, args.wordlm_batch
    n = B * args.wordlm_samples
    data = write_dataset(work / "wordlm", np.full(n, T + 1), args.wordlm_vocab, 4096, 50_000, seed=2)
    print(f"word-LM shape: H={args.wordlm_hidden} x 2, batch {B}, {T} steps, vocab {args.wordlm_vocab}", flush=True)
    extra = ["--model.embed_size", str(args.wordlm_hidden), "--model.hidden_size", str(args.wordlm_hidden),
             "--model.num_layers", "2", "--data.max_length", str(T + 1), "--data.max_tokens", str(B * (T + 1)),
             "--data.min_batch_size", str(B), "--data.max_batch_size", str(B), "--data.shape_buckets", "1",
             "--train.max_steps", str(args.wordlm_steps), "--log.every_steps", str(max(1, args.wordlm_steps // 10)),
             "--train.cuda_graphs", "on" if args.cuda else "off"]
    r = run_distlstm(data, work, "distlstm-wordlm", args, extra, steady_after=args.wordlm_steps // 3)
    ours = (r["steady"] or {}).get("tokens_per_s")
    fp32 = textbook_word_lm(args.wordlm_vocab, args.wordlm_hidden, 2, B, T, args.wordlm_bare_steps, "fp32", device)
    bf16 = textbook_word_lm(args.wordlm_vocab, args.wordlm_hidden, 2, B, T, args.wordlm_bare_steps, "bf16", device)
    print(f"  distlstm ({args.precision}{', cuda graphs' if args.cuda else ''}): {fmt_rate(ours)} tok/s; "
          f"textbook loop fp32 {fmt_rate(fp32)}, bf16 {fmt_rate(bf16)} tok/s", flush=True)
    results["wordlm"] = {"distlstm": r, "textbook fp32": fp32, "textbook bf16": bf16}
    return [("word LM: distlstm / textbook fp32 loop", ratio(ours, fp32), 3.0),
            ("word LM: distlstm / textbook bf16 loop", ratio(ours, bf16), 1.5)]


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
        if not args.cuda:
            verdict = "not measured (no CUDA device: CPU smoke numbers, no verdict)"
        elif value is None:
            verdict = "not measured (no steady-state interval; raise --steps)"
        else:
            verdict = "PASS" if value >= target else "FAIL"
        print(f"{label}: {shown} (target >= {target}x): {verdict}")
        results["checks"].append({"check": label, "ratio": value, "target": target, "verdict": verdict})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

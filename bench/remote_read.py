"""Remote reads: bytes and requests per epoch over HTTP, and the loader's speed from HTTP vs local disk.

    python bench/remote_read.py                  # tiny Shakespeare (../shared/data), 5-10 minutes on 2 cores
    python bench/remote_read.py --quick          # 2 timing repeats instead of 5
    python bench/remote_read.py --code /work/main --no-throughput   # bytes of another checkout's training

The dataset is tiny Shakespeare, char-level, prepared with `python -m distlstm.prep` (Parquet, 256
tokens per sample, 30 rows per row group, ~0.3 MB shards: 3 train shards, ~130 row groups). A local
HTTP server with byte ranges (tests/_http_server.py) serves it and counts the bytes and requests it
answers. The index is built once first (it reads every row group's sequence column once per
dataset and caches it with the footers; reported on its own line); then `python -m distlstm.train`
trains one epoch with the default data settings (`--model.task lm`, evaluation at the end):

  (a) bytes served per epoch <= 1.15x the train split's Parquet bytes, for 1 process x 0 workers and
      for torchrun 2 ranks x 2 workers (gloo); requests per chunk printed;
  (b) the loader alone over 10 epochs (no model), from HTTP on loopback >= 0.8x its tokens/s from
      local disk, 1 process, 0 and 1 DataLoader workers (best of 5 each, alternating), judged on
      256-row groups (45 KB: the same text prepared with --rows-per-group 256, still 4x smaller than
      prep's default); the 30-row groups (6 KB) of (a) are printed too: there a request costs more
      CPU (client, loopback TCP, the Python test server) than decoding the row group.

For information it also runs (a) against a server that ignores Range headers (Python's
http.server behaves so): each process then reads each shard whole, once.
Each PASS/FAIL is printed; the exit status is non-zero if one fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from _http_server import HttpServer, bytes_sent  # noqa: E402

from distlstm.config import DataConfig  # noqa: E402
from distlstm.data.shards.index import open_index  # noqa: E402
from distlstm.data.loader.batch_loader import build_loader  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PREP = ["--task", "lm", "--tokenizer", "char", "--split", "tail", "--valid-fraction", "0.1",
        "--shard-size-mb", "0.3", "--quiet"]


def prepare(out: Path, rows_per_group: int = 30) -> None:
    subprocess.run([sys.executable, "-m", "distlstm.prep", "--text", str(TEXT), "--out", str(out), *PREP,
                    "--rows-per-group", str(rows_per_group)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stderr=subprocess.DEVNULL)


def parquet_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def train_epoch(server: HttpServer, cache: Path, run_dir: Path, *, nproc: int, workers: int, code: Path,
                extra: list[str]) -> tuple[list, float, str]:
    """One epoch of `python -m distlstm.train` over HTTP; (request log, seconds, output)."""
    args = ["-m", "distlstm.train", "--data.train", server.url("train/"), "--data.valid", server.url("valid/"),
            "--data.cache_dir", str(cache), "--data.num_workers", str(workers), "--model.task", "lm",
            "--train.max_epochs", "1", "--train.max_steps", "0", "--train.eval_every", "0",
            "--train.run_dir", str(run_dir), "--log.progress", "false", "--log.tensorboard", "false",
            "--checkpoint.at_end", "false", *extra]
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    # One OpenMP thread per process: on 2 shared cores, more spin-wait each other into the ground.
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    server.take_log()
    start = time.perf_counter()
    # cwd: not this checkout, or `python -m` would import its distlstm whatever PYTHONPATH says.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=run_dir.parent)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return server.take_log(), seconds, proc.stdout


EPOCHS = 10  # per loader timing: one epoch of the tiny dataset is ~0.1 s, short next to starting a worker


def loader_epochs(index, workers: int) -> tuple[float, int]:
    """(seconds, real tokens) of EPOCHS epochs of the training loader alone, 1 process."""
    cfg = DataConfig(num_workers=workers)
    loader = build_loader(index, cfg, task="lm", dp_rank=0, dp_world_size=1, vocab_size=0, num_classes=0,
                          pin_memory=False, run_dir=None, max_epochs=EPOCHS)
    start = time.perf_counter()
    tokens = sum(int(b.lengths.sum()) for b in loader if b.weight)
    return time.perf_counter() - start, tokens


def throughput(data: Path, tmp: Path, repeats: int, rows: int) -> list[str]:
    """(b): the loader over local files vs over HTTP from a server in a process of its own (in this
    process its threads would compete with the loader for the GIL). Best of `repeats`, alternating."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_http_server.py"), str(data)],
                            stdout=subprocess.PIPE, text=True)
    failures = []
    try:
        port = int(proc.stdout.readline())
        remote = open_index(f"http://127.0.0.1:{port}/train/", cache_dir=tmp / f"cache-throughput-{rows}")
        local = open_index(str(data / "train"), cache_dir=tmp / f"cache-local-{rows}")
        size = parquet_bytes(data / "train") / local.num_chunks
        for workers in (0, 1):
            t_local = t_http = float("inf")
            for _ in range(repeats):
                seconds, tokens = loader_epochs(local, workers)
                t_local = min(t_local, seconds)
                seconds, tokens_http = loader_epochs(remote, workers)
                t_http = min(t_http, seconds)
                assert tokens_http == tokens
            ratio = t_local / t_http
            print(f"| {rows} rows ({size / 1e3:.0f} KB) x {local.num_chunks} | {workers} | "
                  f"{tokens / t_local / 1e6:.2f} M tok/s | {tokens / t_http / 1e6:.2f} M tok/s | {ratio:.2f} |")
            if rows >= 256:
                verdict = "PASS" if ratio >= 0.8 else "FAIL"
                print(f"  {verdict}: (b) {rows}-row groups, {workers} workers: HTTP {ratio:.2f}x local >= 0.8x")
                if verdict == "FAIL":
                    failures.append(f"(b) {workers} workers")
    finally:
        proc.kill()
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 timing repeats instead of 5")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose distlstm.train runs the epochs")
    ap.add_argument("--no-throughput", action="store_true", help="skip (b)")
    ap.add_argument("--extra", default="", help="more training flags, e.g. '--data.streams 4'")
    args = ap.parse_args()
    if not TEXT.is_file():
        print(f"skipped: {TEXT} not found")
        return 0
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d')}; code {args.code}")
    failures = []
    with tempfile.TemporaryDirectory(prefix="remote-read-") as tmp:
        tmp = Path(tmp)
        data = tmp / "www"
        prepare(data)
        train_bytes, valid_bytes = parquet_bytes(data / "train"), parquet_bytes(data / "valid")
        for ranges in (True, False):
            server = HttpServer.start(data, ranges=ranges)
            cache = tmp / f"cache-{ranges}"
            try:
                t = time.perf_counter()
                index = open_index(server.url("train/"), cache_dir=cache)
                open_index(server.url("valid/"), cache_dir=cache)
                log = server.take_log()
                if ranges:
                    print(f"dataset: train {index.num_samples} samples, {len(index.shards)} shards, {index.num_chunks} "
                          f"row groups, {train_bytes:,} bytes of Parquet; valid {valid_bytes:,} bytes")
                print(f"\nserver {'with' if ranges else 'WITHOUT'} byte ranges. Index build (once per dataset, "
                      f"cached): {bytes_sent(log, '/train/', '.parquet') / train_bytes:.2f}x train bytes, "
                      f"{sum(r.method == 'GET' for r in log)} GETs, {time.perf_counter() - t:.1f} s")
                print("| layout | train bytes served / train Parquet bytes | train GETs per row group | "
                      "valid bytes / valid Parquet bytes | epoch wall time |")
                print("|---|---|---|---|---|")
                for nproc, workers in ((1, 0), (2, 2)):
                    log, seconds, out = train_epoch(server, cache, tmp / f"run-{ranges}-{nproc}", nproc=nproc,
                                                    workers=workers, code=args.code, extra=args.extra.split())
                    served = bytes_sent(log, "/train/", ".parquet")
                    gets = sum(r.method == "GET" and r.path.endswith(".parquet") and r.path.startswith("/train/")
                               for r in log)
                    ratio = served / train_bytes
                    print(f"| {nproc} process{'es' * (nproc > 1)} x {workers} workers | {ratio:.3f} ({served:,}) | "
                          f"{gets / index.num_chunks:.2f} | {bytes_sent(log, '/valid/', '.parquet') / valid_bytes:.3f} | "
                          f"{seconds:.1f} s |")
                    plan = next((line for line in out.splitlines() if line.startswith("data: plan:")), "")
                    if plan:
                        print(f"  {plan}")
                    if ranges:
                        verdict = "PASS" if ratio <= 1.15 else "FAIL"
                        print(f"  {verdict}: (a) {nproc} x {workers}: {ratio:.3f}x <= 1.15x")
                        if verdict == "FAIL":
                            failures.append(f"(a) {nproc} x {workers}")
            finally:
                server.stop()
        if not args.no_throughput:
            print(f"\n| loader alone, 1 process, {EPOCHS} epochs: row groups | workers | local disk | HTTP loopback "
                  f"| ratio |")
            print("|---|---|---|---|---|")
            for rows in (30, 256):
                folder = data if rows == 30 else tmp / f"www-{rows}"
                if rows != 30:
                    prepare(folder, rows)
                failures += throughput(folder, tmp, repeats=2 if args.quick else 5, rows=rows)
    print("\nall targets met" if not failures else f"\nFAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

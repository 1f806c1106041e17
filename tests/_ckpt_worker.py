"""Worker for tests/test_checkpoint.py: run under torchrun (gloo, CPU) or as a plain process.

    save OUT          train a small DDP LSTM 3 steps, save sync to OUT/sync and async to OUT/async
                      (step 3, then 2 more steps and step 5), then a save that fails on the last rank
                      only, to OUT/bad; expected hashes and outcomes -> OUT/expect-rank<r>.json
    load OUT RUN...   fresh model (other seed), load_latest from each RUN -> OUT/load-ws<N>-rank<r>.json
    killtest RUN N SEED   single process: N times fork a child that resumes from RUN (checking that
                      what it loaded is complete), then saves steps forever with every tensor set to
                      the step number; SIGKILL it at a random moment. Forking from a process that
                      imported torch but ran no op keeps each attempt cheap (no re-import).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distlstm.checkpoint.manager import CheckpointManager, rng_state, tree_hash  # noqa: E402


class TinyLSTM(nn.Module):
    def __init__(self, hidden: int = 32, vocab: int = 50, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, hidden, num_layers=2, batch_first=True, dropout=0.2)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(x))[0][:, -1])


def build(seed: int, hidden: int = 32, lr: float = 1e-2):
    torch.manual_seed(seed)
    model = TinyLSTM(hidden)
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return model, optim, sched


def train_steps(model, optim, sched, n: int, gen: torch.Generator) -> None:
    model.train()
    for _ in range(n):
        x = torch.randint(0, 50, (8, 12), generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)


def summary(obj) -> str:
    """Stable digest of a nested rank_state (tensors included), to compare across processes."""
    def plain(o):
        if isinstance(o, torch.Tensor):
            return {"t": o.tolist(), "dtype": str(o.dtype)}
        if isinstance(o, dict):
            return {k: plain(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [type(o).__name__] + [plain(v) for v in o]
        return o
    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()


def make_rank_state(rank: int) -> dict:
    return {"rank": rank, "rng": rng_state(), "vec": torch.arange(4) * rank, "tup": (rank, "x")}


def cmd_save(out: Path, rank: int, world: int) -> None:
    model, optim, sched = build(seed=0)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank; DDP averages grads
    train_steps(model, optim, sched, 3, gen)
    rank_state = make_rank_state(rank)
    state = {"model": model, "optim": optim, "rank_state": rank_state,
             "extra": {"scheduler": sched.state_dict(), "epoch": 1, "consumed": 7}}
    expect = {"h3": tree_hash(model, optim), "rank_state": summary(rank_state), "extra3": state["extra"]}
    sync = CheckpointManager(out / "sync", rank=rank, world_size=world, log=lambda m: None)
    sync.save(3, state)
    sync.close()
    asyn = CheckpointManager(out / "async", rank=rank, world_size=world, async_save=True, log=lambda m: None)
    asyn.save(3, state)
    # Train while the write is in flight: the checkpoint must hold the step-3 snapshot regardless.
    train_steps(model, optim, sched, 2, gen)
    expect["h5"] = tree_hash(model, optim)
    state["extra"] = {"scheduler": sched.state_dict(), "epoch": 1, "consumed": 11}
    asyn.save(5, state)  # waits for and commits step 3 first
    asyn.close()
    # A save that fails on one rank only must raise on every rank (not hang), and the next one works.
    bad = CheckpointManager(out / "bad", rank=rank, world_size=world, log=lambda m: None)
    try:
        bad.save(1, {**state, "rank_state": {"x": object()} if rank == world - 1 else {}})
    except (TypeError, RuntimeError) as e:
        expect["bad_save"] = type(e).__name__
    bad.save(2, state)
    bad.close()
    (out / f"expect-rank{rank}.json").write_text(json.dumps(expect))


def cmd_load(out: Path, runs: list[Path], rank: int, world: int) -> None:
    results = {}
    for run in runs:
        model, optim, sched = build(seed=123, lr=5e-2)
        mgr = CheckpointManager(run, rank=rank, world_size=world, log=lambda m: None)
        got = mgr.load_latest({"model": model, "optim": optim})
        sched.load_state_dict(got["extra"]["scheduler"])
        rs = got["rank_state"]
        results[str(run)] = {"step": got["step"], "world_size": got["world_size"], "extra": got["extra"],
                             "hash": tree_hash(model, optim),
                             "rank_state": None if rs is None else summary(rs)}
        mgr.close()
    (out / f"load-ws{world}-rank{rank}.json").write_text(json.dumps(results))


def fill_all(model: nn.Module, optim: torch.optim.Optimizer, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        for st in optim.state.values():
            for t in st.values():
                t.fill_(value)


def consistent(model: nn.Module, optim: torch.optim.Optimizer, step: int) -> bool:
    tensors = list(model.parameters()) + [t for st in optim.state.values() for t in st.values()]
    return all(bool((t == float(step)).all()) for t in tensors)


def cmd_killloop(run: Path, ready) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 512)).sum().backward()
    optim.step()  # creates the optimizer state that fill_all overwrites
    mgr = CheckpointManager(run, rank=0, world_size=1, keep_last=2, keep_every=0, log=lambda m: None)
    state = {"model": model, "optim": optim}
    got = mgr.load_latest(state)
    start = 0
    if got is not None:
        start = got["step"]
        ok = (consistent(model, optim, start) and got["extra"] == {"step": start}
              and got["rank_state"] == {"step": start})
        if not ok:
            ready(f"BAD: loaded {got['path']} is inconsistent with step {start}")
            return
    ready(f"ready {start}")
    for step in range(start + 1, start + 100_000):
        fill_all(model, optim, float(step))
        mgr.save(step, {**state, "extra": {"step": step}, "rank_state": {"step": step}})


def cmd_killtest(run: Path, attempts: int, seed: int) -> None:
    import torch._dynamo  # noqa: F401  (the optimizer imports it lazily; do it once, before forking)

    rng = random.Random(seed)
    resumed = []
    for attempt in range(attempts):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns into the supervisor's code
            os.close(r)
            try:
                cmd_killloop(run, lambda msg: os.write(w, (msg + "\n").encode()))
            except BaseException:
                traceback.print_exc()
                os.write(w, b"BAD: exception (traceback above)\n")
            finally:
                os._exit(3)
        os.close(w)
        with os.fdopen(r) as pipe:
            line = pipe.readline()
            if line.startswith("ready"):
                resumed.append(int(line.split()[1]))
                time.sleep(rng.uniform(0.0, 0.5))
            os.kill(pid, signal.SIGKILL)  # whatever phase of save() it is in
            os.waitpid(pid, 0)
        if not line.startswith("ready"):
            print(f"FAIL attempt {attempt} (seed {seed}): {line.strip() or 'child died before ready'}", flush=True)
            sys.exit(1)
    print("resumed " + json.dumps(resumed), flush=True)


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    try:
        if cmd == "save":
            cmd_save(Path(args[0]), rank, world)
        elif cmd == "load":
            cmd_load(Path(args[0]), [Path(a) for a in args[1:]], rank, world)
        elif cmd == "killtest":
            cmd_killtest(Path(args[0]), int(args[1]), int(args[2]))
        else:
            raise SystemExit(f"unknown command {cmd!r}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

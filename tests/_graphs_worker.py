"""Helpers for tests/test_graphs_fake.py, and its torchrun worker: one rank of a 2-rank gloo DDP run
that trains the same steps eagerly and with StepGraphs on the fake backend (tests/fake_graphs.py),
and saves what each step did and the final parameters."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from distlstm.config import Config, ModelConfig, OptimConfig, TrainConfig
from distlstm.data.batch import Batch
from distlstm.distributed.parallel import AmpPolicy, apply_ddp, control_group, ddp_options
from distlstm.distributed.world import World, destroy_process_group, detect_world, init_process_group
from distlstm.models.lstm import build_model
from distlstm.run.bptt import StateCarrier
from distlstm.run.graphs import StepGraphs, _key
from distlstm.run.trainer import Trainer, build_optimizer
from tests.fake_graphs import FakeGraphs, persistent_tensors

CPU = torch.device("cpu")
SHAPES = {"A": (4, 6), "B": (3, 9), "C": (5, 4), "D": (2, 11)}
"""Bounded batch shapes (rows, columns) by name."""


def lm_batch(shape: str, seed: int, weight: float = 1.0) -> Batch:
    """An lm batch of `shape` with ragged lengths (targets -100 past each length), counted as the
    loader worker counts it; `weight` 0 makes it a filler batch."""
    rows, steps = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, steps + 1, (rows,), generator=g)
    x = torch.randint(1, 20, (rows, steps + 1), generator=g)
    inside = torch.arange(steps)[None] < lengths[:, None]
    inputs = x[:, :-1] * inside
    targets = torch.where(inside, x[:, 1:], torch.full_like(inputs, -100))
    return Batch(inputs, lengths, targets, torch.arange(rows), weight=weight, tokens=int(lengths.sum()),
                 items=int(inside.sum()))


def stream_batches(n: int, rows: int = 3, columns: int = 7, seed: int = 0) -> list[Batch]:
    """lm stream chunks: full-length rows, documents starting anywhere (column 0 included)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randint(1, 20, (rows, columns + 1), generator=g)
        reset = torch.rand(rows, columns, generator=g) < 0.15
        out.append(Batch(x[:, :-1], torch.full((rows,), columns), x[:, 1:].clone(), torch.arange(rows),
                         items=rows * columns, tokens=rows * columns, reset=reset))
    return out


def batches(shapes: str, seed: int = 0) -> list[Batch]:
    """One batch per letter of `shapes`; a lower-case letter is a filler batch (weight 0)."""
    return [lm_batch(s.upper(), seed + i, weight=0.0 if s.islower() else 1.0) for i, s in enumerate(shapes)]


def make_trainer(*, accum: int = 1, world: World | None = None, group=None, dropout: float = 0.2,
                 embed_dropout: float | None = None, graphs: bool = False, limit: int = 16, log=None, backend=None,
                 stream: bool = False) -> Trainer:
    """A small lm trainer (2 LSTM layers, dropout everywhere, a warmup schedule: the LR changes every
    step), DDP-wrapped when `world` has several ranks; `graphs`: StepGraphs on the fake backend. The
    weights are seeded alike every time, the training RNG (dropout) by rank."""
    world = world or detect_world({})
    cfg = Config(model=ModelConfig(task="lm", input="tokens", hidden_size=12, embed_size=8, num_layers=2,
                                   dropout=dropout, embed_dropout=dropout if embed_dropout is None else embed_dropout),
                 optim=OptimConfig(warmup_steps=5), train=TrainConfig(accum_steps=accum))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=20, input_size=0, num_classes=0)
    wrapped = apply_ddp(model, world, CPU, **ddp_options(cfg.train))
    optimizer, scheduler = build_optimizer(model, cfg.optim, 40, CPU)
    trainer = Trainer(cfg, world, model=wrapped, optimizer=optimizer, scheduler=scheduler, amp=AmpPolicy("fp32", CPU),
                      device=CPU, train_loader=_Loader(), control_group=group)
    if stream:  # lm stream mode: the state carried from chunk to chunk (a stream loader's carrier)
        trainer.carry = StateCarrier(stream=True, layout_key=lambda: "test", device=CPU)
    if graphs:
        trainer.graphs = StepGraphs(trainer, limit=limit, log=log or (lambda msg: None),
                                    backend=backend or FakeGraphs(watch=persistent_tensors(trainer)))
    torch.manual_seed(1 + world.rank)
    return trainer


class _Loader:
    """What the trainer asks of its loader outside `fit`: the epoch, and a checkpoint component."""

    epoch = 0

    def state_dict(self) -> dict:
        return {"epoch": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


def train(trainer: Trainer, steps: list[list[Batch]]) -> list[bool]:
    """Run the steps; which of them were replayed."""
    replayed = []
    for micro in steps:
        before = trainer.graphs.replays if trainer.graphs is not None else 0
        trainer.train_step(micro)
        replayed.append(trainer.graphs is not None and trainer.graphs.replays > before)
    return replayed


def rank_steps(rank: int, accum: int) -> list[list[Batch]]:
    """Rank 0 cycles A, B; rank 1 cycles C, A, until step 13, where rank 1 alone meets a new
    shape (D) while every key of rank 0's step is captured. accum=2: each step's micro-batches are
    two shapes."""
    per_rank = ["ABABABABABABABABAB", "CACACACACACACDCACA"][rank]
    if accum == 1:
        return [[b] for b in batches(per_rank, seed=100 * rank)]
    second = batches("CCCCCCCCCCCCCcCCCC" if rank == 0 else "BBBBBBBBBBBBBBBBBB", seed=100 * rank + 50)
    return [[a, b] for a, b in zip(batches(per_rank, seed=100 * rank), second)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    world = detect_world()
    init_process_group(world, backend="gloo", timeout_s=60)
    group = control_group("gloo")
    result = {}
    for accum in (1, 2):
        steps = rank_steps(world.rank, accum)
        eager = make_trainer(accum=accum, world=world, group=group)
        eager_replayed = train(eager, steps)
        graphed = make_trainer(accum=accum, world=world, group=group, graphs=True)
        captured_before = []  # every key of this rank's step captured before the step ran
        replayed = []
        for micro in steps:
            keys = [_key(b, final=i == len(micro) - 1) for i, b in enumerate(micro)]
            captured_before.append(all(k in graphed.graphs.graphs for k in keys))
            replayed += train(graphed, [micro])
        result[accum] = {"replayed": replayed, "eager_replayed": eager_replayed, "captured_before": captured_before,
                         "graphs": len(graphed.graphs.graphs), "summary": graphed.graphs.summary(),
                         "lr_floats": all(isinstance(g["lr"], float) for g in graphed.optimizer.param_groups)}
        torch.save({"eager": [p.detach().clone() for p in eager.model.parameters()],
                    "graphed": [p.detach().clone() for p in graphed.model.parameters()],
                    "loss": (float(eager.loss_sum), float(graphed.loss_sum))},
                   f"{args.out}.rank{world.rank}.accum{accum}.pt")
    # lm stream mode: the carried state in the graphs' static buffers, under DDP.
    chunks = [[b] for b in stream_batches(16, seed=10 * world.rank)]
    eager = make_trainer(world=world, group=group, stream=True, dropout=0.0)
    train(eager, chunks)
    graphed = make_trainer(world=world, group=group, stream=True, dropout=0.0, graphs=True)
    result["stream"] = {"replayed": train(graphed, chunks), "summary": graphed.graphs.summary()}
    torch.save({"eager": [p.detach().clone() for p in eager.model.parameters()] + list(eager.carry.state),
                "graphed": [p.detach().clone() for p in graphed.model.parameters()] + list(graphed.carry.state),
                "loss": (float(eager.loss_sum), float(graphed.loss_sum))},
               f"{args.out}.rank{world.rank}.accumstream.pt")
    with open(f"{args.out}.rank{world.rank}.json", "w") as f:
        json.dump(result, f)
    destroy_process_group(barrier=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


"""Worker for tests/test_equivalence.py: one process of a (world, accum) configuration computes the
gradient of one optimizer step over fixed variable-length batches and saves it (rank 0)."""

import argparse
import sys

import torch

from distlstm.config import Config, ModelConfig, TrainConfig
from distlstm.data.batch import Batch
from distlstm.models.lstm import build_model
from distlstm.distributed.parallel import AmpPolicy, apply_ddp, control_group, ddp_options
from distlstm.run.trainer import Trainer, build_optimizer
from distlstm.distributed.world import destroy_process_group, detect_world, init_process_group


def make_batches(task: str, n: int, seed: int = 0) -> list[Batch]:
    """`n` batches of different sizes and very different lengths (ids are unique per sample)."""
    g = torch.Generator().manual_seed(seed)
    out, sid = [], 0
    for b in range(n):
        size = 3 + b
        lengths = torch.randint(2, 9 + 6 * b, (size,), generator=g)
        T = int(lengths.max())
        x = torch.randint(1, 20, (size, T), generator=g) * (torch.arange(T)[None] < lengths[:, None])
        if task == "lm":
            y = torch.where(torch.arange(T)[None] < (lengths[:, None] - 1), x.roll(-1, 1), torch.full_like(x, -100))
        else:
            y = torch.randint(0, 3, (size,), generator=g)
        out.append(Batch(x, lengths, y, torch.arange(sid, sid + size)))
        sid += size
    return out


def concat(batches: list[Batch], task: str) -> Batch:
    T = max(b.inputs.shape[1] for b in batches)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=v)  # noqa: E731
    x = torch.cat([pad(b.inputs, 0) for b in batches])
    y = torch.cat([pad(b.targets, -100) for b in batches]) if task == "lm" else torch.cat([b.targets for b in batches])
    return Batch(x, torch.cat([b.lengths for b in batches]), y, torch.cat([b.sample_ids for b in batches]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accum", type=int, required=True)
    ap.add_argument("--task", default="classify")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--one-batch", action="store_true", help="concatenate all batches into one")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="train.ddp_bucket_mb")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    world = detect_world()
    init_process_group(world, backend="gloo", timeout_s=60)
    cfg = Config(model=ModelConfig(task=args.task, input="tokens", hidden_size=16, embed_size=8, num_layers=2),
                 train=TrainConfig(accum_steps=args.accum, ddp_bucket_mb=args.bucket_mb))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=20, input_size=0, num_classes=3).double()
    ddp = apply_ddp(model, world, torch.device("cpu"), **ddp_options(cfg.train))
    optimizer, scheduler = build_optimizer(model, cfg.optim, 10, torch.device("cpu"))
    trainer = Trainer(cfg, world, model=ddp, optimizer=optimizer, scheduler=scheduler,
                      amp=AmpPolicy("fp32", torch.device("cpu")), device=torch.device("cpu"),
                      train_loader=None, control_group=control_group("gloo"))
    batches = make_batches(args.task, args.batches)
    if args.one_batch:
        batches = [concat(batches, args.task)]
    # Global batch g goes to rank g % world_size, as in the data plan.
    mine = batches[world.rank::world.world_size]
    assert len(mine) == args.accum, (len(mine), args.accum)
    trainer.forward_backward(mine)
    if world.is_leader:
        torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, args.out)
    destroy_process_group(barrier=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

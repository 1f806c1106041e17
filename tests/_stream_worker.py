"""Worker for tests/test_equivalence.py: one rank of an lm stream-mode run over a Parquet stream takes
two optimizer steps of `--accum` chunks each (the LSTM state carried across chunks and steps) and
saves the gradient of the second step (rank 0)."""

import argparse
import sys

import torch

from distlstm.config import Config, ModelConfig, TrainConfig
from distlstm.data.shards.index import open_index
from distlstm.data.plan.stream import StreamParams
from distlstm.data.loader.stream_loader import StreamLoader
from distlstm.models.lstm import build_model
from distlstm.distributed.parallel import AmpPolicy, apply_ddp, control_group
from distlstm.run.trainer import Trainer, build_optimizer
from distlstm.distributed.world import destroy_process_group, detect_world, init_process_group


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--global-rows", type=int, required=True)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--state-reset", type=float, default=0.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    world = detect_world()
    init_process_group(world, backend="gloo", timeout_s=60)
    cfg = Config(model=ModelConfig(task="lm", input="tokens", hidden_size=16, embed_size=8, num_layers=2),
                 train=TrainConfig(accum_steps=args.accum))
    index = open_index(args.data, cache_dir=args.cache)
    loader = StreamLoader(index, StreamParams(batch_size=args.global_rows // world.world_size, bptt=6,
                                                    state_reset=args.state_reset), seed=0,
                          dp_rank=world.rank, dp_world_size=world.world_size, max_epochs=1)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=40, input_size=0, num_classes=0).double()
    ddp = apply_ddp(model, world, torch.device("cpu"))
    optimizer, scheduler = build_optimizer(model, cfg.optim, 10, torch.device("cpu"))
    trainer = Trainer(cfg, world, model=ddp, optimizer=optimizer, scheduler=scheduler,
                      amp=AmpPolicy("fp32", torch.device("cpu")), device=torch.device("cpu"),
                      train_loader=loader, control_group=control_group("gloo"))
    batches = iter(loader)
    trainer.train_step([next(batches) for _ in range(args.accum)])
    trainer.forward_backward([next(batches) for _ in range(args.accum)])
    if world.is_leader:
        torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, args.out)
    destroy_process_group(barrier=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Trainer overhead: `Trainer.train_step` against a bare `nn.LSTM` fwd+bwd + linear head + AdamW on
the same padded batches, measured in the same run, on whatever device is there (CUDA if present).

    python bench/train_step.py                       # CPU here; on a GPU: bf16, H=1024 x 2, B=128, T=128
    python bench/train_step.py --hidden 256 --batch 32 --seq 64 --precision fp32 --steps 20

Prints tokens/s for both and the ratio trainer/bare: what the loop, the masked loss, the global
token normalisation, clipping and the non-finite guard cost. A diagnostic, not a gate (exit 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distlstm.config import Config, ModelConfig, TrainConfig  # noqa: E402
from distlstm.data.batch import Batch  # noqa: E402
from distlstm.models.lstm import build_model  # noqa: E402
from distlstm.distributed.parallel import AmpPolicy  # noqa: E402
from distlstm.run.trainer import Trainer, build_optimizer  # noqa: E402
from distlstm.distributed.world import detect_world  # noqa: E402


class _Loader:
    epoch = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--hidden", type=int, default=1024 if cuda else 256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128 if cuda else 32)
    ap.add_argument("--seq", type=int, default=128 if cuda else 64)
    ap.add_argument("--vocab", type=int, default=32000 if cuda else 4000)
    ap.add_argument("--precision", default="bf16" if cuda else "fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=50 if cuda else 10)
    a = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(task="lm", input="tokens", hidden_size=a.hidden, embed_size=a.hidden,
                                   num_layers=a.layers), train=TrainConfig(precision=a.precision))
    x = torch.randint(1, a.vocab, (a.batch, a.seq + 1))
    lengths = torch.full((a.batch,), a.seq)
    batch = Batch(x[:, :-1].contiguous(), lengths, x[:, 1:].contiguous(), torch.arange(a.batch))
    tokens = a.batch * a.seq

    model = build_model(cfg.model, vocab_size=a.vocab, input_size=0, num_classes=0).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, 10**6, device)
    trainer = Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                      amp=AmpPolicy(a.precision, device), device=device, train_loader=_Loader())

    # The bare baseline: the same layers, plain cross-entropy, no masking, no guard.
    emb = nn.Embedding(a.vocab, a.hidden).to(device)
    lstm = nn.LSTM(a.hidden, a.hidden, a.layers, batch_first=True).to(device)
    head = nn.Linear(a.hidden, a.vocab).to(device)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    inp, tgt = batch.inputs.to(device), batch.targets.to(device)
    amp = AmpPolicy(a.precision, device)

    def bare() -> None:
        with amp.autocast():
            out, _ = lstm(emb(inp))
            logits = head(out)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        (amp.scaler.scale(loss) if amp.scaler else loss).backward()
        if amp.scaler:
            amp.scaler.step(opt)
            amp.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    # Alternate the two, best of 3 rounds each: the least disturbed by other load on the machine.
    trainer_s = bare_s = float("inf")
    for _ in range(3):
        trainer_s = min(trainer_s, timed(lambda: trainer.train_step([batch]), a.steps, device))
        bare_s = min(bare_s, timed(bare, a.steps, device))
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device {name}, {a.precision}, H={a.hidden} x {a.layers}, B={a.batch}, T={a.seq}, vocab {a.vocab}")
    print(f"bare nn.LSTM step: {tokens * a.steps / bare_s / 1e6:.3f} M tokens/s")
    print(f"Trainer.train_step: {tokens * a.steps / trainer_s / 1e6:.3f} M tokens/s")
    print(f"trainer / bare = {bare_s / trainer_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

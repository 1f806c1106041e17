"""What train.precision=bf16 really runs (issue 18, defect 1): the LSTM kernels' dtypes, the
gradient against fp32, and the host syncs of an eager step.

    python bench/gpu_precision.py               # on a GPU: H=1024 x 2, lm, 32 x 256 tokens
    python bench/gpu_precision.py --tiny        # any machine: small sizes
    python bench/gpu_precision.py --out r.json  # also write the results as JSON

One Trainer per precision (fp32, bf16), the same seed and the same batch: one forward/backward
each, the bf16 one under torch.profiler. Reported:
- kernels: the LSTM kernels of the bf16 step (cuDNN's RNN kernels, elemWise/LSTM element-wise and
  the GEMMs they call) and every kernel whose name says half precision (`__half`, `_hsh`, `f16`):
  an fp16 kernel in a bf16 step is the defect; on a CPU "not measured";
- cosine of the whole bf16 gradient (the fp32 master weights' .grad) with the fp32 one, and per LSTM
  weight: goal >= 0.999;
- warnings during the bf16 step (cuDNN compacting non-contiguous weights every call would say so);
- host syncs of a full eager train_step (torch.cuda.set_sync_debug_mode("warn")): each is one warning.
Exit status 0 unless a measured check fails (a CPU run checks the cosine only).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distlstm.config import Config, ModelConfig, TrainConfig  # noqa: E402
from distlstm.data.batch import Batch  # noqa: E402
from distlstm.distributed.parallel import AmpPolicy  # noqa: E402
from distlstm.distributed.world import detect_world  # noqa: E402
from distlstm.models.lstm import build_model  # noqa: E402
from distlstm.run.trainer import Trainer, build_optimizer  # noqa: E402

HALF_MARKS = ("__half", "_hsh", "f16", "half")
LSTM_MARKS = ("rnn", "lstm", "elemwise")


class _Loader:
    epoch = 0


def make_trainer(args, precision: str, device: torch.device) -> Trainer:
    cfg = Config(model=ModelConfig(task="lm", input="tokens", hidden_size=args.hidden, embed_size=args.hidden,
                                   num_layers=args.layers), train=TrainConfig(precision=precision))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=args.vocab, input_size=0, num_classes=0).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, 100, device)
    return Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                   amp=AmpPolicy(precision, device), device=device, train_loader=_Loader())


def make_batch(args) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.rows, args.length), generator=g)
    lengths = torch.full((args.rows,), args.length)
    y = x.roll(-1, 1)
    y[:, -1] = -100
    return Batch(x, lengths, y, torch.arange(args.rows), items=args.rows * (args.length - 1),
                 tokens=args.rows * args.length)


def is_half(kernel: str) -> bool:
    """Whether a kernel's name says fp16 (bf16 names contain "f16" too: taken out first)."""
    name = kernel.lower().replace("bfloat16", "").replace("bf16", "")
    return any(m in name for m in HALF_MARKS)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.vocab, args.rows, args.length = 32, 1, 50, 4, 12
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batch = make_batch(args)
    if cuda:
        batch = batch.pin_memory()
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "CPU",
                     "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if cuda else None,
                     "sizes": {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "rows", "length")}}

    grads = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(args, precision, device)
        results.setdefault("startup", {})[precision] = trainer.amp.describe()
        trainer.forward_backward([batch])  # warm-up: cuDNN plans, allocator
        trainer.optimizer.zero_grad(set_to_none=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with warnings.catch_warnings(record=True) as caught, profile(activities=activities) as prof:
            warnings.simplefilter("always")
            trainer.forward_backward([batch])
            if cuda:
                torch.cuda.synchronize(device)
        grads[precision] = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
        if precision == "bf16":
            results["grad_dtypes"] = sorted({str(g.dtype) for g in grads[precision].values()})
            results["warnings"] = sorted({str(w.message)[:200] for w in caught})
            if cuda:
                names = sorted({e.key for e in prof.key_averages()
                                if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA})
                results["lstm_kernels"] = [n for n in names if any(m in n.lower() for m in LSTM_MARKS)]
                results["half_kernels"] = [n for n in names if is_half(n)]
            # Host syncs of a whole eager step (forward, backward, clip, fused optimizer), after a
            # first step that creates the optimizer state.
            if cuda:
                trainer.train_step([batch])
                torch.cuda.synchronize(device)
                with warnings.catch_warnings(record=True) as syncs:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        trainer.train_step([batch])
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize(device)
                results["step_syncs"] = [str(w.message)[:200] for w in syncs
                                         if "synchroniz" in str(w.message).lower()]

    flat = {p: torch.cat([g.flatten().double() for g in grads[p].values()]) for p in grads}
    results["cosine_all"] = cosine(flat["bf16"], flat["fp32"])
    results["cosine_lstm"] = {n: cosine(grads["bf16"][n], grads["fp32"][n]) for n in grads["bf16"] if n.startswith("lstm.weight")}

    checks = {"gradient cosine >= 0.999 (bf16 vs fp32)": min([results["cosine_all"], *results["cosine_lstm"].values()]) >= 0.999,
              "master gradients fp32": results["grad_dtypes"] == ["torch.float32"]}
    if cuda:
        checks["no half-precision kernel in the bf16 step"] = not results["half_kernels"]
        checks["the LSTM ran cuDNN/RNN kernels"] = bool(results["lstm_kernels"])
        checks["no host sync in an eager bf16 step"] = not results["step_syncs"]
    results["checks"] = {k: ("PASS" if v else "FAIL") for k, v in checks.items()}
    if not cuda:
        for k in ("kernel dtypes (half kernels in a bf16 step)", "host syncs of an eager step"):
            results["checks"][k] = "not measured (no CUDA device)"

    print(f"device {results['device']}, torch {results['torch']}, cuDNN {results['cudnn']}; sizes {results['sizes']}")
    print(f"startup line for bf16: precision: {results['startup']['bf16']}")
    print(f"bf16 gradient cosine vs fp32: all {results['cosine_all']:.6f}; LSTM weights "
          + ", ".join(f"{n} {c:.6f}" for n, c in results["cosine_lstm"].items()))
    if cuda:
        print(f"LSTM kernels in the bf16 step: {results['lstm_kernels'] or 'none'}")
        print(f"half-precision kernels in the bf16 step: {results['half_kernels'] or 'none'}")
        print(f"host syncs in an eager bf16 train_step: {len(results['step_syncs'])} {results['step_syncs'][:3]}")
    print(f"warnings in the bf16 step: {results['warnings'] or 'none'}")
    for k, v in results["checks"].items():
        print(f"{v}: {k}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return int(any(v == "FAIL" for v in results["checks"].values()))


if __name__ == "__main__":
    raise SystemExit(main())

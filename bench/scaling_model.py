"""The step-time model of docs/scaling.md: predicted weak-scaling efficiency of data-parallel LSTM
training, and the tokens per GPU per optimizer step needed to stay above a target efficiency.

    python bench/scaling_model.py                 # the tables of docs/scaling.md
    python bench/scaling_model.py --target 0.95   # another target efficiency

Arithmetic only, nothing is measured here. Per optimizer step and GPU:

    compute = tokens_per_step / tokens_per_s          tokens_per_step = data.max_tokens x train.accum_steps
    comm    = 2 (N - 1) / N x gradient_bytes / bw     ring all-reduce, bandwidth term only
    efficiency = compute / (compute + comm)           no overlap: see docs/scaling.md

tokens_per_s comes from FLOPs: 6 x (LSTM parameters) per token (forward + backward), at the
achieved TFLOP/s of the measured H100 anchors in ../shared/DESIGN.md where there is one, else an
assumption (marked). Gradients are fp32 (4 bytes per parameter): DDP all-reduces the gradients in
the parameters' dtype, and autocast keeps parameters in fp32.
"""

from __future__ import annotations

import argparse

# (name, hidden, layers, achieved TFLOP/s at a 64k-token batch, source)
MODELS = [
    ("512 x 1", 512, 1, 100.0, "assumption (small GEMMs: launch-bound, below the B=128 anchor's 130)"),
    ("1024 x 2", 1024, 2, 339.0, "anchor: H100 bf16, B=512 T=128, 3.37 M tok/s"),
    ("2048 x 2", 2048, 2, 400.0, "assumption (between the 1024x2 and 2048x4 anchors)"),
    ("2048 x 4", 2048, 4, 413.0, "anchor: H100 bf16, B=256 T=256, 0.51 M tok/s"),
    ("4096 x 4", 4096, 4, 413.0, "assumption (as 2048x4: GEMM-bound at the same efficiency)"),
]
# (GPUs, bus bandwidth GB/s per GPU, what)
LINKS = [
    (8, 370.0, "one node, NVLink (NCCL ring ~370 GB/s)"),
    (64, 25.0, "8 nodes, 25 GB/s per GPU between nodes"),
    (64, 50.0, "8 nodes, 50 GB/s per GPU between nodes"),
    (256, 25.0, "32 nodes, 25 GB/s"),
    (256, 50.0, "32 nodes, 50 GB/s"),
]
BUDGET = 65536  # data.max_tokens of the anchors (length-sorted 64k-token batches)


def lstm_params(hidden: int, layers: int, inputs: int | None = None) -> int:
    """nn.LSTM weights and biases, input size = hidden (the embedding or previous layer)."""
    inputs = hidden if inputs is None else inputs
    per = lambda i: 4 * hidden * (i + hidden) + 8 * hidden  # noqa: E731
    return per(inputs) + (layers - 1) * per(hidden)


def step(params: int, tflops: float, gpus: int, bw_gbs: float, tokens: int) -> tuple[float, float]:
    """(compute seconds, all-reduce seconds) of one optimizer step on one GPU."""
    rate = tflops * 1e12 / (6 * params)
    comm = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * 4 * params / (bw_gbs * 1e9)
    return tokens / rate, comm


def needed_tokens(params: int, tflops: float, gpus: int, bw_gbs: float, target: float) -> float:
    """Tokens per GPU per step for compute / (compute + comm) >= target."""
    _, comm = step(params, tflops, gpus, bw_gbs, 0)
    rate = tflops * 1e12 / (6 * params)
    return comm * rate * target / (1 - target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=0.9)
    args = ap.parse_args()
    print("| LSTM (H x layers) | parameters | fp32 gradients | tokens/s per GPU | source |")
    print("|---|---|---|---|---|")
    for name, h, layers, tflops, source in MODELS:
        p = lstm_params(h, layers)
        print(f"| {name} | {p / 1e6:.1f} M | {4 * p / 1e6:.0f} MB | {tflops * 1e12 / (6 * p) / 1e6:.2f} M | {source} |")
    print(f"\nPredicted weak-scaling efficiency, data.max_tokens={BUDGET}, train.accum_steps=1:\n")
    print("| LSTM | compute per step | " + " | ".join(f"{n} GPUs @ {bw:.0f} GB/s" for n, bw, _ in LINKS) + " |")
    print("|---|---|" + "---|" * len(LINKS))
    for name, h, layers, tflops, _ in MODELS:
        p = lstm_params(h, layers)
        cells = []
        for n, bw, _ in LINKS:
            c, m = step(p, tflops, n, bw, BUDGET)
            cells.append(f"{c / (c + m):.0%} ({m * 1e3:.1f} ms)")
        print(f"| {name} | {step(p, tflops, 1, 1, BUDGET)[0] * 1e3:.1f} ms | " + " | ".join(cells) + " |")
    print(f"\nTokens per GPU per optimizer step for >= {args.target:.0%} (and train.accum_steps at "
          f"data.max_tokens={BUDGET}):\n")
    print("| LSTM | " + " | ".join(f"{n} GPUs @ {bw:.0f} GB/s" for n, bw, _ in LINKS) + " |")
    print("|---|" + "---|" * len(LINKS))
    for name, h, layers, tflops, _ in MODELS:
        p = lstm_params(h, layers)
        cells = []
        for n, bw, _ in LINKS:
            need = needed_tokens(p, tflops, n, bw, args.target)
            cells.append(f"{need / 1e3:.0f}k (accum {max(1, -(-int(need) // BUDGET))})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""`python -m distlstm.export RUN --format safetensors|torchscript|onnx --out DIR`: the trained model
in a form that runs without this package's training code.

    python -m distlstm.export runs/default-1a2b3c4d --format onnx --out exported/
    python -m distlstm.export RUN --format torchscript --checkpoint best --out exported/

Every format writes `model.safetensors`, `config.json` (and the run's vocab.json / labels.json), so
`distlstm.load(DIR)` reads the folder back; `torchscript` adds `model.torchscript.pt` (for
`torch.jit.load`) and `onnx` adds `model.onnx` (the TorchScript-based exporter, opset 17; for
onnxruntime, extra `[export]`). Both take `inputs` ((B, T) int64 token ids or (B, T, F) float32
features, right-padded) and `lengths` ((B,) int64), any B and T, and return what the model's
forward returns (see config.json's "inputs"); the ONNX graph of a per-step model (tag, lm) has no
`lengths` input, since its outputs do not depend on it (ignore the steps past each length). After writing, the export is loaded back and run on a
batch of another shape; it fails if the outputs differ from the model's by more than --atol.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from distlstm.checkpoint.artifacts import run_config
from distlstm.commands import CHECKPOINT_HELP, load_weights, main_wrapper, parser

FORMATS = ("safetensors", "torchscript", "onnx")
TORCHSCRIPT = "model.torchscript.pt"
ONNX = "model.onnx"


def example_batch(model, batch: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch for the model's inputs, the first sample full length, the rest shorter."""
    g = torch.Generator().manual_seed(seed)
    if model.input == "tokens":
        inputs = torch.randint(0, model.embedding.num_embeddings, (batch, steps), generator=g)
    else:
        inputs = torch.randn(batch, steps, model.lstm.input_size, generator=g)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    mask = torch.arange(steps) < lengths[:, None]
    inputs = inputs * (mask[..., None] if inputs.ndim == 3 else mask)
    return inputs, lengths


def export_torchscript(model, path: Path) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(model, example_batch(model, 3, 7), check_trace=False)
    torch.jit.save(traced, str(path))


def export_onnx(model, path: Path) -> None:
    import warnings
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise ValueError("--format onnx needs the onnx package: pip install 'distlstm[export]'") from None
    per_step = model.spec.per_step
    out_axes = {0: "batch", 1: "steps"} if per_step else {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter warns that an LSTM exported with batch > 1 may break at another batch
        # size when h0/c0 are traced as constants; ours start from zeros sized from the input, and
        # the round trip below checks another batch size.
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        # dynamo=False on purpose: the torch.export-based exporter does not handle nn.LSTM reliably.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(model, example_batch(model, 3, 7), str(path), dynamo=False, opset_version=17,
                          input_names=["inputs", "lengths"], output_names=["outputs"],
                          dynamic_axes={"inputs": {0: "batch", 1: "steps"}, "lengths": {0: "batch"},
                                        "outputs": out_axes})


def run_exported(fmt: str, out: Path, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The exported model's outputs for a batch, through torch.jit / onnxruntime / distlstm.load."""
    if fmt == "torchscript":
        return torch.jit.load(str(out / TORCHSCRIPT))(inputs, lengths)
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ValueError("checking an ONNX export needs onnxruntime: pip install 'distlstm[export]'") from None
        sess = onnxruntime.InferenceSession(str(out / ONNX), providers=["CPUExecutionProvider"])
        # A per-step model (tag, lm) does not read `lengths` (outputs past a length are ignored), so
        # the exported graph has no such input; feed what the graph takes.
        feed = {"inputs": inputs.numpy(), "lengths": lengths.numpy()}
        return torch.from_numpy(sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})[0])
    from distlstm.checkpoint.artifacts import load
    return load(out).model(inputs, lengths)


def export(model, cfg, fmt: str, out: Path, *, step: int, source: Path | None, atol: float = 1e-4) -> float:
    """Write `model` in `fmt` to `out`; returns the largest output difference of the round trip."""
    from distlstm.checkpoint.artifacts import write_model
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    model = model.cpu().eval()
    if model.bidirectional and fmt != "safetensors":
        raise ValueError(f"--format {fmt} supports unidirectional models only (a bidirectional model packs its "
                         f"batches, which does not export with dynamic shapes); use --format safetensors")
    write_model(model, cfg, out, step=step, source=source)
    if fmt == "torchscript":
        export_torchscript(model, out / TORCHSCRIPT)
    elif fmt == "onnx":
        export_onnx(model, out / ONNX)
    inputs, lengths = example_batch(model, 5, 11, seed=1)
    with torch.no_grad():
        want = model(inputs, lengths)
        got = run_exported(fmt, out, inputs, lengths)
    err = float((got.float() - want.float()).abs().max())
    if not err <= atol:
        raise ValueError(f"the {fmt} export in {out} differs from the model by {err:.3g} (> --atol {atol}) on a "
                         f"batch of another shape; please report this with the run's config.json")
    return err


def run(argv: list[str]) -> int:
    p = parser("export", __doc__)
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    p.add_argument("--out", required=True, help="folder to write into (created)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--atol", type=float, default=1e-4, help="largest output difference the round trip accepts")
    args = p.parse_args(argv)
    run_dir, out = Path(args.run), Path(args.out)
    if out.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out} is the run directory; export into a folder of its own")
    from distlstm.distributed.world import detect_world
    if not detect_world().is_leader:
        return 0  # under torchrun: one writer (rank 0), not several racing on the same files
    cfg = run_config(run_dir, [])
    from distlstm.models.lstm import build_model
    model = build_model(cfg.model)
    loaded = load_weights(model, run_dir, args.checkpoint)
    err = export(model, cfg, args.format, out, step=loaded["step"], source=run_dir, atol=args.atol)
    print(f"exported {loaded['checkpoint']} (step {loaded['step']}) as {args.format} to {out}; "
          f"round trip max |difference| {err:.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_wrapper(run, argv)


if __name__ == "__main__":
    sys.exit(main())

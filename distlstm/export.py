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

The export is atomic: everything is written into a hidden sibling of --out (`.NAME.partial-PID`,
marked unfinished by an `INCOMPLETE` file that `distlstm.load` refuses), checked there, and only then
renamed to --out, replacing an earlier export there. A failed or stopped export (SIGTERM, Ctrl-C)
removes its partial folder and leaves --out as it was. --out may not be inside a run's checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from distlstm.checkpoint.artifacts import (
    CHECKPOINT_HELP,
    CONFIG,
    FORMAT,
    INCOMPLETE,
    LABELS,
    VOCAB,
    WEIGHTS,
    load_weights,
    run_config,
    write_model,
)
from distlstm.checkpoint.manager import MANIFEST
from distlstm.config import command_parser
from distlstm.distributed.session import run_command
from distlstm.distributed.world import detect_world
from distlstm.models.lstm import build_model

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
        # The exporter passes every argument by position, as a tensor: SequenceModel.forward's
        # `if with_state:` then warns that it is traced as a constant. It is one (export never
        # carries a state), and the round trip below runs the graph on another shape.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                message="Converting a tensor to a Python boolean")
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
    # What distlstm.load does, on the written files (load itself refuses the unfinished folder).
    model = build_model(run_config(out).model)
    load_weights(model, out, "final")
    return model.eval()(inputs, lengths)


def export(model, cfg, fmt: str, out: Path, *, step: int, source: Path | None, atol: float = 1e-4) -> float:
    """Write `model` in `fmt` to `out`, atomically (see the module docstring); returns the largest
    output difference of the round trip."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    model = model.cpu().eval()
    if model.bidirectional and fmt != "safetensors":
        raise ValueError(f"--format {fmt} supports unidirectional models only (a bidirectional model packs its "
                         f"batches, which does not export with dynamic shapes); use --format safetensors")
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        (partial / INCOMPLETE).write_text(f"an export in progress (pid {os.getpid()}) or stopped before it was "
                                          f"checked; run python -m distlstm.export again\n")
        err = write_and_check(model, cfg, fmt, partial, step=step, source=source, atol=atol)
        (partial / INCOMPLETE).unlink()
        replace_dir(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after a successful rename
    return err


def write_and_check(model, cfg, fmt: str, folder: Path, *, step: int, source: Path | None, atol: float) -> float:
    write_model(model, cfg, folder, step=step, source=source)
    if fmt == "torchscript":
        export_torchscript(model, folder / TORCHSCRIPT)
    elif fmt == "onnx":
        export_onnx(model, folder / ONNX)
    inputs, lengths = example_batch(model, 5, 11, seed=1)
    with torch.no_grad():
        want = model(inputs, lengths)
        got = run_exported(fmt, folder, inputs, lengths)
    err = float((got.float() - want.float()).abs().max())
    if not err <= atol:
        raise ValueError(f"the {fmt} export differs from the model by {err:.3g} (> --atol {atol}) on a batch of "
                         f"another shape; nothing was written to the --out folder; please report this with the "
                         f"run's config.json")
    return err


EXPORTED_FILES = {WEIGHTS, CONFIG, VOCAB, LABELS, TORCHSCRIPT, ONNX}


def check_out(out: Path) -> None:
    """--out names a new folder, an empty one or an earlier export (replaced after success); never a
    file, another folder with files in it, or a place inside a run's checkpoints."""
    for folder in (out.resolve(), *out.resolve().parents):
        run = folder.parent if folder.name == "checkpoints" else None
        if (folder / MANIFEST).is_file() or (run is not None and (run / "config.toml").is_file()):
            where = f"the checkpoints of run {run}" if run else f"the checkpoint {folder}"
            raise ValueError(f"--out {out} is inside {where}, which export must not write into; give --out a "
                             f"folder of its own (e.g. --out exported/)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give --out a folder (new, empty, or an earlier export to replace)")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and not (set(names) <= EXPORTED_FILES and _is_export(out / CONFIG)):
        raise ValueError(f"--out {out} is a folder that is not an earlier export (it holds "
                         f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), so export will not replace "
                         f"it; give --out a new or empty folder, or an earlier export")


def _is_export(card: Path) -> bool:
    try:
        return json.loads(card.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def replace_dir(new: Path, out: Path) -> None:
    """Rename the finished folder `new` to `out`; an earlier export at `out` is set aside first and
    removed after (put back if the second rename fails): never a mix of the two."""
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:  # a signal or an error between the two renames: the earlier export back
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def run(argv: list[str]) -> int:
    p = command_parser("export", __doc__)
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    p.add_argument("--out", required=True, help="folder to write into (created)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--atol", type=float, default=1e-4, help="largest output difference the round trip accepts")
    args = p.parse_args(argv)
    run_dir, out = Path(args.run), Path(args.out)
    if out.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out} is the run directory; export into a folder of its own")
    if not detect_world().is_leader:
        return 0  # under torchrun: one writer (rank 0), not several racing on the same files
    check_out(out)  # before the model is read: a wrong --out fails fast
    # SIGTERM (a scheduler, a timeout) ends the export like Ctrl-C does: through `finally`, which
    # removes the partial folder, instead of killing the process with it half written.
    signal.signal(signal.SIGTERM, _terminated)
    cfg = run_config(run_dir, [])
    model = build_model(cfg.model)
    loaded = load_weights(model, run_dir, args.checkpoint)
    err = export(model, cfg, args.format, out, step=loaded["step"], source=run_dir, atol=args.atol)
    print(f"exported {loaded['checkpoint']} (step {loaded['step']}) as {args.format} to {out}; "
          f"round trip max |difference| {err:.2e}")
    return 0


def _terminated(signum, frame):
    print("export stopped by SIGTERM: nothing written to --out", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m distlstm.plot RUN [RUN ...] --out curves.png`: training curves from metrics.jsonl.

    python -m distlstm.plot runs/default-1a2b3c4d
    python -m distlstm.plot runs/lr-3e-3 runs/lr-1e-2 --out compare.png

Four panels against the optimizer step: training loss, the validation metric (the task's:
accuracy, perplexity or mse; the validation loss if the run logged no other), learning rate, and
real (unpadded) tokens per second. Several runs are overlaid, one colour each, labelled by their
directory name. A resumed run's records are kept in step order (the newest record wins where a
restart logged a step twice). Needs matplotlib (extra `[plot]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = (("train", "loss", "training loss"), ("valid", None, "validation"), ("train", "lr", "learning rate"),
          ("train", "tokens_per_s", "real tokens/s"))
VALID_METRICS = ("accuracy", "perplexity", "mse", "loss")


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """{kind: records in step order} from a run's metrics.jsonl (the last record of a step wins)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl: not a distlstm run directory (or it has not logged yet)")
    by_kind: dict[str, dict[int, dict]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}: line {n} is not JSON; the file is damaged") from None
        by_kind.setdefault(rec.get("kind", "?"), {})[int(rec.get("step", 0))] = rec
    return {kind: [recs[s] for s in sorted(recs)] for kind, recs in by_kind.items()}


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def figure(runs: list[Path]):
    """The matplotlib figure of the four panels for `runs`."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("python -m distlstm.plot needs matplotlib: pip install 'distlstm[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    data = {run: read_metrics(run) for run in runs}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (kind, key, title) in zip(axes.flat, PANELS):
        shown: list[str] = []
        for run, metrics in data.items():
            records = metrics.get(kind, [])
            k = key or next((m for m in VALID_METRICS if any(m in r for r in records)), "loss")
            shown += [k] if k not in shown else []
            steps, values = series(records, k)
            if steps:
                ax.plot(steps, values, marker="o" if kind == "valid" or len(steps) < 3 else None, markersize=3,
                        label=run.name)
        ax.set_title(title if key else f"validation {' / '.join(shown)}")
        ax.grid(alpha=0.3)
        if key == "lr" or (kind == "train" and key == "loss"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(runs: list[Path], out: Path) -> Path:
    fig = figure(runs)  # raises naming the extra when matplotlib is absent
    import matplotlib.pyplot as plt
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distlstm.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="image file to write (PNG, or .pdf/.svg; default curves.png)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = plot([Path(r) for r in args.runs], Path(args.out))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

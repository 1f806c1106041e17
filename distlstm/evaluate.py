"""`python -m distlstm.evaluate RUN`: a trained model's loss and metric on any split.

    python -m distlstm.evaluate runs/default-1a2b3c4d                        # the run's validation split
    python -m distlstm.evaluate RUN --checkpoint best --data.valid data/test  # another split, the best weights
    torchrun --nproc_per_node=4 -m distlstm.evaluate RUN --data.valid 's3://bucket/test/'

The split goes through the same loader and `evaluate_model` as training's evaluations (in order,
filler batches weigh nothing, sums over all ranks), so on the run's own validation split and the
checkpoint of step S it reproduces the `valid` record metrics.jsonl has for step S (up to float
summation order when the number of ranks differs). An lm run in stream mode (data.lm_mode=stream)
carries the LSTM state along `data.batch_size x ranks` rows of the split, each starting cold, so
another number of ranks or `--data.batch_size` gives slightly different numbers (docs/design.md,
"Language modelling: stream mode"). The result goes to `eval-<name>.json` in the run directory (or
--out); nothing else in the run directory is touched.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distlstm.checkpoint.artifacts import CHECKPOINT_HELP, load_weights, run_config
from distlstm.config import command_parser, split_overrides
from distlstm.data.sources import basename, redact
from distlstm.distributed.session import run_command, session
from distlstm.run.build import build_run
from distlstm.run.trainer import evaluate_model


def split_name(spec: str) -> str:
    """A short name for a data spec: its last path component without suffix ('valid', 'test')."""
    last = basename(redact(spec)) or "data"
    if last == "manifest.json":
        last = redact(spec).split("?")[0].rstrip("/").rsplit("/", 2)[-2]
    return last.split(".")[0].replace(",", "_") or "data"


def run(argv: list[str]) -> int:
    p = command_parser("evaluate", __doc__)
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--name", default=None, help="result name: eval-NAME.json (default: <split>-<checkpoint>)")
    p.add_argument("--out", default=None, help="folder for eval-NAME.json (default: the run directory)")
    own, overrides = split_overrides(argv)
    args = p.parse_args(own)
    run_dir = Path(args.run)
    cfg = run_config(run_dir, overrides)
    with session(cfg) as s:
        # run_dir=None: the loader would otherwise write skipped samples into the run's quarantine/.
        built = build_run(cfg, s.world, s.device, group=s.group, log=s.log, run_dir=None, training=False)
        if built.valid_loader is None:
            raise ValueError("nothing to evaluate: the run has no validation split; pass --data.valid SPEC")
        loaded = load_weights(built.model, run_dir, args.checkpoint)
        values = evaluate_model(built.model, built.valid_loader, amp=built.amp, device=s.device, group=s.group,
                                max_batches=cfg.train.eval_max_batches)
        spec = cfg.data.valid or "valid"
        name = args.name or f"{split_name(spec)}-{loaded['checkpoint']}"
        record = {**values, "step": loaded["step"], "checkpoint": loaded["checkpoint"], "data": redact(spec),
                  "world_size": s.world.world_size, "eval_max_batches": cfg.train.eval_max_batches}
        if s.world.is_leader:
            out = Path(args.out) if args.out else run_dir
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"eval-{name}.json"
            path.write_text(json.dumps(record, indent=1))
            s.log(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
                  + f"\nwritten to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())

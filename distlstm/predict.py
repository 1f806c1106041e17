"""`python -m distlstm.predict RUN --data SPEC --out DIR`: a trained model's predictions as Parquet.

    python -m distlstm.predict runs/default-1a2b3c4d --data data/new --out preds/
    torchrun --nproc_per_node=4 -m distlstm.predict RUN --data 'shards/test-{00000..00031}.parquet' --out preds/

Each rank writes `DIR/predictions-rank<R>.parquet`, one row per input sample it predicted; together
the files hold every sample of SPEC exactly once (the filler batches that keep ranks in lockstep are
dropped, and so are the dummy rows that pad a batch to a bounded shape on a GPU). Columns: `sample_id` (the sample's position in SPEC: shards in order, rows in order),
`shard` (file name) and `row` (row within it), `length` (steps the model read: data.max_length
truncates), then by task:

    classify  prediction (class id), probabilities (list<float32>, one per class)
    regress   prediction (float32, or list<float32> for several targets)
    tag       prediction (list<int64>: one tag per step)
    lm        prediction (list<int64>: the most likely next token after each step)

The data needs no labels (a label column or member, if present, is not read). Rows come in the
loader's order (length-bucketed), not the input order: sort by sample_id to restore it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distlstm.checkpoint.artifacts import CHECKPOINT_HELP, load_weights, run_config
from distlstm.config import command_parser, split_overrides
from distlstm.data.sources import basename, redact
from distlstm.distributed.session import run_command, session
from distlstm.run.build import build_run
from distlstm.tasks import Task


def run(argv: list[str]) -> int:
    p = command_parser("predict", __doc__)
    p.add_argument("--data", required=True, help="the samples to predict: a prepared folder, files, globs, "
                                                 "brace ranges or URLs, as data.train takes")
    p.add_argument("--out", required=True, help="folder for predictions-rank<R>.parquet (created)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    own, overrides = split_overrides(argv)
    args = p.parse_args(own)
    run_dir, out = Path(args.run), Path(args.out)
    if out.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out} is the run directory; predictions go into a folder of their own")
    # Every sample gets a prediction: too long ones are truncated to data.max_length, not dropped. An lm
    # run trained in stream mode still predicts each row on its own (build_run would otherwise lay the
    # input out as a stream of data.batch_size rows, which predict never reads).
    cfg = run_config(run_dir, ["--data.too_long", "truncate"] + overrides +
                     ["--data.valid", args.data, "--data.lm_mode", "windows"])
    with session(cfg) as s:
        built = build_run(cfg, s.world, s.device, group=s.group, log=s.log, run_dir=None, training=False,
                          labelled=False)
        loaded = load_weights(built.model, run_dir, args.checkpoint)
        index, task = built.valid_index, built.task
        columns = _predict(built.model, built.valid_loader, task, index, built.amp, s.device)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"predictions-rank{s.world.rank:05d}.parquet"
        pq.write_table(pa.table(columns), path)  # one file per rank: no cross-rank traffic
        if s.world.is_leader:
            (out / "predict.json").write_text(json.dumps({
                "run": str(run_dir), "data": redact(args.data), "checkpoint": loaded["checkpoint"],
                "step": loaded["step"], "task": task.name, "world_size": s.world.world_size,
                "num_samples": index.num_samples, "files": [f"predictions-rank{r:05d}.parquet"
                                                            for r in range(s.world.world_size)]}, indent=1))
        s.log(f"rank {s.world.rank}: {len(columns['sample_id'])} predictions -> {path}")
    return 0


@torch.no_grad()
def _predict(model, loader, task: Task, index, amp, device) -> dict[str, list]:
    model.eval()
    cols: dict[str, list] = {"sample_id": [], "length": []}
    for batch in loader:
        if batch.weight == 0:
            continue  # a filler (a repeat of a real batch, so every rank has the same count) or a stand-in
        dev = batch.to(device)
        with amp.autocast():
            outputs = model(dev.inputs, dev.lengths, lengths_cpu=dev.cpu_lengths)
        real = batch.sample_ids >= 0  # dummy rows (id -1) only fill a bounded batch shape
        lengths = dev.cpu_lengths[real]
        cols["sample_id"] += batch.sample_ids[real].tolist()
        cols["length"] += lengths.tolist()
        for key, values in task.predictions(outputs[real.to(outputs.device)], lengths).items():
            cols.setdefault(key, []).extend(values)
    ids = np.asarray(cols["sample_id"], np.int64)
    chunk = np.searchsorted(index.chunk_offsets, ids, side="right") - 1
    shard = index.chunk_shard[chunk] if len(ids) else np.zeros(0, np.int64)
    first = index.chunk_offsets[np.searchsorted(index.chunk_shard, shard)]
    names = [basename(s) for s in index.shards]
    i64 = pa.int64()
    table = {"sample_id": pa.array(ids, i64), "shard": pa.array([names[i] for i in shard.tolist()], pa.string()),
             "row": pa.array(ids - first, i64), "length": pa.array(cols["length"], i64)}
    for key, kind in task.prediction_types(getattr(model, "num_targets", 1)).items():
        table[key] = pa.array(cols.get(key, []), kind)
    return table


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())

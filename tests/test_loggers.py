"""MLflow (file store) and Weights & Biases (offline mode) record what metrics.jsonl records.

A failure means a tracker shows other numbers than the run's own log (a metric missing, at another
step, or another value), or that asking for a tracker whose package is absent fails late or unclearly
instead of with one line naming the extra to install. Skips a tracker whose package is not installed.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model.hidden_size", "16", "--data.synthetic_samples", "1000", "--data.max_tokens", "1024",
        "--log.progress", "false", "--log.tensorboard", "false", "--train.max_steps", "12",
        "--log.every_steps", "4", "--train.eval_every", "6"]


def train(tmp_path: Path, backends: str, extra_env: dict, prelude: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTLSTM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           **extra_env}
    code = f"import sys; {prelude}from distlstm.train import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *ARGS, "--log.backends", backends,
                           "--train.run_dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=300)


def logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {"train/loss": [(step, value), ...], ...} (numbers only)."""
    out: dict[str, list] = {}
    for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        for key, value in rec.items():
            if key not in ("kind", "step", "time") and isinstance(value, (int, float)):
                out.setdefault(f"{rec['kind']}/{key}", []).append((rec["step"], float(value)))
    return out


def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    return [s for s, _ in got] == [s for s, _ in want] and all(
        v == pytest.approx(w, rel=1e-12) for (_, v), (_, w) in zip(got, want))


def wandb_history(path: Path) -> list[dict]:
    """History rows of an offline W&B run file (LevelDB-log framing of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, block, pending, rows = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_mlflow_and_wandb_record_the_same_metrics_as_metrics_jsonl(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    uri = f"file:{tmp_path / 'mlruns'}"
    proc = train(tmp_path, "mlflow,wandb", {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_MODE": "offline",
                                            "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    want = logged(run_dir)
    assert {"train/loss", "train/lr", "valid/loss", "valid/accuracy"} <= set(want)
    assert [s for s, _ in want["train/loss"]] == [4, 8, 12] and [s for s, _ in want["valid/loss"]] == [6, 12]

    from mlflow.tracking import MlflowClient
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    for key, points in want.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert same(got, points), (key, got, points)
    assert client.get_run(run_id).data.params["model.task"] == "classify"

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    for key, points in want.items():
        got = [(row["_step"], row[key]) for row in rows if key in row]
        assert same(got, points), (key, got, points)


@pytest.mark.parametrize("backend", ["mlflow", "wandb"])
def test_a_backend_without_its_package_is_a_one_line_error(tmp_path, backend):
    # sys.modules[name] = None makes `import name` raise ImportError, as on a machine without it.
    proc = train(tmp_path, backend, {}, prelude=f"sys.modules[{backend!r}] = None; ")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"pip install 'distlstm[{backend}]'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training

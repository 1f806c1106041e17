"""After training: the hand-off files, `distlstm.load`, and the evaluate / predict / generate / export
commands, run as a user runs them (real CLI processes, torchrun with gloo for 2 ranks) on real runs.

A failure means a trained model cannot be used the way README's "Use your model" says: the metrics
evaluate reports are not the ones training logged, predictions lose or repeat samples across ranks,
generation is not reproducible or emits tokens outside the vocabulary, an exported model computes
something else than the trained one, or a command changed the training run's files.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests._zygote import run as zygote_run


ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model.hidden_size", "32", "--data.synthetic_samples", "1000", "--log.progress", "false",
         "--data.max_tokens", "1024", "--log.tensorboard", "false"]


def cli(module: str, *args: str, cache: Path, nproc: int = 1, timeout: int = 300, ok: bool = True):
    env = {**os.environ, "DISTLSTM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    cmd = launcher + ["-m", module, *args]
    proc = zygote_run(cmd, env=env, timeout=timeout)  # one process: forked from the test zygote
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """The embedded default task, small: 20 steps, checkpoints and evaluations at 10 and 20."""
    tmp = tmp_path_factory.mktemp("classify")
    run_dir = tmp / "run"
    cli("distlstm.train", *SMALL, "--train.max_steps", "20", "--train.eval_every", "10",
        "--checkpoint.every_steps", "10", "--train.run_dir", str(run_dir), cache=tmp / "cache")
    return run_dir, tmp / "cache"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A character lm on the example corpus shipped in the repository, prepared by distlstm.prep."""
    tmp = tmp_path_factory.mktemp("lm")
    data = tmp / "shakespeare"
    cli("distlstm.prep", "--text", str(ROOT / "examples" / "shakespeare.txt"), "--task", "lm", "--tokenizer", "char",
        "--seq-len", "64", "--split", "tail", "--valid-fraction", "0.1", "--out", str(data), "--quiet", cache=tmp)
    run_dir = tmp / "run"
    cli("distlstm.train", "--data.train", str(data / "train"), "--data.valid", str(data / "valid"),
        "--model.task", "lm", "--model.hidden_size", "48", "--model.embed_size", "16", "--data.max_tokens", "2048",
        "--train.max_steps", "30", "--optim.lr", "1e-2", "--train.eval_every", "0", "--log.progress", "false",
        "--log.tensorboard", "false", "--train.run_dir", str(run_dir), cache=tmp / "cache")
    return run_dir, tmp / "cache"


def valid_records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "valid"}


# ---------------------------------------------------------------------------------------------- load


def test_run_directory_holds_the_hand_off_files_and_load_rebuilds_the_model(classify_run):
    import distlstm
    run_dir, _ = classify_run
    card = json.loads((run_dir / "config.json").read_text())
    assert card["task"] == "classify" and card["model"]["vocab_size"] == 29 and card["model"]["num_classes"] == 4
    assert card["step"] == 20 and card["param_hash"] == json.loads((run_dir / "final.json").read_text())["param_hash"]
    model, vocab, cfg = distlstm.load(run_dir)
    assert vocab is None and cfg.model.input == "tokens" and not model.training
    trained = torch.load(run_dir / "model.pt", weights_only=True)  # what training wrote, independently
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    # The newest checkpoint is the same step: the model part of the DCP files gives the same weights.
    from_ckpt, _, _ = distlstm.load(run_dir / "checkpoints" / "step-000020")
    older, _, _ = distlstm.load(run_dir, checkpoint="step-10")
    inputs, lengths = torch.randint(0, 29, (4, 12)), torch.tensor([12, 3, 7, 1])
    with torch.no_grad():
        assert torch.equal(from_ckpt(inputs, lengths), model(inputs, lengths))
        assert not torch.equal(older(inputs, lengths), model(inputs, lengths))


def test_load_names_what_is_wrong(tmp_path):
    import distlstm
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distlstm.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a distlstm run directory"):
        distlstm.load(tmp_path)


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_reproduces_the_logged_validation_metrics_and_touches_nothing(classify_run):
    run_dir, cache = classify_run
    logged = valid_records(run_dir)
    assert sorted(logged) == [10, 20]
    before = tree_digest(run_dir)
    for step in (10, 20):
        cli("distlstm.evaluate", str(run_dir), "--checkpoint", f"step-{step}", cache=cache)
        got = json.loads((run_dir / f"eval-valid-step-{step:06d}.json").read_text())
        assert got["step"] == step
        for key in ("loss", "accuracy", "items"):
            assert got[key] == pytest.approx(logged[step][key], rel=1e-9, abs=0), (step, key, got, logged[step])
    after = tree_digest(run_dir)
    new = sorted(set(after) - set(before))
    assert new == ["eval-valid-step-000010.json", "eval-valid-step-000020.json"], new
    assert {k: after[k] for k in before} == before, "evaluate changed the training run's files"


def test_evaluate_under_torchrun_on_another_split(classify_run, tmp_path):
    """2 ranks split the batches (fillers weigh nothing); the sums are those of one process."""
    run_dir, cache = classify_run
    valid = next(cache.glob("synthetic-*")) / "valid"
    cli("distlstm.evaluate", str(run_dir), "--data.valid", str(valid), "--out", str(tmp_path), "--name", "two",
        nproc=2, cache=cache)
    got = json.loads((tmp_path / "eval-two.json").read_text())
    want = valid_records(run_dir)[20]
    assert got["world_size"] == 2 and got["items"] == want["items"] == 2000
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6) and got["accuracy"] == want["accuracy"]


def test_evaluate_errors_are_one_line(classify_run):
    run_dir, cache = classify_run
    proc = cli("distlstm.evaluate", str(run_dir), "--checkpoint", "step-7", cache=cache, ok=False)
    assert proc.returncode == 2 and "step-000007" in proc.stderr and "step-000010" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("distlstm.evaluate", str(run_dir), "--checkpoint", "best", cache=cache, ok=False)
    assert proc.returncode == 2 and "keep_best" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- predict


def read_predictions(out: Path) -> "pyarrow.Table":  # noqa: F821
    import pyarrow as pa
    files = sorted(out.glob("predictions-rank*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]), files


def test_predict_one_row_per_sample_in_one_process_and_on_two_ranks(classify_run, tmp_path):
    import distlstm
    run_dir, cache = classify_run
    valid = next(cache.glob("synthetic-*")) / "valid"
    n = json.loads((valid / "manifest.json").read_text())["num_samples"]
    cli("distlstm.predict", str(run_dir), "--data", str(valid), "--out", str(tmp_path / "one"), cache=cache)
    cli("distlstm.predict", str(run_dir), "--data", str(valid), "--out", str(tmp_path / "two"), nproc=2, cache=cache)
    one, files_one = read_predictions(tmp_path / "one")
    two, files_two = read_predictions(tmp_path / "two")
    assert len(files_one) == 1 and len(files_two) == 2
    for table in (one, two):
        ids = table["sample_id"].to_numpy()
        assert len(ids) == n and np.array_equal(np.sort(ids), np.arange(n)), "a sample lost or duplicated"
    # Each rank predicted its own part (no rank predicted everything).
    assert all(0 < pq.read_table(f).num_rows < n for f in files_two)
    a = one.sort_by("sample_id").to_pydict()
    b = two.sort_by("sample_id").to_pydict()
    assert a["prediction"] == b["prediction"]
    assert np.allclose(np.array(a["probabilities"]), np.array(b["probabilities"]), atol=1e-6)
    # The predictions are the model's: recompute a few samples straight from the shard rows.
    model, _, _ = distlstm.load(run_dir)
    shard = pq.read_table(valid / a["shard"][0])
    for i in (0, 1, 1999):
        tokens = torch.tensor(shard["tokens"][a["row"][i]].as_py())[None]
        assert a["length"][i] == tokens.shape[1]
        with torch.no_grad():
            probs = torch.softmax(model(tokens, torch.tensor([tokens.shape[1]])), -1)[0]
        assert np.allclose(a["probabilities"][i], probs.numpy(), atol=1e-5) and a["prediction"][i] == int(probs.argmax())


@pytest.mark.parametrize("fmt", ["parquet", "tar"])
def test_predict_reads_data_without_labels(classify_run, tmp_path, fmt):
    """A Parquet file without a label column, or tar shards without label members: a classify
    model still predicts every sample (training data would have them flagged 'missing label')."""
    import pyarrow as pa
    run_dir, cache = classify_run
    data = tmp_path / "unlabelled"
    data.mkdir()
    rows = [[1, 2, 25, 3, 4, 26, 5], [27, 6, 7, 28], [9] * 30]
    if fmt == "parquet":
        pq.write_table(pa.table({"tokens": pa.array(rows, pa.list_(pa.int32()))}), data / "new.parquet")
    else:
        from webdataset import TarWriter
        from distlstm.tasks import npy_bytes
        with TarWriter(str(data / "new.tar")) as w:
            for i, r in enumerate(rows):
                w.write({"__key__": f"{i:04d}", "tokens.npy": npy_bytes(np.asarray(r, np.int32))})
    shard = f"new.{fmt}"
    cli("distlstm.predict", str(run_dir), "--data", str(data / shard), "--out", str(tmp_path / "p"), cache=cache)
    table, _ = read_predictions(tmp_path / "p")
    got = table.sort_by("sample_id").to_pydict()
    assert got["length"] == [7, 4, 30] and got["shard"] == [shard] * 3
    assert all(len(p) == 4 and abs(sum(p) - 1) < 1e-5 for p in got["probabilities"])


def test_predict_on_a_stream_mode_lm_run_reads_each_row_on_its_own(lm_run, tmp_path):
    """The lm run trained in stream mode (20 rows per step); predict reads its input as independent
    rows, so two short rows (fewer tokens than the run's stream has rows) get a next-token prediction
    after each of their steps."""
    import pyarrow as pa
    run_dir, cache = lm_run
    rows = [[3, 4, 5, 6], [7, 8, 9]]
    pq.write_table(pa.table({"tokens": pa.array(rows, pa.list_(pa.int32()))}), tmp_path / "few.parquet")
    cli("distlstm.predict", str(run_dir), "--data", str(tmp_path / "few.parquet"), "--out", str(tmp_path / "p"),
        cache=cache)
    got = read_predictions(tmp_path / "p")[0].sort_by("sample_id").to_pydict()
    assert got["length"] == [4, 3] and [len(p) for p in got["prediction"]] == [4, 3]


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_export_round_trips(classify_run, tmp_path, fmt):
    import distlstm
    run_dir, cache = classify_run
    out = tmp_path / fmt
    cli("distlstm.export", str(run_dir), "--format", fmt, "--out", str(out), cache=cache)
    model, _, _ = distlstm.load(run_dir)
    inputs, lengths = torch.randint(0, 29, (6, 17)), torch.tensor([17, 1, 5, 16, 9, 2])
    inputs = inputs * (torch.arange(17) < lengths[:, None])
    with torch.no_grad():
        want = model(inputs, lengths)
        if fmt == "torchscript":
            got = torch.jit.load(str(out / "model.torchscript.pt"))(inputs, lengths)
        elif fmt == "onnx":
            ort = pytest.importorskip("onnxruntime")
            sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {"inputs": inputs.numpy(), "lengths": lengths.numpy()})[0])
        else:
            got = distlstm.load(out).model(inputs, lengths)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert json.loads((out / "config.json").read_text())["step"] == 20


def test_export_and_generate_under_torchrun(lm_run, tmp_path):
    """Rank 0 alone writes the export (no two ranks racing on one file) and prints the text once."""
    run_dir, cache = lm_run
    cli("distlstm.export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "ts"), nproc=2, cache=cache)
    assert sorted(p.name for p in (tmp_path / "ts").iterdir()) == [
        "config.json", "model.safetensors", "model.torchscript.pt", "vocab.json"]
    args = ["--prompt", "ROMEO:", "--max-tokens", "30", "--seed", "5"]
    two = cli("distlstm.generate", str(run_dir), *args, nproc=2, cache=cache).stdout
    one = cli("distlstm.generate", str(run_dir), *args, cache=cache).stdout
    assert two.count("ROMEO:") == 1 and one.rstrip("\n") in two


# ---------------------------------------------------------------------------------------------- lm


def test_generate_is_deterministic_under_a_seed_and_emits_vocabulary_tokens(lm_run):
    import distlstm
    run_dir, cache = lm_run
    model, vocab, _ = distlstm.load(run_dir)
    assert vocab is not None and vocab.tokenizer == "char" and len(vocab) == model.embedding.num_embeddings
    args = [str(run_dir), "--prompt", "ROMEO:", "--max-tokens", "80", "--temperature", "1.0", "--top-k", "10"]
    a = cli("distlstm.generate", *args, "--seed", "3", cache=cache).stdout
    b = cli("distlstm.generate", *args, "--seed", "3", cache=cache).stdout
    c = cli("distlstm.generate", *args, "--seed", "4", cache=cache).stdout
    assert a == b and a != c
    text = a.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 80
    assert set(text[len("ROMEO:"):]) <= set(vocab.tokens[1:]), "a token outside the vocabulary (or <unk>)"


def test_greedy_generation_carries_the_state_exactly(lm_run):
    """Token by token with the carried (h, c) equals re-reading the whole text at every step."""
    import distlstm
    from distlstm.generate import generate
    run_dir, _ = lm_run
    model, vocab, _ = distlstm.load(run_dir)
    prompt = vocab.encode("KING RICHARD")
    got = generate(model, prompt, max_tokens=25, temperature=0, banned=(vocab.unk_id,))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(25):
            logits = model(torch.tensor([seq]), torch.tensor([len(seq)]))[0, -1]
            logits[vocab.unk_id] = float("-inf")
            seq.append(int(logits.argmax()))
    assert got == seq[len(prompt):]


def test_lm_exports_to_onnx_with_per_step_outputs(lm_run, tmp_path):
    pytest.importorskip("onnxruntime")
    run_dir, cache = lm_run
    cli("distlstm.export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "onnx"), cache=cache)
    import distlstm
    model, vocab, _ = distlstm.load(tmp_path / "onnx")  # the exported folder, vocabulary included
    assert vocab is not None and (tmp_path / "onnx" / "vocab.json").is_file()
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = torch.tensor([vocab.encode("To be, or not to be"), vocab.encode("that is the question:")[:19]])
    lengths = torch.tensor([19, 19])
    assert [i.name for i in sess.get_inputs()] == ["inputs"]  # per-step outputs do not read the lengths
    got = sess.run(None, {"inputs": inputs.numpy()})[0]
    with torch.no_grad():
        want = model(inputs, lengths).numpy()
    assert got.shape == want.shape == (2, 19, len(vocab)) and np.allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------------------------------------- plot


def test_plot_overlays_runs_with_the_logged_values(classify_run, lm_run, tmp_path):
    pytest.importorskip("matplotlib")
    from distlstm.plot import figure
    runs = [classify_run[0], lm_run[0]]
    cli("distlstm.plot", *map(str, runs), "--out", str(tmp_path / "curves.png"), cache=tmp_path)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    fig = figure(runs)
    loss, valid, lr, speed = fig.axes
    assert [line.get_label() for line in loss.lines] == ["run", "run"]  # one line per run
    records = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    for ax, key in ((loss, "loss"), (lr, "lr"), (speed, "tokens_per_s")):
        assert ax.lines[0].get_xydata().tolist() == [[r["step"], r[key]] for r in train], key
    assert valid.lines[0].get_xydata().tolist() == [[r["step"], r["accuracy"]] for r in records if r["kind"] == "valid"]
    assert valid.get_title() == "validation accuracy / perplexity"  # the classify run's, then the lm run's


@pytest.mark.parametrize("command,flags", [("evaluate", ["--checkpoint", "--data.valid"]),
                                           ("predict", ["--data", "--out"]),
                                           ("generate", ["--prompt", "--max-tokens", "--temperature", "--top-k", "--seed"]),
                                           ("export", ["--format", "safetensors|torchscript|onnx", "--out"]),
                                           ("plot", ["--out"])])
def test_every_command_explains_itself(tmp_path, command, flags):
    proc = cli(f"distlstm.{command}", "--help", cache=tmp_path)
    assert proc.stdout.startswith(f"usage: python -m distlstm.{command}"), proc.stdout[:200]
    for flag in flags:
        assert flag in proc.stdout, flag

"""`checkpoint.keep_best` and `train.early_stop_patience` against a scripted validation curve.

Training is real (the CLI's `main`, in-process, on the embedded synthetic data); only the numbers the
evaluation returns are scripted, so the right answer is known in advance. A failure means the best
checkpoint is deleted by retention, the wrong one is kept or named `best`, the direction of a metric
is wrong (accuracy is better when higher), or early stopping stops at another step than it should.
"""

import json
from pathlib import Path

import pytest

from distlstm import train
from distlstm.run.trainer import Trainer

COMMON = ["--model.hidden_size", "16", "--data.synthetic_samples", "1000", "--data.max_tokens", "1024",
          "--data.num_workers", "0", "--log.progress", "false", "--log.tensorboard", "false",
          "--train.eval_every", "5", "--log.every_steps", "5"]


def run_with_curve(tmp_path: Path, monkeypatch, curve: dict[int, dict], *args: str) -> Path:
    """Train with Trainer.evaluate returning curve[step] (valid_* values) at every evaluation."""
    seen = []

    def scripted(self):
        seen.append(self.state.step)
        return dict(curve[self.state.step])

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    monkeypatch.setenv("DISTLSTM_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert train.main([*COMMON, "--train.run_dir", str(run_dir), *args]) == 0
    return run_dir


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


LOSS = [0.9, 0.7, 0.5, 0.6, 0.55, 0.8]        # best at the 3rd evaluation: step 15
ACCURACY = [0.3, 0.6, 0.5, 0.8, 0.7, 0.75]     # best at the 4th evaluation: step 20


@pytest.mark.parametrize("metric,values,best", [("valid_loss", LOSS, 15), ("valid_accuracy", ACCURACY, 20)])
def test_keep_best_keeps_the_best_checkpoint_outside_keep_last(tmp_path, monkeypatch, metric, values, best):
    curve = {5 * (i + 1): {"valid_loss": 1.0, "valid_accuracy": 0.5, metric: v} for i, v in enumerate(values)}
    run_dir = run_with_curve(tmp_path, monkeypatch, curve, "--train.max_steps", "30", "--checkpoint.keep_best",
                             metric, "--checkpoint.keep_last", "1", "--checkpoint.every_steps", "5")
    assert checkpoints(run_dir) == [f"step-{best:06d}", "step-000030"]
    assert (run_dir / "checkpoints" / "best").read_text().strip() == f"step-{best:06d}"
    from distlstm.checkpoint.artifacts import resolve_checkpoint
    assert resolve_checkpoint(run_dir, "best").name == f"step-{best:06d}"
    # The record is part of the train state in every checkpoint (a resumed run continues it).
    extra = json.loads((run_dir / "checkpoints" / "step-000030" / "extra.json").read_text())
    assert extra["train"]["best"]["keep_best"] == {"metric": metric, "step": best, "value": min(values) if
                                                   metric == "valid_loss" else max(values)}


def test_a_best_final_evaluation_names_the_checkpoint_its_step_already_has(tmp_path, monkeypatch):
    """Evaluations at 5 and 10 and, at the end, 12; checkpoints every 4 steps, so step 12 was saved
    before its (best) evaluation: `best` must name step-000012, not the older 10."""
    curve = {5: {"valid_loss": 0.9, "valid_accuracy": 0.5}, 10: {"valid_loss": 0.7, "valid_accuracy": 0.5},
             12: {"valid_loss": 0.4, "valid_accuracy": 0.5}}
    run_dir = run_with_curve(tmp_path, monkeypatch, curve, "--train.max_steps", "12", "--checkpoint.keep_best",
                             "valid_loss", "--checkpoint.keep_last", "1", "--checkpoint.every_steps", "4")
    assert (run_dir / "checkpoints" / "best").read_text().strip() == "step-000012"
    assert checkpoints(run_dir) == ["step-000012"]


def test_keep_best_survives_a_resume(tmp_path, monkeypatch):
    """Stop at step 20 (best: 15), resume to 30 with worse values: step 15 is still kept and named."""
    curve = {5 * (i + 1): {"valid_loss": v, "valid_accuracy": 0.5} for i, v in enumerate(LOSS)}
    args = ["--checkpoint.keep_best", "valid_loss", "--checkpoint.keep_last", "1", "--checkpoint.every_steps", "5"]
    run_dir = run_with_curve(tmp_path, monkeypatch, curve, "--train.max_steps", "20", *args)
    assert checkpoints(run_dir) == ["step-000015", "step-000020"]
    run_with_curve(tmp_path, monkeypatch, curve, "--train.max_steps", "30", *args)
    assert checkpoints(run_dir) == ["step-000015", "step-000030"]
    assert (run_dir / "checkpoints" / "best").read_text().strip() == "step-000015"


def test_early_stopping_stops_after_patience_evaluations_without_a_new_best(tmp_path, monkeypatch):
    # valid_loss best at step 15; steps 20 and 25 are no better -> with patience 2, stop at step 25.
    curve = {5 * (i + 1): {"valid_loss": v, "valid_accuracy": 0.5} for i, v in enumerate(LOSS + [0.1] * 4)}
    run_dir = run_with_curve(tmp_path, monkeypatch, curve, "--train.max_steps", "50",
                             "--train.early_stop_patience", "2")
    final = json.loads((run_dir / "final.json").read_text())
    assert final["step"] == 25 and final["stopped"] == "early_stop", final
    # A rerun of the same command does not train on (or overwrite) the stopped run.
    assert train.main([*COMMON, "--train.run_dir", str(run_dir), "--train.max_steps", "50",
                       "--train.early_stop_patience", "2"]) == 0
    assert json.loads((run_dir / "final.json").read_text()) == final


def test_an_unknown_metric_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTLSTM_CACHE", str(tmp_path / "cache"))
    assert train.main([*COMMON, "--train.run_dir", str(tmp_path / "r"), "--checkpoint.keep_best",
                       "valid_perplexity"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.keep_best='valid_perplexity'" in err and "valid_accuracy" in err, err

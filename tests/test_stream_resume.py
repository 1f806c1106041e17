"""lm stream mode resumes through the real CLI: bit-exact on the same number of ranks (the carried LSTM
state is in the checkpoint), and on another number with the stream laid out again, nothing skipped.

A failure here means a stopped stream-mode run does not continue the one it belongs to: the carried
state, the stream position or an RNG is not restored exactly (the resumed run's parameters differ
from an uninterrupted run's), or a run resumed on another number of ranks trains some tokens of the
epoch twice or never (its token count differs from an uninterrupted epoch's), or does not say that
it reset the state. Processes and faults as in tests/test_resume.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._stream_data import documents, write_stream_parquet
from tests.test_resume import final, launch, ok, preempted, resumed_step

VOCAB = 40
# Dropout (RNG), 2 DataLoader workers (prefetch past the checkpoint), accumulation over chunks
# (state carried across micro-batches and steps), variable chunk lengths, documents (resets).
ARGS = ["--model.task", "lm", "--model.vocab_size", str(VOCAB), "--model.hidden_size", "24", "--model.embed_size",
        "16", "--model.num_layers", "2", "--model.dropout", "0.1", "--data.batch_size", "4", "--data.bptt", "9",
        "--data.bptt_jitter", "true", "--data.num_workers", "2", "--train.accum_steps", "2",
        "--train.eval_every", "0", "--log.progress", "false", "--log.tensorboard", "false", "--log.every_steps", "1"]


@pytest.fixture(scope="module")
def stream_data(tmp_path_factory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("stream-resume")
    docs = documents(60, seed=11, min_len=10, max_len=90, vocab=VOCAB)
    write_stream_parquet(root / "data" / "train.parquet", docs, piece=32, rows_per_group=16)
    return root, sum(len(d) for d in docs)


def _args(root: Path, *extra: str) -> list[str]:
    return ["--data.train", str(root / "data" / "train.parquet"), "--data.valid", str(root / "data" / "train.parquet"),
            *ARGS, *extra]


def test_stream_mode_kill_then_resume_is_bit_exact(stream_data):
    root, _ = stream_data
    args = _args(root, "--train.max_steps", "14", "--checkpoint.every_steps", "4")
    clean = root / "runs" / "clean"
    ok(launch(clean, args))
    killed = root / "runs" / "killed"
    first = launch(killed, args, fault={"action": "kill", "step": 11})
    assert first.rc != 0 and not (killed / "final.json").exists()
    second = ok(launch(killed, args))
    assert resumed_step(second) == 8, second.out[-3000:]
    assert final(killed)["param_hash"] == final(clean)["param_hash"], "the resumed stream run diverged"
    assert final(killed)["valid_loss"] == final(clean)["valid_loss"]


def test_stream_mode_resume_on_another_world_size_trains_each_token_once(stream_data):
    """One epoch (--train.max_epochs 1): uninterrupted on 1 rank, and stopped on 2 ranks mid-epoch
    then finished on 1. An epoch trains every position but the first once, on any layout: both runs
    count the same tokens (per-token exactness is tests/test_stream.py's elastic test)."""
    root, num_tokens = stream_data
    args = _args(root, "--train.max_steps", "0", "--train.max_epochs", "1", "--data.bptt_jitter", "false",
                 "--data.num_workers", "0")
    clean = root / "runs" / "epoch-one-rank"
    ok(launch(clean, args))
    assert final(clean)["tokens"] == num_tokens - 1
    elastic = root / "runs" / "epoch-elastic"
    first = preempted(launch(elastic, args, nproc=2, fault={"action": "signal", "sig": "SIGUSR1", "step": 5,
                                                            "rank": 0}), nproc=2)
    assert "checkpoint committed at step 5" in first.out, first.out[-3000:]
    second = ok(launch(elastic, args))
    assert resumed_step(second) == 5 and "saved by 2 ranks, now 1" in second.out, second.out[-3000:]
    assert "laid out again over 4 rows, and the carried LSTM state starts from zero" in second.out
    assert final(elastic)["tokens"] == num_tokens - 1, "tokens skipped or repeated across the elastic resume"

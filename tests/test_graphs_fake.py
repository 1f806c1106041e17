"""StepGraphs' orchestration on a CPU (issue 18, defect 5): the real StepGraphs and TrainStep, with
only the recording of a CUDA graph faked (tests/fake_graphs.py: capture records the step body,
replay re-runs it on the same static buffers and fails where a real graph would misbehave).

A failure means that with `train.cuda_graphs` on, on a GPU: ranks could disagree on replaying a
step (NCCL collectives of a graph on one rank meeting eager ones on another: a hang or garbage), a
step would be captured before its warm-up (DDP's 11 iterations, a shape's first eager run), the
capture limit or an unseen shape would not fall back to the eager step, replays would train with a
stale learning rate, a resumed run could not capture its optimizer, a replay would read other
buffers than the ones its batch was copied into, graphed training would differ from eager
training (dropout included: every replay draws fresh masks), or lm stream mode's graphs would lose
or misplace the carried LSTM state (resets, chunk and step boundaries, resume).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distlstm.checkpoint.manager import CheckpointManager
from distlstm.run.graphs import DDP_WARMUP_STEPS, _key
from tests._graphs_worker import batches, make_trainer, stream_batches, train
from tests.fake_graphs import FakeGraphs

ROOT = Path(__file__).resolve().parents[1]


def assert_params_close(a, b, rtol: float = 1e-6) -> None:
    for i, (p, q) in enumerate(zip(a, b)):
        err = float((p - q).norm() / q.norm().clamp_min(1e-30))
        assert err < rtol, f"parameter {i}: relative difference {err:.2e}"


def params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def steps_of(shapes: str, accum: int = 1, seed: int = 0) -> list[list]:
    bs = batches(shapes, seed)
    return [bs[i:i + accum] for i in range(0, len(bs), accum)]


@pytest.mark.parametrize("accum", [1, 2])
def test_graphed_training_equals_eager_with_dropout(accum):
    """12 steps over three shapes and a filler batch, LR warming up every step, dropout on: graphed
    (most steps replayed) == eager to 1e-6, the same summed loss, items and schedule position. The
    dropout must matter (another dropout seed moves the weights by far more), so equal weights mean
    every replay drew the masks the eager step drew: fresh ones."""
    shapes = "ABACABcBACAB" if accum == 1 else "ABACABcBACABABACABCBACAB"
    steps = steps_of(shapes, accum)
    eager = make_trainer(accum=accum)
    train(eager, steps)
    graphed = make_trainer(accum=accum, graphs=True)
    replayed = train(graphed, steps)
    assert sum(replayed) >= 7, graphed.graphs.summary()
    assert_params_close(params(graphed), params(eager))
    torch.testing.assert_close(graphed.loss_sum, eager.loss_sum, rtol=1e-6, atol=0)
    assert graphed.item_sum == eager.item_sum
    assert graphed.scheduler.last_epoch == eager.scheduler.last_epoch == len(steps)
    other_masks = make_trainer(accum=accum)
    torch.manual_seed(123)
    train(other_masks, steps)
    assert max(float((p - q).norm() / q.norm()) for p, q in zip(params(other_masks), params(eager))) > 1e-4


def test_a_shape_is_warmed_up_eagerly_then_captured_and_unseen_shapes_run_eagerly():
    """One process: a shape's first step is eager (warm-up), its second captured and replayed; a
    new shape later falls back to the eager step (and is captured on its next visit)."""
    log = []
    trainer = make_trainer(graphs=True, log=log.append)
    replayed = train(trainer, steps_of("ABABCAC"))
    assert replayed == [False, False, True, True, False, True, True]
    assert trainer.graphs.eager_steps == 3 and trainer.graphs.replays == 4
    captures = [m[:m.index(") (") + 1] for m in log if "captured" in m]
    assert captures == [f"cuda graphs: captured the step graph for batch shape {s}" for s in ((4, 6), (3, 9), (5, 4))]


def test_capture_limit_leaves_other_shapes_eager_and_says_so_once():
    log = []
    trainer = make_trainer(graphs=True, limit=1, log=log.append)
    replayed = train(trainer, steps_of("ABABABA"))
    assert replayed == [False, False, True, False, True, False, True]
    assert len(trainer.graphs.graphs) == 1
    assert sum("limit of 1 graphs reached (train.cuda_graph_limit)" in m for m in log) == 1
    eager = make_trainer()
    train(eager, steps_of("ABABABA"))
    assert_params_close(params(trainer), params(eager))


def test_replays_read_the_lr_from_device_tensors_and_leave_floats_behind():
    """Captured, the optimizer must read the LR from the device tensors every replay writes (a real
    graph would otherwise bake in the LR of the capture step); between steps the groups hold floats
    again (what the scheduler, checkpoints and logs expect)."""
    trainer = make_trainer(graphs=True)
    seen = []

    def record(optimizer, args, kwargs):  # inside a replay: no host reads (the fake forbids them)
        seen.append([g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in optimizer.param_groups])
    trainer.optimizer.register_step_pre_hook(record)
    for micro in steps_of("AAAAAA"):
        expected = trainer.scheduler.get_last_lr()
        before = trainer.graphs.replays
        trainer.train_step(micro)
        replayed = trainer.graphs.replays > before
        assert [isinstance(lr, torch.Tensor) for lr in seen[-1]] == [replayed] * len(expected)
        assert [float(lr) for lr in seen[-1]] == pytest.approx(expected, rel=1e-6)
        assert all(isinstance(g["lr"], float) for g in trainer.optimizer.param_groups)
    assert trainer.graphs.replays == 5
    assert len({float(s[0]) for s in seen}) >= 5  # warmup: the LR changes from step to step


def test_static_buffers_are_reused_and_persistent_tensors_stay_put():
    """Each graph's inputs live in buffers allocated at its capture and refilled before every
    replay; everything a graph writes that outlives it stays at its address (the fake checks this
    at every replay). Freeing the gradients, as an eager step without graphs does, is caught."""
    trainer = make_trainer(graphs=True)
    train(trainer, steps_of("ABAB"))
    statics = dict(trainer.graphs.graphs)
    pointers = {k: [t.data_ptr() for t in (s.inputs, s.lengths, s.targets, s.scale, s.weight)]
                for k, s in statics.items()}
    more = steps_of("ABABAB", seed=50)
    train(trainer, more)
    assert trainer.graphs.graphs.keys() == statics.keys()
    assert all(trainer.graphs.graphs[k] is s for k, s in statics.items())
    assert {k: [t.data_ptr() for t in (s.inputs, s.lengths, s.targets, s.scale, s.weight)]
            for k, s in statics.items()} == pointers
    last = statics[_key(more[-1][0], final=True)]
    assert torch.equal(last.inputs, more[-1][0].inputs) and torch.equal(last.targets, more[-1][0].targets)
    assert [g.replays for g in trainer.graphs.backend.captured] == [4, 4]
    trainer.optimizer.zero_grad(set_to_none=True)
    with pytest.raises(AssertionError, match="has moved"):
        trainer.train_step(more[0])


def test_resume_rearms_capture_and_continues_like_the_uninterrupted_run(tmp_path):
    """A graphed run resumed from a checkpoint of an eager run (optimizer groups saved with
    capturable=False, loaded after StepGraphs was made, as train.py does): it warms up again,
    captures with the optimizer re-armed, and ends where the uninterrupted eager run ends (1e-6)."""
    first, second = steps_of("ABAB"), steps_of("ABABAB", seed=20)
    reference = make_trainer()
    train(reference, first + second)
    saved = make_trainer()
    train(saved, first)
    saved.state.step = len(first)
    saved.checkpoints = CheckpointManager(tmp_path / "ckpt", rank=0, world_size=1, log=lambda m: None)
    saved.save()
    resumed = make_trainer(graphs=True)
    assert all(g["capturable"] for g in resumed.optimizer.param_groups)
    loaded = CheckpointManager(tmp_path / "ckpt", rank=0, world_size=1, log=lambda m: None).load_latest(
        resumed.checkpoint_state())
    resumed.resumed(loaded)
    assert resumed.state.step == len(first) and not any(g["capturable"] for g in resumed.optimizer.param_groups)
    flags = []
    resumed.optimizer.register_step_pre_hook(
        lambda opt, a, kw: flags.append(all(g["capturable"] for g in opt.param_groups)))
    replayed = train(resumed, second)
    assert replayed == [False, False, True, True, True, True]
    assert flags == [False, False, True, True, True, True]  # re-armed at the first capture
    assert_params_close(params(resumed), params(reference))


def test_failed_capture_continues_eagerly_in_one_process():
    log = []
    trainer = make_trainer(graphs=True, log=log.append, backend=FakeGraphs(fail="no capture here"))
    assert train(trainer, steps_of("AAAA")) == [False] * 4
    assert trainer.graphs.disabled and trainer.graphs.eager_steps == 4
    assert sum("cuda graphs: capture failed (RuntimeError: no capture here); continuing eagerly" in m
               for m in log) == 1
    eager = make_trainer()
    train(eager, steps_of("AAAA"))
    assert_params_close(params(trainer), params(eager), rtol=1e-12)


def test_two_gloo_ranks_agree_warm_up_and_match_eager(tmp_path):
    """2 ranks, real torchrun + gloo DDP, with and without accumulation: the first 11 steps are
    eager (DDP's warm-up) although shapes repeat; at step 13 rank 1 alone meets a new shape while
    rank 0 has all its graphs, and both run it eagerly; every step is replayed on both ranks or on
    neither; graphed == eager to 1e-6 on each rank, dropout on; and lm stream mode under DDP (the
    carried state per rank, in the graphs' static buffers) graphed == eager."""
    out = tmp_path / "graphs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "tests" / "_graphs_worker.py"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    for accum in ("1", "2"):
        r0, r1 = ranks[0][accum], ranks[1][accum]
        assert r0["replayed"] == r1["replayed"], (r0["replayed"], r1["replayed"])
        assert r0["replayed"] == [False] * DDP_WARMUP_STEPS + [True, True, False, True, True, True, True], r0
        assert r0["captured_before"][13] and not r1["captured_before"][13]
        assert not any(r0["eager_replayed"]) and r0["lr_floats"] and r1["lr_floats"]
        results = [torch.load(f"{out}.rank{r}.accum{accum}.pt", weights_only=True) for r in (0, 1)]
        for res in results:
            assert_params_close(res["graphed"], res["eager"])
            assert res["loss"][1] == pytest.approx(res["loss"][0], rel=1e-6)
        assert_params_close(results[1]["graphed"], results[0]["graphed"], rtol=1e-7)  # DDP: one model
    r0, r1 = ranks[0]["stream"], ranks[1]["stream"]  # lm stream mode under DDP: one shape, carried state
    assert r0["replayed"] == r1["replayed"] == [False] * DDP_WARMUP_STEPS + [True] * 5, r0
    for res in [torch.load(f"{out}.rank{r}.accumstream.pt", weights_only=True) for r in (0, 1)]:
        assert_params_close(res["graphed"], res["eager"])
        assert res["loss"][1] == pytest.approx(res["loss"][0], rel=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_stream_mode_graphs_carry_the_state_like_eager_across_resets_and_resume(tmp_path, accum):
    """lm stream mode (issue 18 defect 7): the carried (h, c) and the reset mask in static buffers.
    12 steps of chunks with documents starting at random columns (column 0 included), the state
    carried from chunk to chunk and step to step: graphed == eager to 1e-6 (weights, loss, carried
    state), also when the graphed run is resumed from its checkpoint after step 6 (the carried state
    restored into the static buffers). Embedding dropout on; the LSTM's inter-layer dropout off (the
    graph runs the LSTM one column at a time, which draws its masks in other shapes)."""
    chunks = stream_batches(12 * accum)
    steps = [chunks[i:i + accum] for i in range(0, len(chunks), accum)]
    assert any(b.reset[:, 0].any() for b in chunks) and sum(int(b.reset.any(0).sum()) for b in chunks) > 10
    eager = make_trainer(accum=accum, stream=True, dropout=0.0, embed_dropout=0.2)
    train(eager, steps)
    graphed = make_trainer(accum=accum, stream=True, dropout=0.0, embed_dropout=0.2, graphs=True)
    replayed = train(graphed, steps[:6])
    assert replayed == [False, True, True, True, True, True]
    graphed.state.step = 6
    graphed.checkpoints = CheckpointManager(tmp_path / "ckpt", rank=0, world_size=1, log=lambda m: None)
    graphed.save()
    assert all(train(graphed, steps[6:]))
    resumed = make_trainer(accum=accum, stream=True, dropout=0.0, embed_dropout=0.2, graphs=True)
    loaded = CheckpointManager(tmp_path / "ckpt", rank=0, world_size=1, log=lambda m: None).load_latest(
        resumed.checkpoint_state())
    resumed.resumed(loaded)
    assert loaded["rank_state_restored"] and resumed.carry.state is not None
    assert train(resumed, steps[6:]) == [False, True, True, True, True, True]
    for run in (graphed, resumed):
        assert_params_close(params(run), params(eager))
        for mine, theirs in zip(run.carry.state, eager.carry.state):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(graphed.loss_sum, eager.loss_sum, rtol=1e-6, atol=0)

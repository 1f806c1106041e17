"""Checkpoints: save/load of the whole train state, resharding, kill-safety, verification, retention.

A failure here means a run cannot resume correctly: a resumed run would diverge from an
uninterrupted one, a checkpoint written on N ranks could not be loaded on M, a killed or corrupted
save could be loaded (or could block loading an older good one), or retention could delete the
wrong checkpoints. Multi-rank cases run real torchrun + gloo on CPU with timeouts so a hang fails.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distlstm.checkpoint.manager import CheckpointManager, rng_state, set_rng_state, tree_hash, verify_checkpoint

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_ckpt_worker.py"
sys.path.insert(0, str(HERE))
import _ckpt_worker as worker  # noqa: E402


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str, timeout: float = 180) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), *args]
    # Own session, so a hang is ended by killing the whole group torchrun started, not just torchrun.
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {args} hung for {timeout}s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"torchrun {args} failed ({proc.returncode}):\n{out[-4000:]}"


def _state(model, optim, **kw) -> dict:
    return {"model": model, "optim": optim, **kw}


def _quiet_mgr(run: Path, logs: list | None = None, **kw) -> CheckpointManager:
    return CheckpointManager(run, rank=0, world_size=1, log=(logs.append if logs is not None else lambda m: None), **kw)


# ---------------------------------------------------------------- single process


def test_round_trip_resumes_bit_exact(tmp_path):
    """Save mid-run, train on; a fresh process-like restore must reproduce the same parameters."""
    model, optim, sched = worker.build(seed=0)
    gen = torch.Generator().manual_seed(7)
    worker.train_steps(model, optim, sched, 3, gen)
    mgr = _quiet_mgr(tmp_path)
    extra = {"scheduler": sched.state_dict(), "gen": gen.get_state().tolist(), "pair": (1, "a")}
    mgr.save(3, _state(model, optim, extra=extra, rank_state={"rng": rng_state(), "note": "r0"}))
    saved_hash = tree_hash(model, optim)
    worker.train_steps(model, optim, sched, 3, gen)  # dropout draws from the global torch RNG
    uninterrupted = tree_hash(model, optim)

    model2, optim2, sched2 = worker.build(seed=99, lr=0.5)
    torch.manual_seed(12345)  # scramble the RNG the restore must put back
    got = mgr.load_latest(_state(model2, optim2))
    assert got["step"] == 3 and got["world_size"] == 1 and got["path"] == tmp_path / "step-000003"
    assert tree_hash(model2, optim2) == saved_hash
    assert got["extra"]["pair"] == (1, "a") and got["rank_state"]["note"] == "r0"
    sched2.load_state_dict(got["extra"]["scheduler"])
    set_rng_state(got["rank_state"]["rng"])
    gen2 = torch.Generator()
    gen2.set_state(torch.tensor(got["extra"]["gen"], dtype=torch.uint8))
    worker.train_steps(model2, optim2, sched2, 3, gen2)
    assert tree_hash(model2, optim2) == uninterrupted


def test_rng_state_round_trips_through_json():
    state = rng_state()
    json.dumps({k: v for k, v in state.items() if k not in ("torch", "cuda")})  # JSON apart from tensors
    a = (random.random(), torch.rand(3).tolist())
    import numpy as np
    a += (np.random.rand(),)
    set_rng_state(state)
    assert (random.random(), torch.rand(3).tolist(), np.random.rand()) == a


def test_non_json_extra_is_rejected_with_its_key(tmp_path):
    model, optim, _ = worker.build(seed=0)
    with pytest.raises(TypeError, match=r"state\['extra'\]\['sched'\]"):
        _quiet_mgr(tmp_path).save(1, _state(model, optim, extra={"sched": object()}))


def _save_steps(mgr: CheckpointManager, steps, model, optim) -> None:
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(s))
        mgr.save(s, _state(model, optim, extra={"step": s}))


def test_corrupt_and_partial_checkpoints_are_skipped_with_reasons(tmp_path):
    model, optim, sched = worker.build(seed=0)
    worker.train_steps(model, optim, sched, 1, torch.Generator().manual_seed(0))
    _save_steps(_quiet_mgr(tmp_path, keep_last=10), range(1, 6), model, optim)
    shard = lambda s: next((tmp_path / f"step-{s:06d}").glob("__*.distcp"))  # noqa: E731
    with open(shard(5), "r+b") as f:  # truncated shard
        f.truncate(f.seek(0, 2) // 2)
    with open(shard(4), "r+b") as f:  # one flipped byte, same size
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    (tmp_path / "step-000003" / "MANIFEST.json").unlink()
    (tmp_path / "step-000006.tmp").mkdir()  # a save killed before its commit
    (tmp_path / "step-000006.tmp" / "__0_0.distcp").write_bytes(b"partial")

    logs: list[str] = []
    model2, optim2, _ = worker.build(seed=1)
    got = _quiet_mgr(tmp_path, logs).load_latest(_state(model2, optim2))
    assert got["step"] == 2 and got["extra"] == {"step": 2}
    assert all(bool((p == 2.0).all()) for p in model2.parameters())
    text = "\n".join(logs)
    assert "step-000006.tmp" in text and "leftover .tmp" in text
    assert "step-000005" in text and "bytes, manifest says" in text
    assert "step-000004" in text and "sha256 mismatch" in text
    assert "step-000003" in text and "MANIFEST.json is missing" in text

    with pytest.raises(ValueError, match="step-000004 is not valid: file __0_0.distcp sha256 mismatch"):
        _quiet_mgr(tmp_path).load(tmp_path / "step-000004", _state(model2, optim2))


def test_dangling_latest_pointer_falls_back(tmp_path):
    model, optim, _ = worker.build(seed=0)
    mgr = _quiet_mgr(tmp_path)
    _save_steps(mgr, [1, 2], model, optim)
    (tmp_path / "latest").write_text("step-000009\n")
    logs: list[str] = []
    got = _quiet_mgr(tmp_path, logs).load_latest(_state(*worker.build(seed=1)[:2]))
    assert got["step"] == 2 and "step-000009: directory does not exist" in "\n".join(logs)
    assert _quiet_mgr(tmp_path / "empty").load_latest(_state(*worker.build(seed=1)[:2])) is None


def test_retention_keeps_last_and_every_and_cleans_leftovers(tmp_path):
    model, optim, _ = worker.build(seed=0)
    mgr = _quiet_mgr(tmp_path, keep_last=2, keep_every=4)
    _save_steps(mgr, range(1, 11), model, optim)
    names = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    assert names() == ["latest", "step-000004", "step-000008", "step-000009", "step-000010"]
    assert (tmp_path / "latest").read_text() == "step-000010\n"
    (tmp_path / "step-000011.tmp").mkdir()
    (tmp_path / "step-000001.deleting").mkdir()
    _save_steps(mgr, [11], model, optim)
    assert names() == ["latest", "step-000004", "step-000008", "step-000010", "step-000011"]
    # Resuming from step 8 and saving step 9 supersedes the abandoned 10 and 11.
    _save_steps(mgr, [9], model, optim)
    assert names() == ["latest", "step-000004", "step-000008", "step-000009"]
    assert all(verify_checkpoint(tmp_path / n) == [] for n in names()[1:])


def test_shape_mismatch_lists_keys_with_both_shapes(tmp_path):
    model, optim, _ = worker.build(seed=0)
    _quiet_mgr(tmp_path).save(1, _state(model, optim))
    torch.manual_seed(0)
    bigger = worker.TinyLSTM(hidden=48)
    with pytest.raises(ValueError) as err:
        _quiet_mgr(tmp_path).load_latest({"model": bigger, "optim": torch.optim.AdamW(bigger.parameters())})
    msg = str(err.value)
    assert "model.lstm.weight_ih_l0: saved [128, 16], expected [192, 16]" in msg
    assert "model.head.weight: saved [5, 32], expected [5, 48]" in msg


def test_model_only_load_and_missing_optimizer_state(tmp_path):
    model, optim, sched = worker.build(seed=0)
    worker.train_steps(model, optim, sched, 1, torch.Generator().manual_seed(0))
    _quiet_mgr(tmp_path / "full").save(1, _state(model, optim))
    _quiet_mgr(tmp_path / "model_only").save(1, {"model": model})
    model2, optim2, _ = worker.build(seed=1)
    _quiet_mgr(tmp_path / "full").load_latest({"model": model2})  # eval: optimizer state not wanted
    assert tree_hash(model2) == tree_hash(model)
    with pytest.raises(ValueError, match="has no optimizer state"):
        _quiet_mgr(tmp_path / "model_only").load_latest(_state(model2, optim2))


def test_async_save_in_one_process_matches_sync(tmp_path):
    model, optim, sched = worker.build(seed=0)
    gen = torch.Generator().manual_seed(3)
    worker.train_steps(model, optim, sched, 2, gen)
    with CheckpointManager(tmp_path / "a", rank=0, world_size=1, async_save=True, log=lambda m: None) as mgr:
        mgr.save(2, _state(model, optim))
        expected = tree_hash(model, optim)
        worker.train_steps(model, optim, sched, 2, gen)  # mutate while the writer thread runs
    model2, optim2, _ = worker.build(seed=1)
    assert _quiet_mgr(tmp_path / "a").load_latest(_state(model2, optim2))["step"] == 2
    assert tree_hash(model2, optim2) == expected


# ---------------------------------------------------------------- kill-safety


def test_sigkill_during_save_never_leaves_an_unloadable_or_partial_checkpoint(tmp_path):
    """SIGKILL a saving process at random moments (the save/commit/retention phases, keep_last=2);
    every restart must load a complete checkpoint (all tensors == its step) and never go back."""
    seed = int(os.environ.get("CKPT_KILL_SEED", random.randrange(1 << 30)))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(WORKER), "killtest", str(run), "12", str(seed)], env=_env(),
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"seed {seed}:\n{out[-4000:]}"
    resumed = json.loads(out.split("resumed ", 1)[1].splitlines()[0])
    assert resumed == sorted(resumed) and resumed[-1] > 0, f"seed {seed}: resumed at steps {resumed}"
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    optim = torch.optim.AdamW(model.parameters())
    got = _quiet_mgr(run).load_latest(_state(model, optim))
    assert got is not None and got["step"] >= resumed[-1], f"seed {seed}"
    assert worker.consistent(model, optim, got["step"]) and got["extra"] == {"step": got["step"]}, f"seed {seed}"


# ---------------------------------------------------------------- multi-rank (torchrun, gloo)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """2 ranks train a DDP LSTM and save sync (step 3) and async (steps 3 and 5); 1 rank saves too."""
    out = tmp_path_factory.mktemp("two_rank")
    _torchrun(2, "save", str(out))
    expect = [json.loads((out / f"expect-rank{r}.json").read_text()) for r in range(2)]
    assert expect[0]["h3"] == expect[1]["h3"], "DDP replicas diverged before the save"
    return out, expect


def test_two_rank_checkpoint_loads_on_one_rank(two_rank_run):
    out, expect = two_rank_run
    model, optim, sched = worker.build(seed=5, lr=0.3)
    got = _quiet_mgr(out / "sync").load_latest(_state(model, optim))
    assert (got["step"], got["world_size"]) == (3, 2)
    assert tree_hash(model, optim) == expect[0]["h3"]
    assert worker.summary(got["rank_state"]) == expect[0]["rank_state"]
    assert got["extra"] == expect[0]["extra3"]


def test_async_save_on_two_ranks_equals_sync(two_rank_run):
    out, expect = two_rank_run
    assert sorted(p.name for p in (out / "async").iterdir()) == ["latest", "step-000003", "step-000005"]
    for step, key in ((3, "h3"), (5, "h5")):
        model, optim, _ = worker.build(seed=5)
        got = _quiet_mgr(out / "async").load(out / "async" / f"step-{step:06d}", _state(model, optim))
        assert got["step"] == step and tree_hash(model, optim) == expect[0][key]


def test_save_failing_on_one_rank_raises_on_all_and_leaves_no_checkpoint(two_rank_run):
    out, expect = two_rank_run
    assert [e.get("bad_save") for e in expect] == ["CheckpointError", "TypeError"]  # CheckpointError is a RuntimeError
    assert sorted(p.name for p in (out / "bad").iterdir()) == ["latest", "step-000002"]


def test_checkpoints_reshard_onto_three_ranks(two_rank_run, tmp_path):
    out, expect = two_rank_run
    single = tmp_path / "single"  # 1 -> 3 as well as 2 -> 3
    model, optim, sched = worker.build(seed=0)
    worker.train_steps(model, optim, sched, 2, torch.Generator().manual_seed(1))
    _quiet_mgr(single).save(2, _state(model, optim, extra={"scheduler": sched.state_dict()},
                                      rank_state=worker.make_rank_state(0)))
    single_hash = tree_hash(model, optim)
    _torchrun(3, "load", str(tmp_path), str(out / "sync"), str(single))
    for rank in range(3):
        res = json.loads((tmp_path / f"load-ws3-rank{rank}.json").read_text())
        two = res[str(out / "sync")]
        assert (two["step"], two["world_size"], two["hash"]) == (3, 2, expect[0]["h3"]), f"rank {rank}"
        assert two["rank_state"] == (expect[rank]["rank_state"] if rank < 2 else None), f"rank {rank}"
        one = res[str(single)]
        assert (one["step"], one["world_size"], one["hash"]) == (2, 1, single_hash), f"rank {rank}"
        assert (one["rank_state"] is None) == (rank > 0), f"rank {rank}"

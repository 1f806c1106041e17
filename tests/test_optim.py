"""The classic LM recipe's optimizer side: optim.name adamw|adam|sgd (momentum, Nesterov) and
optim.schedule plateau, driven on real optimizers and a real Trainer in one process, and through
`python -m distlstm.train` for the plateau's checkpoint and resume.

A failure means a recipe trains with other numbers than its config says (the wrong update rule,
weight decay where the recipe has none), a non-finite or fp16-overflow step reaches the weights or
poisons SGD's momentum, the plateau schedule reduces the lr at the wrong evaluations or forgets
its state across a checkpoint, or a torch upgrade silently stopped honouring the non-finite flag
the trainer relies on to skip bad steps without a host sync.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distlstm.config import Config, ConfigError, ModelConfig, OptimConfig, TrainConfig, load_config
from distlstm.models.lstm import build_model
from distlstm.run.optim import PlateauSchedule
from distlstm.distributed.parallel import AmpPolicy
from distlstm.checkpoint.codec import decode_tree, encode_tree
from distlstm.run.trainer import Trainer, build_optimizer
from distlstm.distributed.world import detect_world
from tests._step_worker import make_batches

RECIPES = {
    "adamw": dict(name="adamw"),
    "adam": dict(name="adam", weight_decay=0.0),
    "sgd": dict(name="sgd", lr=0.5, weight_decay=0.0),
    "sgd-momentum": dict(name="sgd", lr=0.5, weight_decay=0.0, momentum=0.9),
    "sgd-nesterov": dict(name="sgd", lr=0.5, weight_decay=1e-4, momentum=0.9, nesterov=True),
}


class _Loader:
    epoch = 0


def make_trainer(precision: str = "fp32", valid_loader=None, **optim) -> Trainer:
    cfg = Config(model=ModelConfig(task="classify", input="tokens", hidden_size=16, embed_size=8),
                 optim=OptimConfig(**{"warmup_steps": 0, **optim}), train=TrainConfig(precision=precision))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=20, input_size=0, num_classes=3)
    optimizer, scheduler = build_optimizer(model, cfg.optim, 100, torch.device("cpu"))
    return Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                   amp=AmpPolicy(precision, torch.device("cpu")), device=torch.device("cpu"),
                   train_loader=_Loader(), valid_loader=valid_loader)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fused_optimizers_honour_the_nonfinite_flag(recipe):
    """The trainer skips a bad step by handing the optimizer `found_inf` (no host sync). If a torch
    upgrade ignores the attribute, this fails before any run trains on NaN."""
    trainer = make_trainer(**RECIPES[recipe])
    opt = trainer.optimizer
    assert all(group["fused"] for group in opt.param_groups), recipe
    for p in trainer.params:
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    state_before = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    opt.found_inf, opt.grad_scale = torch.ones(()), None
    opt.step()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), (recipe, n)
    state_after = {k: v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items()), recipe
    opt.found_inf = torch.zeros(())
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()), recipe


@pytest.mark.parametrize("recipe", ["sgd-momentum", "sgd-nesterov"])
def test_sgd_matches_the_reference_update_rule(recipe):
    """optim.name=sgd is torch's (unfused, textbook) SGD with the same momentum, Nesterov and weight
    decay, the decay on matrices only."""
    trainer = make_trainer(schedule="constant", **RECIPES[recipe])
    cfg = trainer.cfg.optim
    reference_model = build_model(trainer.cfg.model, vocab_size=20, input_size=0, num_classes=3)
    reference_model.load_state_dict(trainer.model.state_dict())
    params = list(reference_model.parameters())
    reference = torch.optim.SGD([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=False)
    for batch in make_batches("classify", 3):
        trainer.train_step([batch])
        reference.zero_grad()
        loss, _, _ = trainer.task.loss_and_metrics(reference_model(batch.inputs, batch.lengths), batch.targets,
                                                   batch.lengths)
        (loss / batch.lengths.shape[0]).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        reference.step()
    for (n, p), q in zip(trainer.model.named_parameters(), params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{recipe}: {n}")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_skipped_first_step_leaves_sgd_momentum_clean(precision):
    """Fused SGD allocates its momentum buffer uninitialised and relies on the first step to fill it;
    a first step skipped (NaN, or an fp16 overflow while the scale settles) must not leave garbage
    there: skip + K good steps == the same K good steps alone, bit for bit."""
    batches = make_batches("classify", 3)
    # A constant schedule: a skipped step advances the schedule until the next counter flush.
    recipe = dict(RECIPES["sgd-momentum"], schedule="constant")
    scaler = lambda scale: torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)  # noqa: E731
    clean, skipped = make_trainer(precision, **recipe), make_trainer(precision, **recipe)
    if precision == "fp16":
        clean.amp.scaler = scaler(2.0**8)
    for b in batches:
        clean.train_step([b])
    # Leave recognisable junk in freed memory, where an uninitialised buffer would find it.
    junk = [torch.full_like(p, 1e3) for p in skipped.params]
    del junk
    if precision == "fp32":
        bad = make_batches("classify", 1, seed=5)[0]
        with torch.no_grad():
            saved = skipped.model.embedding.weight.detach().clone()
            skipped.model.embedding.weight[bad.inputs[0, 0]] = float("nan")
        skipped.train_step([bad])
        with torch.no_grad():
            skipped.model.embedding.weight.copy_(saved)
        assert int(skipped.bad_run) == 1
    else:
        skipped.amp.scaler = scaler(2.0**127)  # guaranteed overflow
        skipped.train_step([batches[0]])
        assert skipped.state.skipped_steps == 1
        skipped.amp.scaler = scaler(2.0**8)
    for state in skipped.optimizer.state.values():
        assert torch.count_nonzero(state["momentum_buffer"]) == 0
    for b in batches:
        skipped.train_step([b])
    for (n, p), q in zip(clean.model.named_parameters(), skipped.model.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")  # no optimizer steps here
def test_plateau_reduces_after_patience_evaluations_without_a_new_best():
    trainer = make_trainer(name="sgd", lr=2.0, weight_decay=0.0, schedule="plateau", plateau_factor=0.25,
                           plateau_patience=2, valid_loader=object())
    plateau = trainer.scheduler
    assert isinstance(plateau, PlateauSchedule)
    lrs = []
    for loss in [3.0, 2.0, 2.5, 2.0, 1.9, float("nan"), 1.95, 1.8, 1.9, 1.9]:
        plateau.observe(loss)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    #        3.0  2.0  2.5  2.0(=best: no) 1.9  nan  1.95(2nd bad) 1.8  1.9  1.9(2nd bad)
    assert lrs == [2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.125, 0.125, 0.125, 0.03125]
    assert plateau.get_last_lr() == [0.03125, 0.03125]
    # The reduced lr holds through later scheduler steps (the plateau scale multiplies the schedule).
    for _ in range(3):
        plateau.step()
    assert trainer.optimizer.param_groups[1]["lr"] == 0.03125


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")  # no optimizer steps here
def test_plateau_keeps_warmup_and_its_state_survives_a_checkpoint_round_trip():
    """The scheduler's state goes into extra.json through the checkpoint codec: a fresh schedule
    loaded from it reduces at the same evaluations and gives the same lr at every step."""
    def build():
        return make_trainer(name="adam", lr=1.0, weight_decay=0.0, schedule="plateau", warmup_steps=4,
                            plateau_factor=0.5, plateau_patience=1, valid_loader=object()).scheduler
    a = build()
    assert a.get_last_lr()[0] == 0.25  # warmup: step 0 runs at lr x 1/4
    for loss in [2.0, 2.1]:
        a.step()
        a.observe(loss)
    saved = json.loads(json.dumps(encode_tree(a.state_dict(), "scheduler")))
    assert "factor" not in saved and "patience" not in saved
    b = build()
    b.load_state_dict(decode_tree(saved))
    for loss in [1.0, 1.5, 0.9, 0.95]:
        for s in (a, b):
            s.step()
            s.observe(loss)
        assert a.get_last_lr() == b.get_last_lr() and a.scale == b.scale and a.best == b.best
    assert a.scale == 0.125  # 2.1, 1.5 and 0.95 were no new best


def test_plateau_without_validation_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.schedule=plateau .* needs validation data"):
        make_trainer(schedule="plateau")


@pytest.mark.parametrize("args, needle", [
    (["--optim.name", "sgd", "--optim.lr", "20"], "shrinks every weight by 20% per step; set --optim.weight_decay 0"),
    (["--optim.name", "sgd", "--optim.nesterov"], "optim.nesterov=true needs optim.momentum > 0"),
    (["--optim.momentum", "0.9"], "optim.momentum / optim.nesterov apply to optim.name=sgd, not 'adamw'"),
    (["--optim.name", "lion"], "optim.name='lion' is not allowed; choose one of adamw, adam, sgd"),
    (["--optim.plateau_factor", "1.5"], "optim.plateau_factor=1.5 must be in (0, 1)"),
    (["--optim.plateau_patience", "0"], "optim.plateau_patience=0 must be > 0"),
    (["--model.embed_dropout", "1.0"], "model.embed_dropout=1.0 must be in [0, 1)"),
])
def test_recipe_config_errors_name_the_key(args, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    assert needle in str(err.value)


def test_the_classic_recipe_is_valid_configuration():
    cfg = load_config(None, ["--optim.name", "sgd", "--optim.lr", "20", "--optim.weight_decay", "0",
                             "--optim.grad_clip", "0.25", "--optim.schedule", "plateau", "--optim.warmup_steps", "0",
                             "--model.embed_dropout", "0.5", "--model.dropout", "0.5"])
    assert (cfg.optim.name, cfg.optim.plateau_factor, cfg.model.embed_dropout) == ("sgd", 0.25, 0.5)


def test_embed_dropout_drops_the_lstm_input_in_training_only():
    cfg = ModelConfig(task="lm", input="tokens", hidden_size=8, embed_size=8, embed_dropout=0.5)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=20, input_size=0, num_classes=0)
    x, lengths = torch.randint(0, 20, (4, 6)), torch.full((4,), 6)
    seen = []
    model.lstm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    model.train()
    model(x, lengths)
    model.eval()
    model(x, lengths)
    embedded = model.embedding(x).detach()
    assert torch.equal(seen[1], embedded)
    dropped = seen[0] == 0
    assert 0.3 < dropped.float().mean() < 0.7
    torch.testing.assert_close(seen[0][~dropped], embedded[~dropped] * 2)


def test_plateau_sgd_run_resumes_bit_exact(tmp_path):
    """The classic recipe's pieces through the CLI: SGD + Nesterov, plateau, embedding and output
    dropout. Resumed from its step-8 checkpoint, with lr reductions before and after it, the run
    ends with the same parameters and the same lr at every step as the uninterrupted run."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DISTLSTM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    args = ["--model.hidden_size", "32", "--data.synthetic_samples", "1000", "--log.progress", "false",
            "--data.max_tokens", "1024", "--data.num_workers", "0", "--optim.name", "sgd", "--optim.lr", "3",
            "--optim.weight_decay", "0", "--optim.momentum", "0.9", "--optim.nesterov", "--optim.schedule", "plateau",
            "--optim.plateau_factor", "0.5", "--optim.warmup_steps", "2", "--train.eval_every", "2",
            "--train.eval_max_batches", "2", "--train.max_steps", "16", "--log.every_steps", "1",
            "--model.embed_dropout", "0.2", "--model.dropout", "0.2"]

    def train(name: str, *extra: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "distlstm.train", *args, "--train.run_dir", str(tmp_path / name),
                               *extra], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    train("full", "--checkpoint.every_steps", "8")
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000008"
    saved = json.loads((checkpoint / "extra.json").read_text())["scheduler"]
    assert saved["scale"] < 1.0, saved  # reduced before the checkpoint: the restored state matters
    out = train("resumed", "--checkpoint.resume", str(checkpoint))
    assert "resumed from" in out and "lr x 0.5" in out  # ... and reduced again after it

    def lrs(name: str) -> dict:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["lr"] for r in map(json.loads, lines) if r["kind"] == "train" and r["step"] > 8}
    assert lrs("full") == lrs("resumed") and len(lrs("full")) == 8
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("full", "resumed"))
    for name in a:
        assert torch.equal(a[name], b[name]), name

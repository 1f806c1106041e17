"""The optimizer step's safety nets, driven directly on a Trainer in one process.

A failure means an fp16 overflow step moves the learning-rate schedule (the schedule drifts from
the steps actually taken), a non-finite gradient reaches the weights, or a run with a persistent
NaN keeps going instead of stopping with the module to blame.
"""

import pytest
import torch

from distlstm.config import Config, ModelConfig, TrainConfig
from distlstm.models.lstm import build_model
from distlstm.distributed.parallel import AmpPolicy
from distlstm.run.trainer import NonFiniteError, Trainer, build_optimizer
from distlstm.distributed.world import detect_world
from tests._step_worker import make_batches


class _Loader:
    epoch = 0


def make_trainer(precision: str, **train) -> Trainer:
    cfg = Config(model=ModelConfig(task="classify", input="tokens", hidden_size=16, embed_size=8),
                 train=TrainConfig(precision=precision, **train))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=20, input_size=0, num_classes=3)
    optimizer, scheduler = build_optimizer(model, cfg.optim, 100, torch.device("cpu"))
    return Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                   amp=AmpPolicy(precision, torch.device("cpu")), device=torch.device("cpu"),
                   train_loader=_Loader())


def test_fp16_overflow_skips_the_step_and_the_schedule():
    trainer = make_trainer("fp16")
    trainer.amp.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # guaranteed overflow
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step(make_batches("classify", 1))
    assert trainer.scheduler.last_epoch == 0 and trainer.state.skipped_steps == 1
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n
    trainer.amp.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.train_step(make_batches("classify", 1))
    assert trainer.scheduler.last_epoch == 1
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_nonfinite_gradient_is_skipped_without_touching_weights():
    trainer = make_trainer("fp32")
    batch = make_batches("classify", 1)[0]
    with torch.no_grad():
        trainer.model.embedding.weight[batch.inputs[0, 0]] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step([batch])
    assert int(trainer.bad_run) == 1
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]) or torch.isnan(before[n]).any(), n


def test_persistent_nonfinite_stops_naming_the_module():
    trainer = make_trainer("fp32", max_bad_steps=3)
    batch = make_batches("classify", 1)[0]
    with torch.no_grad():
        trainer.model.embedding.weight.fill_(float("inf"))
    for _ in range(3):
        trainer.train_step([batch])
        trainer.last_micro = [batch]
    from distlstm.run.trainer import _Interval
    with pytest.raises(NonFiniteError, match=r"3 consecutive .* first non-finite value: output of module 'embedding'"):
        trainer._log_interval(_Interval())


def test_nonfinite_skip_does_not_advance_the_schedule_or_counters():
    """fp32/bf16: a skipped (non-finite) step comes off the LR schedule at the next flush, and is counted."""
    trainer = make_trainer("fp32")
    batch = make_batches("classify", 1)[0]
    saved = trainer.model.embedding.weight.detach().clone()
    with torch.no_grad():
        trainer.model.embedding.weight[batch.inputs[0, 0]] = float("nan")
    trainer.train_step([batch])
    with torch.no_grad():
        trainer.model.embedding.weight.copy_(saved)
    trainer.train_step([batch])
    trainer._flush_counters()
    assert trainer.state.skipped_steps == 1 and trainer.scheduler.last_epoch == 1


def test_epoch_limited_run_spans_the_cosine_over_its_real_length(tmp_path):
    """train.max_steps 0 + train.max_epochs N: the schedule length comes from the data plan."""
    from distlstm.config import load_config
    from distlstm.data.shards.index import open_index
    from distlstm.data.prep.synthetic import ensure_synthetic
    from distlstm.train import total_steps
    root = ensure_synthetic(tmp_path, num_train=1000, num_valid=100)
    index = open_index(str(root / "train"), cache_dir=tmp_path)
    cfg = load_config(None, ["--train.max_steps", "0", "--train.max_epochs", "2", "--data.max_tokens", "1024",
                             "--train.accum_steps", "2"])
    one = total_steps(load_config(None, ["--train.max_steps", "0", "--train.max_epochs", "1",
                                         "--data.max_tokens", "1024", "--train.accum_steps", "2"]), index,
                      detect_world({}))
    both = total_steps(cfg, index, detect_world({}))
    assert 0 < one < both <= 2 * one + 1

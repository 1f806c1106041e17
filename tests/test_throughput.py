"""The interval metrics measure the work the steps did, not how fast the host queued them.

A failure means `tokens_per_s` (and `tflops`, `data_wait`) is inflated: on a GPU the host runs
ahead of the kernels (with CUDA graphs by up to log.every_steps steps), so an interval timed before
the device values are read measures queueing (issue 18, defect 2); or an interval that contained a
validation counts the evaluation as training time (issue 21, metrics). Runs a real Trainer on CPU;
a "device value" whose host read blocks stands in for a GPU tensor with steps still queued behind it.
"""

import json
import time

import torch

from distlstm.config import Config, LogConfig, ModelConfig, TrainConfig
from distlstm.distributed.parallel import AmpPolicy
from distlstm.distributed.world import detect_world
from distlstm.models.lstm import build_model
from distlstm.run.report import Reporter
from distlstm.run.trainer import Trainer, _Interval, build_optimizer
from tests._step_worker import make_batches

QUEUED_S = 0.3
"""How long a host read of a device value waits for the queued steps."""

_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
               torch.Tensor.__bool__, torch.Tensor.cpu, torch.Tensor.numpy}


class _QueuedOnDevice(torch.Tensor):
    """A tensor whose every host read first waits QUEUED_S, as reading a CUDA tensor waits for the
    kernels queued before it. Results of ops on it (stack, add_) stay of this type."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            _QueuedOnDevice.reads += 1
            time.sleep(QUEUED_S)
        return super().__torch_function__(func, types, args, kwargs or {})


class _Loader:
    """Batches in a list, one pass per epoch (`rewind` starts again)."""

    def __init__(self, batches, delay_s: float = 0.0):
        self.batches, self.delay_s, self.epoch = batches, delay_s, 0

    def __iter__(self):
        for b in self.batches:
            time.sleep(self.delay_s)  # a slow validation set
            yield b

    def rewind(self) -> None:
        pass


def make_trainer(tmp_path, *, valid=None, **train) -> Trainer:
    cfg = Config(model=ModelConfig(task="classify", input="tokens", hidden_size=16, embed_size=8),
                 train=TrainConfig(precision="fp32", **train), log=LogConfig(every_steps=1, tensorboard=False))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=20, input_size=0, num_classes=3)
    optimizer, scheduler = build_optimizer(model, cfg.optim, 100, torch.device("cpu"))
    reporter = Reporter(tmp_path, enabled=True, total_steps=None, progress=False, tensorboard=False)
    return Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                   amp=AmpPolicy("fp32", torch.device("cpu")), device=torch.device("cpu"),
                   train_loader=_Loader(make_batches("classify", 4)), valid_loader=valid, reporter=reporter)


def records(tmp_path, kind: str) -> list[dict]:
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_interval_time_counts_the_wait_for_the_device(tmp_path):
    """The device values are read (waiting QUEUED_S for the queued steps) before the interval is
    timed, and in one read: four separate reads would wait four times."""
    trainer = make_trainer(tmp_path)
    for name in ("loss_sum", "bad_run", "grad_norm", "skipped_dev"):
        setattr(trainer, name, getattr(trainer, name).as_subclass(_QueuedOnDevice))
    interval = _Interval()
    for batch in make_batches("classify", 2):
        interval.add(batch)
        trainer.train_step([batch])
    _QueuedOnDevice.reads = 0
    trainer._log_interval(interval)
    (record,) = records(tmp_path, "train")
    # The steps and the wait took at least QUEUED_S, so no honest rate exceeds this.
    assert record["tokens_per_s"] <= interval.real / QUEUED_S
    assert _QueuedOnDevice.reads == 1
    assert record["loss"] > 0 and record["grad_norm"] > 0


def test_interval_throughput_leaves_out_the_evaluation(tmp_path):
    """Step 1 is logged, then validated (EVAL_S at least); step 2's interval contains that
    evaluation, and its tokens_per_s must not count it. The valid record says how long it took."""
    eval_s = 1.0
    valid = _Loader(make_batches("classify", 1, seed=1), delay_s=eval_s)
    trainer = make_trainer(tmp_path, valid=valid, max_steps=2, eval_every=1)
    trainer.fit()
    train, evals = records(tmp_path, "train"), records(tmp_path, "valid")
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [1, 2]
    real_tokens_step2 = trainer.train_loader.batches[1].num_tokens
    seconds = real_tokens_step2 / train[1]["tokens_per_s"]
    assert seconds < eval_s / 2, f"step 2's interval took {seconds:.3f} s by its tokens_per_s: the evaluation is in it"
    assert all(r["eval_s"] >= eval_s for r in evals)

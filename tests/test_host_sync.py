"""The training step reads nothing back from the device (issue 18, defect 6).

A failure means a host sync crept into `Trainer.train_step` (CUDA graphs off): on a GPU the host
would wait for the queued kernels once per step (or more), throughput would drop, and the step could
not be captured. The step runs under tests/sync_detector.py's `no_host_reads`, which makes every
host read of a tensor raise, except reads of host-side values at the call sites it lists.
"""

import dataclasses

import pytest
import torch

from distlstm.config import Config, ModelConfig, OptimConfig, TrainConfig
from distlstm.data.batch import Batch
from distlstm.distributed.parallel import AmpPolicy
from distlstm.distributed.world import detect_world
from distlstm.models.lstm import build_model
from distlstm.run.bptt import StateCarrier
from distlstm.run.trainer import Trainer, build_optimizer
from tests._step_worker import make_batches
from tests.sync_detector import ALLOWED, HostSync, no_host_reads


class _Loader:
    epoch = 0


def make_trainer(task: str, *, precision: str = "fp32", bidirectional: bool = False, optim: str = "adamw") -> Trainer:
    cfg = Config(model=ModelConfig(task=task, input="tokens", hidden_size=16, embed_size=8, bidirectional=bidirectional),
                 train=TrainConfig(precision=precision), optim=OptimConfig(name=optim))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=20, input_size=0, num_classes=3)
    optimizer, scheduler = build_optimizer(model, cfg.optim, 100, torch.device("cpu"))
    return Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                   amp=AmpPolicy(precision, torch.device("cpu")), device=torch.device("cpu"), train_loader=_Loader())


def loader_batches(trainer: Trainer, n: int) -> list[Batch]:
    """Batches as the loader hands them over: token and item counts done by the worker."""
    name = trainer.task.name
    batches = make_batches("lm" if name == "tag" else name, n)
    if name == "tag":  # a class (of 3) per token, -100 in the padding
        batches = [dataclasses.replace(b, targets=torch.where(b.targets >= 0, b.targets % 3, b.targets)) for b in batches]
    return [dataclasses.replace(b, items=trainer.task.item_count(b), tokens=b.num_tokens) for b in batches]


def stream_batches(n: int, rows: int = 3, columns: int = 6) -> list[Batch]:
    """lm stream mode: full-length rows, documents starting inside some of them (the reset mask)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randint(1, 20, (rows, columns), generator=g)
        reset = torch.zeros(rows, columns, dtype=torch.bool)
        reset[i % rows, 2 + i % 3] = True
        out.append(Batch(x, torch.full((rows,), columns), x.roll(-1, 1), torch.arange(rows), items=rows * columns,
                         tokens=rows * columns, reset=reset))
    return out


CASES = {
    "classify": dict(task="classify"),
    "classify bidirectional (packing)": dict(task="classify", bidirectional=True),
    "tag bidirectional (packing)": dict(task="tag", bidirectional=True),
    "lm bf16": dict(task="lm", precision="bf16"),
    "classify sgd": dict(task="classify", optim="sgd"),
    "classify adam": dict(task="classify", optim="adam"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_reads_nothing_from_the_device(case, accum):
    trainer = make_trainer(**CASES[case])
    batches = loader_batches(trainer, 2 * accum)
    with no_host_reads():
        trainer.train_step(batches[:accum])
        trainer.train_step(batches[accum:])  # the second step: optimizer state exists
    assert trainer.scheduler.last_epoch == 2


def test_lm_stream_step_reads_only_the_host_reset_mask():
    trainer = make_trainer("lm")
    trainer.carry = StateCarrier(stream=True, layout_key=lambda: "test")
    with no_host_reads() as allowed_reads:
        for batch in stream_batches(3):
            trainer.train_step([batch])
    assert {(f, fn) for f, fn, _, _ in allowed_reads} == {("distlstm/run/bptt.py", "pieces")}


def test_fp16_reads_only_the_grad_scalers_decision():
    """fp16's one documented sync per step: the GradScaler decides on the host whether the step ran."""
    trainer = make_trainer("classify", precision="fp16")
    fp16 = {**ALLOWED, ("distlstm/run/step.py", "optimize"): "the GradScaler's skip decision"}
    batches = loader_batches(trainer, 1)
    with no_host_reads(fp16) as allowed_reads:
        trainer.train_step(batches)
    assert ("distlstm/run/step.py", "optimize") in {(f, fn) for f, fn, _, _ in allowed_reads}


def test_the_detector_names_the_line_of_a_read():
    loss = torch.ones(())
    with no_host_reads(), pytest.raises(HostSync, match=r"tests/test_host_sync.py:\d+ \(test_the_detector_names_the_line_of_a_read\) .*Tensor.__float__"):
        float(loss)
    assert float(loss) == 1.0  # restored

"""GPU path (opt-in: skipped without CUDA; CI has none). Run on a CUDA machine with
`python -m pytest -q tests/test_gpu.py`.

A failure means the cuDNN LSTM breaks padding invariance, or bf16/fp16 autocast (with the
GradScaler for fp16) does not train on the GPU.
"""

import pytest
import torch

from distlstm.config import Config, ModelConfig, TrainConfig
from distlstm.models.lstm import build_model, loss_and_metrics
from distlstm.parallel import AmpPolicy
from distlstm.trainer import Trainer, build_optimizer
from distlstm.world import detect_world
from tests._step_worker import make_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class _Loader:
    epoch = 0


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_amp_trains_on_cuda(precision):
    device = torch.device("cuda")
    cfg = Config(model=ModelConfig(task="classify", input="tokens", hidden_size=64, embed_size=32),
                 train=TrainConfig(precision=precision))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=20, input_size=0, num_classes=3).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, 100, device)
    trainer = Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                      amp=AmpPolicy(precision, device), device=device, train_loader=_Loader())
    batches = make_batches("classify", 2)
    losses = []
    for _ in range(30):
        trainer.train_step(batches)
        with torch.no_grad(), trainer.amp.autocast():
            b = batches[0].to(device)
            loss, count, _ = loss_and_metrics("classify", model(b.inputs, b.lengths), b.targets, b.lengths)
        losses.append(float(loss / count))
    assert losses[-1] < losses[0] * 0.7, losses
    if precision == "fp16":
        assert trainer.amp.scaler.get_scale() > 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cudnn_padding_invariance(bidirectional):
    device = torch.device("cuda")
    cfg = ModelConfig(task="classify", input="tokens", hidden_size=32, embed_size=16, bidirectional=bidirectional)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=20, input_size=0, num_classes=3).to(device)
    x = torch.randint(1, 20, (1, 7), device=device)
    alone = model(x, torch.tensor([7], device=device))
    padded = torch.cat([x, torch.randint(1, 20, (1, 30), device=device)], 1)
    other = torch.randint(1, 20, (1, 37), device=device)
    batched = model(torch.cat([padded, other]), torch.tensor([7, 37], device=device))
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-4, atol=1e-5)

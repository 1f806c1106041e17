"""GPU path (opt-in: skipped without CUDA; CI has none). Run on a CUDA machine with
`python -m pytest -q tests/test_gpu.py` (bench/gpu_check.sh runs it, and the stream-mode GPU tests of
tests/test_stateful.py, with the GPU benchmarks).

A failure means the cuDNN LSTM breaks padding invariance, bf16/fp16 autocast (with the GradScaler
for fp16) does not train on the GPU, a step replayed from a CUDA graph updates the parameters
differently from the same step run eagerly (train.cuda_graphs), batches copied to the GPU one step
ahead differ from the host batches, or the data.max_tokens=auto probe disturbs the model or picks a
budget that does not fit.
"""

import pytest
import torch

from distlstm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from distlstm.data.batch import Batch
from distlstm.models.lstm import build_model, loss_and_metrics
from distlstm.distributed.parallel import AmpPolicy
from distlstm.run.trainer import Trainer, build_optimizer
from distlstm.distributed.world import detect_world
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


# ---------------------------------------------------------------------------------- CUDA graphs

def _ragged_lm_batches(steps: int, seed: int = 0) -> list[Batch]:
    """lm batches in three bounded shapes, ragged lengths inside each, some dummy rows (length 1,
    no target), as the bounded-shape loader makes them."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 24), (8, 48), (32, 12)]
    out = []
    for i in range(steps):
        rows, T = shapes[i % len(shapes)]
        real = rows - (i % 4)  # 0..3 dummy rows
        lengths = torch.ones(rows, dtype=torch.int64)
        lengths[:real] = torch.randint(2, T + 1, (real,), generator=g)
        x = torch.randint(1, 50, (rows, T + 1), generator=g) * (torch.arange(T + 1)[None] < lengths[:, None] + 1)
        inputs, targets = x[:, :-1].to(torch.int32).contiguous(), x[:, 1:].clone()
        targets[torch.arange(T)[None] >= lengths[:, None]] = -100
        targets[real:] = -100
        ids = torch.cat([torch.arange(real), torch.full((rows - real,), -1)])
        out.append(Batch(inputs, lengths, targets, ids, tokens=int(lengths[:real].sum()),
                         items=int((targets != -100).sum())))
    return out


def _lm_trainer(precision: str, accum: int, graphs: bool, optimizer: str = "adamw"):
    from distlstm.run.graphs import StepGraphs, use_training_stream
    device = torch.device("cuda")
    if graphs:
        use_training_stream(device)
    cfg = Config(model=ModelConfig(task="lm", input="tokens", hidden_size=64, embed_size=32, num_layers=2),
                 optim=OptimConfig(name=optimizer, lr=3e-3 if optimizer != "sgd" else 0.3, warmup_steps=5,
                                   **({"momentum": 0.9} if optimizer == "sgd" else {})),
                 train=TrainConfig(precision=precision, accum_steps=accum, cuda_graphs="on" if graphs else "off"))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=50, input_size=0, num_classes=0).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, 40, device)
    trainer = Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                      amp=AmpPolicy(precision, device), device=device, train_loader=_Loader())
    if graphs:
        trainer.graphs = StepGraphs(trainer, limit=16, log=lambda msg: None)
    return trainer


@pytest.mark.parametrize("precision,accum,optimizer", [("bf16", 1, "adamw"), ("bf16", 2, "adamw"),
                                                       ("fp32", 1, "adamw"), ("bf16", 1, "sgd")])
def test_graphed_steps_match_eager_steps(precision, accum, optimizer):
    """20 optimizer steps on ragged batches, eagerly and with train.cuda_graphs: the same parameters
    (within bf16 rounding), the same loss sum, and most steps really replayed."""
    batches = [b.to("cuda") for b in _ragged_lm_batches(20 * accum)]
    results = []
    try:
        for graphs in (False, True):
            trainer = _lm_trainer(precision, accum, graphs, optimizer)
            for step in range(20):
                trainer.train_step(batches[step * accum:(step + 1) * accum])
            torch.cuda.synchronize()
            results.append((trainer, [p.detach().float().clone() for p in trainer.model.parameters()]))
    finally:
        torch.cuda.set_stream(torch.cuda.default_stream())
    (eager, eager_params), (graphed, graphed_params) = results
    assert graphed.graphs.replays >= 20 - 3 - 1, graphed.graphs.summary()  # 3 shapes warm up eagerly
    assert len(graphed.graphs.graphs) == (3 if accum == 1 else 6)
    tol = dict(rtol=2e-2, atol=2e-3) if precision == "bf16" else dict(rtol=1e-4, atol=1e-5)
    for e, g in zip(eager_params, graphed_params):
        torch.testing.assert_close(g, e, **tol)
    torch.testing.assert_close(graphed.loss_sum, eager.loss_sum, rtol=1e-2 if precision == "bf16" else 1e-5, atol=0)
    assert int(graphed.skipped_dev) == int(eager.skipped_dev) == 0
    # The LR schedule advanced once per step on both paths.
    assert graphed.scheduler.last_epoch == eager.scheduler.last_epoch == 20


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_stream_steps_match_eager_steps(precision):
    """lm stream mode (issue 18 defect 7; on CPU: tests/test_graphs_fake.py): 12 steps of chunks with
    documents starting at random columns, the state carried in the graphs' static buffers; the same
    parameters and carried state as eager (cuDNN may pick other algorithms in a capture, and the graph
    runs the LSTM column by column: close, not bit-equal), most steps replayed."""
    from distlstm.run.bptt import StateCarrier
    from tests._graphs_worker import stream_batches
    device = torch.device("cuda")
    chunks = [b.to(device) for b in stream_batches(12, rows=8, columns=16)]
    results = []
    try:
        for graphs in (False, True):
            trainer = _lm_trainer(precision, 1, graphs)
            trainer.carry = StateCarrier(stream=True, layout_key=lambda: "test", device=device)
            for b in chunks:
                trainer.train_step([b])
            torch.cuda.synchronize()
            results.append(trainer)
    finally:
        torch.cuda.set_stream(torch.cuda.default_stream())
    eager, graphed = results
    assert graphed.graphs.replays >= 10, graphed.graphs.summary()
    tol = dict(rtol=2e-2, atol=2e-3) if precision == "bf16" else dict(rtol=1e-4, atol=1e-5)
    for e, g in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(g.detach().float(), e.detach().float(), **tol)
    for e, g in zip(eager.carry.state, graphed.carry.state):
        torch.testing.assert_close(g.float(), e.float(), **tol)


def test_graphed_step_skips_a_non_finite_update():
    """The non-finite guard is inside the graph: a replay whose gradient is not finite (an infinite
    loss scale) leaves the weights as they were and counts a bad step on the device."""
    from distlstm.run.graphs import _key
    batches = [b.to("cuda") for b in _ragged_lm_batches(3)]
    try:
        trainer = _lm_trainer("bf16", 1, True)
        for b in batches * 2:  # first pass eager (warm-up), second pass captures and replays
            trainer.train_step([b])
        assert len(trainer.graphs.graphs) == 3
        before = [p.detach().clone() for p in trainer.model.parameters()]
        static = trainer.graphs.graphs[_key(batches[0], final=True)]
        trainer.graphs._load(static, batches[0], float("inf"))
        static.graph.replay()
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_stream(torch.cuda.default_stream())
    for p, q in zip(trainer.model.parameters(), before):
        assert torch.equal(p.detach(), q)
    assert int(trainer.bad_run) == 1 and int(trainer.skipped_dev) == 1


def test_prefetched_batches_match_the_host_batches(tmp_path):
    """data on the GPU one step ahead: the same tensors, the host lengths kept for packing."""
    from tests import _loader_worker as lw
    data = lw.write_parquet(tmp_path / "pq", 300, rows_per_group=50, shards=2)
    host = list(lw.make_loader(data, tmp_path / "cache", max_epochs=1))
    loader = lw.make_loader(data, tmp_path / "cache", max_epochs=1)
    loader.device = torch.device("cuda")
    moved = list(loader)
    assert len(moved) == len(host)
    for h, d in zip(host, moved):
        assert d.inputs.is_cuda and d.targets.is_cuda and not d.cpu_lengths.is_cuda
        torch.testing.assert_close(d.inputs.cpu(), h.inputs)
        torch.testing.assert_close(d.targets.cpu(), h.targets)
        torch.testing.assert_close(d.cpu_lengths, h.lengths)


def test_auto_max_tokens_probe_fits_and_leaves_the_model_alone():
    from distlstm.run.autotune import AUTO_MAX_TOKENS, PROBE_MIN_TOKENS, probe_max_tokens
    device = torch.device("cuda")
    cfg = Config(data=DataConfig(max_tokens="auto", max_length=512),
                 model=ModelConfig(task="lm", input="tokens", hidden_size=256, embed_size=128, num_layers=2),
                 train=TrainConfig(precision="bf16"))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=1000, input_size=0, num_classes=0).to(device)
    weights = [p.detach().clone() for p in model.parameters()]
    rng = torch.cuda.get_rng_state()
    budget, note = probe_max_tokens(cfg, model=model, amp=AmpPolicy("bf16", device), device=device, graphs=True)
    assert PROBE_MIN_TOKENS <= budget <= AUTO_MAX_TOKENS and budget % 1024 == 0, note
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    assert all(p.grad is None for p in model.parameters())


def test_prefetch_copies_on_one_stream_per_device_every_epoch():
    """Issue 18 defect 9: the copy stream is taken once per device, not from the pool each epoch
    (where it could be the stream the graphed step runs on)."""
    from distlstm.data.loader.prefetch import copy_stream
    device = torch.device("cuda", torch.cuda.current_device())
    first = copy_stream(device)
    assert copy_stream(device) is first and copy_stream(torch.device("cuda")) is first
    assert first != torch.cuda.current_stream(device)

"""Truncated BPTT compares numbers: the carried LSTM state (lm stream mode) and `data.too_long=chunk`.

A failure here means the trainer's state carrying does not compute what one long forward pass
computes (the state is lost, doubled or misaligned between steps or pieces), the gradient of a chunk
is not the textbook truncated-BPTT gradient (the graph leaks across the chunk boundary, or the loss is
normalised per piece instead of per step), a document starts from the previous document's state, or
a long sample cut into pieces trains differently from the same sample in one piece.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distlstm.config import Config, DataConfig, ModelConfig, TrainConfig
from distlstm.data.batch import Batch
from distlstm.data.shards.index import open_index
from distlstm.data.plan.stream import StreamParams
from distlstm.data.loader.stream_loader import StreamLoader
from distlstm.models.lstm import build_model
from distlstm.distributed.parallel import AmpPolicy
from distlstm.run.bptt import StateCarrier
from distlstm.tasks import IGNORE_INDEX, get_task
from distlstm.run.trainer import Trainer, build_optimizer, evaluate_model
from distlstm.distributed.world import detect_world
from tests._stream_data import doc_starts, documents, write_stream_parquet

CPU = torch.device("cpu")


def _model(task: str = "lm", vocab: int = 40, classes: int = 0, layers: int = 2):
    torch.manual_seed(0)
    cfg = ModelConfig(task=task, input="tokens", hidden_size=12, embed_size=6, num_layers=layers)
    return build_model(cfg, vocab_size=vocab, input_size=0, num_classes=classes).double(), cfg


def _trainer(model, model_cfg, loader, accum: int = 1) -> Trainer:
    cfg = Config(model=model_cfg, train=TrainConfig(accum_steps=accum))
    optimizer, scheduler = build_optimizer(model, cfg.optim, 10, CPU)
    return Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                   amp=AmpPolicy("fp32", CPU), device=CPU, train_loader=loader)


def _stream(tmp_path, docs, *, batch_size: int = 3, bptt: int = 7) -> StreamLoader:
    write_stream_parquet(tmp_path / "d" / "s.parquet", docs, piece=11, rows_per_group=4)
    index = open_index(str(tmp_path / "d" / "s.parquet"), cache_dir=tmp_path / "cache")
    return StreamLoader(index, StreamParams(batch_size=batch_size, bptt=bptt), seed=0, dp_rank=0, dp_world_size=1,
                        max_epochs=1)


def _carried_outputs(model, loader) -> tuple[torch.Tensor, torch.Tensor, list[Batch]]:
    """Outputs of every batch through the carrier (the trainer's path), concatenated along time."""
    carry = StateCarrier.for_loader(loader)
    outs, batches = [], list(loader)
    with torch.no_grad():
        for b in batches:
            (piece,) = carry.pieces(b, b)
            outs.append(carry.forward(model, piece))
    return torch.cat(outs, 1), torch.cat([b.inputs for b in batches], 1), batches


def test_carried_state_equals_one_long_forward(tmp_path):
    docs = documents(1, min_len=202, max_len=202, vocab=40, seed=3)  # one document: no resets inside
    model, _ = _model()
    loader = _stream(tmp_path, docs)
    carried, inputs, batches = _carried_outputs(model, loader)
    assert len(batches) > 5 and inputs.shape[1] == 201 // 3
    with torch.no_grad():
        whole = model(inputs, torch.full((3,), inputs.shape[1]))
    torch.testing.assert_close(carried, whole, rtol=1e-12, atol=1e-12)
    # Not vacuous: starting every chunk from zero gives other outputs.
    with torch.no_grad():
        fresh = torch.cat([model(b.inputs, b.lengths) for b in batches], 1)
    assert (fresh - whole).abs().max() > 1e-3


def test_last_chunk_gradient_is_the_truncated_bptt_gradient(tmp_path):
    """Steps through `Trainer.forward_backward`: after the last chunk the gradient must equal the
    textbook one: state from a no-grad pass over everything before, loss of the last chunk only,
    divided by its token count."""
    docs = documents(1, min_len=120, max_len=120, vocab=40, seed=4)
    model, model_cfg = _model()
    loader = _stream(tmp_path, docs, bptt=9)
    trainer = _trainer(model, model_cfg, loader)
    batches = list(loader)
    for b in batches:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.forward_backward([b])
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    prefix = torch.cat([b.inputs for b in batches[:-1]], 1)
    last = batches[-1]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        _, state = model.lstm(model.embedding(prefix))
    out, _ = model.lstm(model.embedding(last.inputs), state)
    logits = model.head(out)
    real = last.targets != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(logits[real], last.targets[real], reduction="sum") / real.sum()
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)
        assert p.grad.norm() > 0, n


def test_a_document_never_sees_the_previous_ones_state(tmp_path):
    """Tokens are stream positions, so every document of every row can be found in the outputs: its
    carried outputs must equal the document run alone from a zero state."""
    docs = documents(30, min_len=4, max_len=30, seed=5)
    total = sum(len(d) for d in docs)
    model, _ = _model(vocab=total + 1)
    loader = _stream(tmp_path, docs, batch_size=2, bptt=6)
    carried, inputs, _ = _carried_outputs(model, loader)
    checked = 0
    for row in range(inputs.shape[0]):
        pos = inputs[row].tolist()
        for start, doc in zip(doc_starts(docs).tolist(), docs):
            if start not in pos or pos.index(start) == 0:
                continue  # the row starts mid-document or at this document: nothing carried in
            c = pos.index(start)
            n = min(len(doc), len(pos) - c)
            with torch.no_grad():
                alone = model(torch.as_tensor(doc[:n])[None], torch.tensor([n]))
            torch.testing.assert_close(carried[row, c:c + n], alone[0], rtol=1e-12, atol=1e-12)
            checked += 1
    assert checked > 10


def test_resets_inside_a_chunk_zero_only_the_rows_that_start_a_document():
    model, _ = _model()
    x = torch.randint(1, 40, (3, 20))
    with torch.no_grad():
        whole, _ = model.lstm(model.embedding(x))
        rows = torch.tensor([True, False, True])
        got, state = model.encode_carried(x, None, [(8, rows), (13, torch.tensor([False, True, False]))])
        after_8, _ = model.lstm(model.embedding(x[:, 8:]))
        after_13, _ = model.lstm(model.embedding(x[1:2, 13:]))
    torch.testing.assert_close(got[:, :8], whole[:, :8])
    torch.testing.assert_close(got[0, 8:], after_8[0])
    torch.testing.assert_close(got[2, 8:], after_8[2])
    torch.testing.assert_close(got[1, :13], whole[1, :13])
    torch.testing.assert_close(got[1, 13:], after_13[0])
    torch.testing.assert_close(state[0][-1], got[:, -1])


def test_stream_evaluation_carries_state_over_the_whole_split(tmp_path):
    docs = documents(1, min_len=150, max_len=150, vocab=40, seed=6)
    model, _ = _model()
    loader = _stream(tmp_path, docs, bptt=8)
    values = evaluate_model(model, loader, amp=AmpPolicy("fp32", CPU), device=CPU)
    carried, inputs, batches = _carried_outputs(model, loader)
    targets = torch.cat([b.targets for b in batches], 1)
    real = targets != IGNORE_INDEX
    want = torch.nn.functional.cross_entropy(carried[real], targets[real], reduction="sum") / real.sum()
    assert values["items"] == int(real.sum()) == 149
    assert values["loss"] == pytest.approx(float(want), rel=1e-10)


# ---------------------------------------------------------------------------- data.too_long = chunk


def _long_batch(task: str, lengths: list[int], vocab: int = 40, classes: int = 4) -> Batch:
    g = torch.Generator().manual_seed(7)
    T = max(lengths)
    lens = torch.tensor(lengths)
    mask = torch.arange(T)[None] < lens[:, None]
    x = torch.randint(1, vocab, (len(lengths), T), generator=g) * mask
    if task == "tag":
        y = torch.where(mask, torch.randint(0, classes, x.shape, generator=g), torch.full_like(x, IGNORE_INDEX))
    else:  # lm windows: inputs and targets shifted by one, as the loader builds them
        y = torch.where(torch.arange(T)[None] < lens[:, None] - 1, x.roll(-1, 1), torch.full_like(x, IGNORE_INDEX))
        lens = lens - 1
    return Batch(x, lens, y, torch.arange(len(lengths)))


@pytest.mark.parametrize("task", ["tag", "lm"])
def test_too_long_chunk_equals_the_unchunked_forward_and_truncated_gradient(task):
    model, model_cfg = _model(task, classes=4)
    batch = _long_batch(task, [50, 13, 37, 2])
    carry = StateCarrier(piece_length=16)
    pieces = list(carry.pieces(batch, batch))
    assert len(pieces) == 4 and [p.last for p in pieces] == [False, False, False, True]
    spec = get_task(task)
    with torch.no_grad():
        outs = [carry.forward(model, p) for p in pieces]
        whole = model(batch.inputs, batch.lengths)
        chunked_loss = sum(spec.loss_and_metrics(o, p.targets, p.lengths)[0] for o, p in zip(outs, pieces))
        whole_loss = spec.loss_and_metrics(whole, batch.targets, batch.lengths)[0]
    real = (torch.arange(batch.inputs.shape[1])[None] < batch.lengths[:, None])
    torch.testing.assert_close(torch.cat(outs, 1)[real], whole[real], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked_loss, whole_loss, rtol=1e-12, atol=1e-12)

    # The trainer's gradient: the sum over pieces of each piece's loss, the state detached at every
    # piece boundary, divided by the batch's item count (exact normalisation over the whole batch).
    trainer = _trainer(model, model_cfg, None)
    trainer.carry = StateCarrier(piece_length=16)
    trainer.forward_backward([batch])
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    items = float(spec.item_count(batch))
    state, total = None, 0.0
    for a in range(0, 50, 16):
        out, state = model.lstm(model.embedding(batch.inputs[:, a:a + 16]), state)
        lens = (batch.lengths - a).clamp(0, 16)
        loss = spec.loss_and_metrics(model.head(out), batch.targets[:, a:a + 16], lens)[0] / items
        loss.backward()
        total += float(loss.detach())
        state = (state[0].detach(), state[1].detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)
    assert total == pytest.approx(float(whole_loss) / items, rel=1e-10)


def test_too_long_chunk_keeps_long_samples_whole_in_the_loader(tmp_path):
    from distlstm.data.loader.batch_loader import build_loader
    lengths = [5, 300, 40, 170, 9, 260]
    write_stream_parquet(tmp_path / "d" / "x.parquet", [np.arange(1, n + 1) % 30 + 1 for n in lengths],
                         piece=1000, with_flags=False)
    index = open_index(str(tmp_path / "d" / "x.parquet"), cache_dir=tmp_path / "cache")
    index.label_column = None  # lm: no labels (the tokens are the targets)
    cfg = DataConfig(max_length=64, too_long="chunk", max_tokens=256, min_batch_size=1, num_workers=0)
    loader = build_loader(index, cfg, task="lm", dp_rank=0, dp_world_size=1, vocab_size=32, num_classes=0,
                          pin_memory=False, run_dir=None, max_epochs=1)
    seen = {}
    for b in loader:
        for sid, n in zip(b.sample_ids.tolist(), b.lengths.tolist()):
            seen[sid] = n
    assert seen == {i: n - 1 for i, n in enumerate(lengths)}, "lm windows: n tokens give n - 1 steps, none cut"
    with pytest.raises(Exception, match="data.too_long=chunk needs a per-step task"):
        from distlstm.run.bptt import check_config
        check_config(Config(model=ModelConfig(task="classify"), data=DataConfig(too_long="chunk")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stream_mode_on_cuda_matches_cpu_and_trains(tmp_path, precision):
    """cuDNN with a carried state and reset columns: fp32 outputs equal the CPU's; under bf16 autocast
    the carried state keeps working across steps and the loss falls."""
    docs = documents(20, min_len=20, max_len=80, vocab=40, seed=8)
    model, model_cfg = _model()
    model = model.float()
    loader = _stream(tmp_path, docs, batch_size=4, bptt=10)
    cuda = torch.device("cuda")
    if precision == "fp32":
        cpu_out, _, _ = _carried_outputs(model, loader)
        carry, outs = StateCarrier.for_loader(loader, cuda), []
        gpu_model = model.to(cuda)
        with torch.no_grad():
            for b in loader:
                (piece,) = carry.pieces(b.to(cuda), b)
                outs.append(carry.forward(gpu_model, piece))
        torch.testing.assert_close(torch.cat(outs, 1).cpu(), cpu_out, rtol=1e-4, atol=1e-4)
        return
    model = model.to(cuda)
    cfg = Config(model=model_cfg, train=TrainConfig(precision="bf16"))
    optimizer, scheduler = build_optimizer(model, cfg.optim, 200, cuda)
    trainer = Trainer(cfg, detect_world({}), model=model, optimizer=optimizer, scheduler=scheduler,
                      amp=AmpPolicy("bf16", cuda), device=cuda, train_loader=loader)
    first = evaluate_model(model, loader, amp=trainer.amp, device=cuda)["loss"]
    for _ in range(3):
        loader.rewind()  # one epoch per pass (the loader has max_epochs=1)
        for b in loader:
            trainer.train_step([b])
    assert trainer.carry.state is not None and trainer.carry.state[0].is_cuda
    assert evaluate_model(model, loader, amp=trainer.amp, device=cuda)["loss"] < first - 0.2


def test_the_carried_forward_applies_every_layer_the_plain_forward_does():
    """Training mode, every dropout on, the same RNG draws: one chunk through the carried path from a
    zero state equals the plain forward (a layer the carried path forgot would change the outputs)."""
    torch.manual_seed(0)
    cfg = ModelConfig(task="lm", input="tokens", hidden_size=12, embed_size=6, num_layers=2, dropout=0.3,
                      embed_dropout=0.3)
    model = build_model(cfg, vocab_size=40, input_size=0, num_classes=0).train()
    x = torch.randint(0, 40, (3, 9))
    torch.manual_seed(5)
    plain = model(x, torch.full((3,), 9))
    torch.manual_seed(5)
    carried, _ = model(x, torch.full((3,), 9), state=None, resets=(), with_state=True)
    torch.testing.assert_close(carried, plain, rtol=0, atol=0)
    torch.manual_seed(6)
    assert not torch.equal(model(x, torch.full((3,), 9)), plain), "dropout should make the draws matter"


@pytest.mark.parametrize("nproc", [1, 2])
def test_too_long_chunk_trains_whole_samples_through_the_cli(tmp_path, nproc):
    """`--data.too_long chunk` end to end (tag, raw Parquet): one epoch trains every step of every
    sample, the long ones included (with truncate it would be the first max_length steps of each).
    Under torchrun too: the pieces before a sample's last skip DDP's all-reduce (no_sync), with
    DDP's static_graph on (train.ddp_static_graph=auto at accum_steps 1)."""
    import json
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 200, size=40)
    tokens = [rng.integers(1, 30, size=n).tolist() for n in lengths]
    tags = [[t % 3 for t in seq] for seq in tokens]
    pq.write_table(pa.table({"tokens": pa.array(tokens, pa.list_(pa.int32())),
                             "tags": pa.array(tags, pa.list_(pa.int32()))}), tmp_path / "tag.parquet", row_group_size=10)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "DISTLSTM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    proc = subprocess.run(launcher + ["-m", "distlstm.train", "--data.train", str(tmp_path / "tag.parquet"),
                           "--model.task", "tag", "--data.label_column", "tags", "--model.num_classes", "3",
                           "--model.hidden_size", "16",
                           "--model.embed_size", "8", "--data.max_length", "32", "--data.too_long", "chunk",
                           "--data.max_tokens", "256", "--data.num_workers", "0", "--train.max_steps", "0",
                           "--train.max_epochs", "1", "--train.eval_every", "0", "--log.progress", "false",
                           "--log.tensorboard", "false", "--train.run_dir", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((run_dir / "final.json").read_text())["tokens"] == int(lengths.sum()) > 40 * 32

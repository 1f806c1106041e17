"""Model and loss tests (distlstm/models/lstm.py), all on CPU in one process.

A failure here means the model's numbers depend on how samples were batched: padding leaking into
outputs, loss or gradients (so bucketing or world size would change training), a classifier
reading the padding instead of the true last step, a tied LM head that is not really tied, a
loss that is not float32 under autocast, or config errors that do not tell the user which key to fix.
"""

from __future__ import annotations

import types

import pytest
import torch

from distlstm.models import (
    SequenceModel,
    build_model,
    flops_per_token,
    loss_and_metrics,
    num_parameters,
)

VOCAB, FEATURES, CLASSES = 11, 3, 4


def model_config(**overrides) -> types.SimpleNamespace:
    """Stand-in for distlstm.config.ModelConfig with the fields build_model reads."""
    fields = dict(
        task="classify",
        input="tokens",
        embed_size=6,
        hidden_size=8,
        num_layers=2,
        dropout=0.0,
        bidirectional=False,
        proj_size=0,
        tie_weights=False,
        num_targets=1,
    )
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def make_model(**overrides) -> SequenceModel:
    torch.manual_seed(0)
    model = build_model(
        model_config(**overrides), vocab_size=VOCAB, input_size=FEATURES, num_classes=CLASSES
    )
    return model.double()


def make_sample(cfg, length: int, generator: torch.Generator):
    """One sample (unbatched inputs of `length` steps) and its targets for cfg.task."""
    if cfg.input == "tokens":
        inputs = torch.randint(0, VOCAB, (length,), generator=generator)
    else:
        inputs = torch.randn(length, FEATURES, generator=generator, dtype=torch.float64)
    if cfg.task == "classify":
        targets = torch.randint(0, CLASSES, (), generator=generator)
    elif cfg.task == "regress":
        shape = () if cfg.num_targets == 1 else (cfg.num_targets,)
        targets = torch.randn(shape, generator=generator, dtype=torch.float64)
    elif cfg.task == "tag":
        targets = torch.randint(0, CLASSES, (length,), generator=generator)
    else:
        targets = torch.randint(0, VOCAB, (length,), generator=generator)
    return inputs, targets


def collate(samples, generator: torch.Generator):
    """Right-pad to the longest sample. Padding holds random junk, not zeros: the model must rely
    on lengths alone."""
    lengths = torch.tensor([len(x) for x, _ in samples], dtype=torch.int64)
    longest = int(lengths.max())
    inputs, targets = [], []
    for x, y in samples:
        pad = longest - len(x)
        if x.dtype == torch.int64:
            junk = torch.randint(0, VOCAB, (pad,), generator=generator)
        else:
            junk = torch.randn(pad, *x.shape[1:], generator=generator, dtype=x.dtype)
        inputs.append(torch.cat([x, junk]))
        if y.dim() == 1 and y.dtype == torch.int64:  # per-step targets: -100 beyond the length
            y = torch.cat([y, torch.full((pad,), -100)])
        targets.append(y)
    return torch.stack(inputs), lengths, torch.stack(targets)


def loss_and_grads(model, inputs, lengths, targets, keep: slice = slice(None)):
    """Summed loss over the samples selected by `keep` and the parameter gradients of that loss."""
    model.zero_grad(set_to_none=True)
    outputs = model(inputs, lengths)
    loss, count, metrics = loss_and_metrics(
        model.task, outputs[keep], targets[keep], lengths[keep]
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), count, grads


CASES = [
    dict(task="classify"),
    dict(task="classify", bidirectional=True),
    dict(task="regress"),
    dict(task="regress", bidirectional=True, num_targets=2, input="features"),
    dict(task="tag"),
    dict(task="tag", bidirectional=True),
    dict(task="lm"),
    dict(task="lm", tie_weights=True, hidden_size=8, proj_size=6),
    dict(task="classify", input="features", proj_size=5),
    dict(task="tag", input="features", bidirectional=True, proj_size=5),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_padding_never_changes_loss_or_gradients(overrides):
    cfg = model_config(**overrides)
    model = make_model(**overrides).eval()
    gen = torch.Generator().manual_seed(1)
    short = make_sample(cfg, 3, gen)
    others = [make_sample(cfg, n, gen) for n in (7, 5)]

    alone = collate([short], gen)
    batched = collate([short, *others], gen)
    loss_alone, count_alone, grads_alone = loss_and_grads(model, *alone)
    loss_batched, count_batched, grads_batched = loss_and_grads(model, *batched, keep=slice(0, 1))

    torch.testing.assert_close(loss_batched, loss_alone, rtol=1e-10, atol=1e-12)
    assert count_batched == count_alone
    assert grads_batched.keys() == grads_alone.keys()
    for name in grads_alone:
        torch.testing.assert_close(grads_batched[name], grads_alone[name], rtol=1e-9, atol=1e-12)

    # And the whole batch's summed loss is the sum of each sample's loss alone.
    total, total_count, _ = loss_and_grads(model, *batched)
    singles = [loss_and_grads(model, *collate([s], gen)) for s in [short, *others]]
    torch.testing.assert_close(total, sum(s[0] for s in singles), rtol=1e-10, atol=1e-12)
    assert total_count == sum(s[1] for s in singles)


def test_classifier_reads_true_last_step_not_padding():
    model = make_model(task="classify").eval()
    lengths = torch.tensor([4, 6])
    inputs = torch.randint(0, VOCAB, (2, 6))
    before = model(inputs, lengths)
    changed = inputs.clone()
    changed[0, 4:] = (changed[0, 4:] + 1) % VOCAB  # only sample 0's padding
    after = model(changed, lengths)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # Changing a real step does change the output (the test above is not vacuous).
    changed[0, 3] = (changed[0, 3] + 1) % VOCAB
    assert not torch.allclose(model(changed, lengths)[0], before[0])


def test_output_shapes_per_task():
    lengths = torch.tensor([2, 5, 3])
    for task, shape in [("classify", (3, CLASSES)), ("regress", (3,)), ("tag", (3, 5, CLASSES)),
                        ("lm", (3, 5, VOCAB))]:
        for bidirectional in (False, True) if task != "lm" else (False,):
            model = make_model(task=task, bidirectional=bidirectional)
            assert model(torch.randint(0, VOCAB, (3, 5)), lengths).shape == shape
    regress2 = make_model(task="regress", num_targets=2)
    assert regress2(torch.randint(0, VOCAB, (3, 5)), lengths).shape == (3, 2)


def test_lm_weight_tying_shares_the_parameter():
    model = make_model(task="lm", tie_weights=True, embed_size=8, hidden_size=8)
    assert model.head.weight is model.embedding.weight
    untied = make_model(task="lm", tie_weights=False, embed_size=8, hidden_size=8)
    assert num_parameters(untied) - num_parameters(model) == VOCAB * 8
    # A gradient step through the head moves the embedding (one tensor, not a copy).
    inputs, lengths = torch.randint(0, VOCAB, (2, 4)), torch.tensor([4, 2])
    targets = torch.randint(0, VOCAB, (2, 4))
    loss, _, _ = loss_and_metrics("lm", model(inputs, lengths), targets, lengths)
    loss.backward()
    assert model.embedding.weight.grad is not None


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (dict(proj_size=8, hidden_size=8), ["model.proj_size=8", "model.hidden_size=8"]),
        (dict(task="lm", tie_weights=True, embed_size=6, hidden_size=8),
         ["model.tie_weights", "model.embed_size=6", "model.hidden_size=8"]),
        (dict(task="lm", tie_weights=True, embed_size=6, hidden_size=8, proj_size=4),
         ["model.tie_weights", "model.embed_size=6", "model.proj_size=4"]),
        (dict(task="lm", bidirectional=True), ["model.bidirectional", "model.task='lm'"]),
        (dict(task="lm", input="features"), ["model.input='features'"]),
        (dict(task="classify", tie_weights=True), ["model.tie_weights", "model.task='classify'"]),
        (dict(task="segment"), ["model.task='segment'"]),
        (dict(input="audio"), ["model.input='audio'"]),
        (dict(num_layers=0), ["model.num_layers=0"]),
        (dict(dropout=1.0), ["model.dropout=1.0"]),
        (dict(task="regress", num_targets=0), ["model.num_targets=0"]),
    ],
)
def test_bad_config_errors_name_the_key(overrides, keys):
    with pytest.raises(ValueError) as err:
        make_model(**overrides)
    for key in keys:
        assert key in str(err.value)


def test_features_input_and_proj_size():
    model = make_model(task="tag", input="features", proj_size=5, bidirectional=True)
    assert model.lstm.proj_size == 5 and model.embedding is None
    assert model.head.in_features == 10
    inputs = torch.randn(2, 6, FEATURES, dtype=torch.float64)
    out = model(inputs, torch.tensor([6, 1]))
    assert out.shape == (2, 6, CLASSES)


def test_loss_masks_by_length_and_counts_items():
    outputs = torch.randn(2, 4, CLASSES)
    lengths = torch.tensor([4, 2])
    # Junk (not -100) targets in sample 1's padding must be ignored: masking is by length too.
    targets = torch.tensor([[0, 1, -100, 3], [1, 2, 3, 3]])
    loss, count, metrics = loss_and_metrics("tag", outputs, targets, lengths)
    assert count.dtype == torch.float32 and count.item() == 5
    real = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    expected = torch.nn.functional.cross_entropy(outputs[real], targets[real], reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert metrics["correct"] == (outputs[real].argmax(-1) == targets[real]).sum()

    reg_out, reg_tgt = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    loss, count, metrics = loss_and_metrics("regress", reg_out, reg_tgt, lengths)
    assert loss.item() == 5.0 and count.item() == 2 and metrics["sq_err"].item() == 5.0


def test_bf16_autocast_forward_backward_loss_is_float32():
    for task in ("classify", "lm"):
        torch.manual_seed(0)
        model = build_model(
            model_config(task=task, bidirectional=task == "classify"),
            vocab_size=VOCAB, input_size=FEATURES, num_classes=CLASSES,
        )
        inputs, lengths = torch.randint(0, VOCAB, (3, 5)), torch.tensor([5, 2, 3])
        targets = torch.randint(0, CLASSES, (3,)) if task == "classify" else torch.randint(0, VOCAB, (3, 5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(inputs, lengths)
            loss, count, _ = loss_and_metrics(task, outputs, targets, lengths)
        if task == "lm":  # the unpacked path really runs in bf16, so the upcast is exercised
            assert outputs.dtype == torch.bfloat16
        assert loss.dtype == torch.float32 and count.dtype == torch.float32
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_truncated_bptt_state_carry_matches_one_pass():
    model = make_model(task="lm", proj_size=4).eval()
    inputs = torch.randint(0, VOCAB, (2, 8))
    lengths = torch.tensor([8, 8])
    whole = model(inputs, lengths)
    first, state = model.forward_with_state(inputs[:, :5], torch.tensor([5, 5]))
    second, _ = model.forward_with_state(inputs[:, 5:], torch.tensor([3, 3]), state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    # A short final chunk: the state is taken at the true end, not after the padding.
    _, state_short = model.forward_with_state(torch.cat([inputs[:1, :5], inputs[1:, :5]]),
                                              torch.tensor([5, 3]))
    _, state_alone = model.forward_with_state(inputs[1:, :3], torch.tensor([3]))
    torch.testing.assert_close(state_short[0][:, 1], state_alone[0][:, 0])


def test_flops_per_token_matches_the_lstm_formula():
    model = make_model(task="classify", embed_size=6, hidden_size=8, num_layers=2)
    layer0 = 2 * 4 * 8 * (6 + 8)
    layer1 = 2 * 4 * 8 * (8 + 8)
    assert flops_per_token(model) == 3 * (layer0 + layer1)
    bi = make_model(task="tag", embed_size=6, hidden_size=8, num_layers=1, bidirectional=True, proj_size=4)
    per_dir = 2 * 4 * 8 * (6 + 4) + 2 * 8 * 4
    assert flops_per_token(bi) == 3 * (2 * per_dir + 2 * 8 * CLASSES)


def test_forget_gate_bias_is_one():
    model = make_model(hidden_size=8)
    total = model.lstm.bias_ih_l0 + model.lstm.bias_hh_l0
    torch.testing.assert_close(total[8:16], torch.ones(8, dtype=total.dtype))


def test_host_lengths_reach_packing_as_an_object_ddp_does_not_move(monkeypatch):
    """Issue 18 defect 3: DDP with device_ids moves tensor arguments (keywords too) to the GPU and
    pack_padded_sequence refuses CUDA lengths, so a bidirectional model died at step 1. The step
    passes the host lengths as a HostLengths object: no tensor keyword reaches the model, DDP's
    own argument mover leaves it alone, and packing gets the host tensor unchanged."""
    from torch.distributed.utils import _recursive_to  # what DDP applies to forward's arguments

    from distlstm.data.batch import Batch
    from distlstm.models.lstm import HostLengths
    from distlstm.run.bptt import StateCarrier

    torch.manual_seed(0)
    model = build_model(model_config(bidirectional=True, num_layers=1), vocab_size=VOCAB, input_size=FEATURES,
                        num_classes=CLASSES)
    lengths = torch.tensor([5, 2, 4])
    batch = Batch(inputs=torch.randint(0, VOCAB, (3, 5)), lengths=lengths, targets=torch.tensor([0, 1, 2]),
                  sample_ids=torch.arange(3))
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    packed_lengths = []
    real_pack = torch.nn.utils.rnn.pack_padded_sequence
    monkeypatch.setattr("distlstm.models.lstm.pack_padded_sequence",
                        lambda x, host, **kw: packed_lengths.append(host) or real_pack(x, host, **kw))
    carrier = StateCarrier()
    moved = batch.to(torch.device("cpu"))
    (piece,) = carrier.pieces(moved, batch)
    out = carrier.forward(model, piece)
    (kwargs,) = seen
    assert not [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)], kwargs
    assert isinstance(kwargs["lengths_cpu"], HostLengths)
    assert _recursive_to(kwargs, torch.device("meta"), False)[0]["lengths_cpu"] is kwargs["lengths_cpu"]
    # Packing gets the host lengths, sorted on the host (encode sorts them itself: no sync).
    (packed,) = packed_lengths
    assert packed.device.type == "cpu" and packed.tolist() == sorted(piece.lengths_cpu.tolist(), reverse=True)
    torch.testing.assert_close(out, model(batch.inputs, lengths))

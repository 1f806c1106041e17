"""train.precision=bf16 runs the LSTM in bf16, with fp32 master weights (issue 18, defect 1).

A failure means the LSTM is called under autocast, whose cuDNN RNN path casts it to fp16 on a GPU
whatever the autocast dtype (fp16 with no loss scale: small gradients underflow); or that the bf16
LSTM's gradients are not fp32 master gradients close to fp32 training. The CPU shows what reaches
the LSTM (dtypes, autocast state, the dtypes of every op of the step); which cuDNN kernels run is a
GPU question (bench/gpu_check.sh).
"""

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from distlstm.distributed.parallel import AmpPolicy
from tests._step_worker import make_batches
from tests.test_trainer_step import make_trainer


class _DtypesSeen(TorchDispatchMode):
    """Every aten op the step runs (below autocast: what the kernels get), with the dtypes of its
    input tensors and of its outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, set, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dtypes = [{t.dtype for t in tree_leaves(x) if isinstance(t, torch.Tensor)} for x in ((args, kwargs), out)]
        self.ops.append((str(func), *dtypes))
        return out


def _lstm_calls(trainer) -> list[dict]:
    """What each call of the model's nn.LSTM receives."""
    calls = []

    def seen(module, args):
        x = args[0].data if hasattr(args[0], "batch_sizes") else args[0]
        calls.append({"input": x.dtype, "weights": {p.dtype for p in module.parameters()},
                      "autocast": torch.is_autocast_enabled(x.device.type)})
    trainer.model.lstm.register_forward_pre_hook(seen)
    return calls


def test_bf16_lstm_gets_bf16_input_and_weights_outside_autocast():
    trainer = make_trainer("bf16")
    calls = _lstm_calls(trainer)
    trainer.train_step(make_batches("classify", 1))
    assert calls == [{"input": torch.bfloat16, "weights": {torch.bfloat16}, "autocast": False}]


def test_bidirectional_bf16_packed_lstm_is_bf16():
    """The packing path (bidirectional models) too."""
    from distlstm.models.lstm import SequenceModel
    model = SequenceModel(task="classify", input="tokens", hidden_size=16, embed_size=8, vocab_size=20,
                          num_classes=3, bidirectional=True)
    batch = make_batches("classify", 1)[0]
    calls = []
    model.lstm.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].data.dtype, {p.dtype for p in m.parameters()})))
    with AmpPolicy("bf16", torch.device("cpu")).autocast():
        out = model(batch.inputs, batch.lengths, lengths_cpu=batch.lengths)
    out.float().sum().backward()
    assert calls == [(torch.bfloat16, {torch.bfloat16})]
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}


def test_bf16_step_is_bf16_with_fp32_master_gradients_close_to_fp32():
    """One forward/backward in bf16 and in fp32 from the same weights on the same batch: no fp16
    anywhere, the LSTM op in bf16, and the fp32 gradients of the master weights point where fp32's do."""
    batches = make_batches("classify", 1)
    grads = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(precision)  # seeded: the same initial weights
        seen = _DtypesSeen()
        with seen:
            trainer.forward_backward(batches)
        grads[precision] = {n: p.grad for n, p in trainer.model.named_parameters()}
        if precision == "bf16":
            assert not any(torch.float16 in i | o for _, i, o in seen.ops), "an fp16 tensor in a bf16 step"
            # The LSTM kernels, forward and backward, get bf16 (and a uint8 workspace); oneDNN's
            # backward returns the weight gradients in fp32. A CPU without bf16 instructions (no
            # AVX-512 BF16: oneDNN has no bf16 RNN there) runs torch's own recurrence instead, step
            # by step: then its gates (sigmoid, tanh, forward and backward) must be bf16.
            lstm_ops = [(op, i) for op, i, _ in seen.ops if "rnn" in op or "lstm" in op]
            if not lstm_ops:
                lstm_ops = [(op, i) for op, i, _ in seen.ops if "sigmoid" in op or "tanh" in op]
            assert lstm_ops and all(i - {torch.uint8} == {torch.bfloat16} for _, i in lstm_ops), lstm_ops
    for name, g in grads["bf16"].items():
        assert g.dtype == torch.float32, name
    flat = {p: torch.cat([g.flatten() for g in grads[p].values()]) for p in grads}
    cosine = torch.nn.functional.cosine_similarity(flat["bf16"], flat["fp32"], dim=0)
    assert cosine >= 0.999, float(cosine)
    for name in grads["bf16"]:
        if name.startswith("lstm.weight"):
            c = torch.nn.functional.cosine_similarity(grads["bf16"][name].flatten(), grads["fp32"][name].flatten(), dim=0)
            assert c >= 0.999, (name, float(c))


def test_startup_line_says_what_the_lstm_runs_in():
    cpu = torch.device("cpu")
    assert AmpPolicy("bf16", cpu).describe().startswith("bf16: the LSTM runs in bf16 (outside autocast")
    assert "the LSTM runs in fp32" in AmpPolicy("fp16", cpu).describe()
    assert AmpPolicy("fp32", cpu).describe() == "fp32 (no autocast)"


def test_a_bf16_run_logs_what_the_lstm_runs_in(tmp_path):
    """The startup log of `python -m distlstm.train --train.precision bf16` says it (real CLI)."""
    from tests.test_train import SMALL, train
    _, stdout = train(tmp_path, "bf16", *SMALL, "--train.precision", "bf16", "--train.max_steps", "2")
    assert "precision: bf16: the LSTM runs in bf16 (outside autocast" in stdout, stdout[-2000:]

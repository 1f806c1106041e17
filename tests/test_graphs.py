"""train.cuda_graphs and the other "auto" settings, as decided before any GPU work (runs on CPU;
the captures themselves are tested in test_gpu.py).

A failure means `auto` would try CUDA graphs where they cannot work (CPU, fp16 with the GradScaler,
packed bidirectional batches, anomaly detection) or leave them off where they should be on, `on`
would fail late or silently instead of naming the setting at fault, or "auto" would change the CPU
default run (its budget and batch shapes).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distlstm.run.autotune import GRAPH_SHAPE_BUCKETS, resolve_auto
from distlstm.config import CPU_MAX_TOKENS, ConfigError, load_config
from distlstm.run.graphs import graphs_decision
from distlstm.models.lstm import build_model
from distlstm.distributed.parallel import AmpPolicy

CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU


@pytest.mark.parametrize("args, on", [
    ([], True),
    (["--train.precision", "bf16"], True),
    (["--train.precision", "fp16"], False),
    (["--model.bidirectional"], False),
    (["--train.debug"], False),
    (["--data.shape_buckets", "0"], False),
    (["--data.shape_buckets", "32"], True),
    (["--train.cuda_graphs", "off"], False),
])
def test_auto_on_cuda(args, on):
    assert graphs_decision(load_config(None, args), CUDA)[0] is on


@pytest.mark.parametrize("args, needle", [
    (["--train.precision", "fp16"], "does not support train.precision=fp16"),
    (["--model.bidirectional"], "does not support model.bidirectional=true"),
    (["--train.debug"], "does not work with train.debug"),
])
def test_on_refuses_what_cannot_be_captured(args, needle):
    cfg = load_config(None, ["--train.cuda_graphs", "on", *args])
    with pytest.raises(ConfigError, match=needle) as err:
        graphs_decision(cfg, CUDA)
    assert "--train.cuda_graphs auto|off" in str(err.value)


def test_gloo_on_several_ranks_is_never_graphed():
    """Issue 18 defect 4: gloo's all-reduce runs on the host and cannot be captured; auto must not
    turn graphs on for it (it did, and the first capture died), `on` must refuse naming the backend."""
    auto = load_config(None, ["--train.backend", "gloo", "--data.shape_buckets", "32"])
    assert graphs_decision(auto, CUDA, world_size=1)[0] is True   # one rank: no collective in the step
    on, why = graphs_decision(auto, CUDA, world_size=2)
    assert on is False and "train.backend=gloo" in why
    assert graphs_decision(load_config(None, ["--data.shape_buckets", "32"]), CUDA, world_size=8)[0] is True
    with pytest.raises(ConfigError, match="train.backend=gloo"):
        graphs_decision(load_config(None, ["--train.cuda_graphs", "on", "--train.backend", "gloo"]), CUDA,
                        world_size=2)


def test_on_with_exact_shapes_is_allowed_and_said():
    on, why = graphs_decision(load_config(None, ["--train.cuda_graphs", "on", "--data.shape_buckets", "0"]), CUDA)
    assert on and "only repeated shapes" in why


def test_cpu_auto_keeps_the_default_run():
    cfg = load_config(None, ["--data.max_tokens", "auto", "--model.input", "tokens"])
    assert graphs_decision(cfg, torch.device("cpu")) == (False, "needs a CUDA device (the device is cpu)")
    model = build_model(cfg.model, vocab_size=30, input_size=0, num_classes=4)
    lines = []
    resolved = resolve_auto(cfg, device=torch.device("cpu"), model=model, amp=AmpPolicy("fp32", torch.device("cpu")),
                            log=lines.append)
    assert (resolved.data.max_tokens, resolved.data.shape_buckets, resolved.train.cuda_graphs) == \
        (CPU_MAX_TOKENS, 0, "off")
    assert lines == [f"data.max_tokens=auto: {CPU_MAX_TOKENS} (no GPU)"]
    explicit = load_config(None, ["--data.shape_buckets", "12"])
    assert resolve_auto(explicit, device=torch.device("cpu"), model=model,
                        amp=AmpPolicy("fp32", torch.device("cpu")), log=lines.append).data.shape_buckets == 12


def test_auto_shape_buckets_follow_the_graphs_decision():
    cfg = load_config(None, [])
    assert cfg.data.shape_buckets == "auto" and cfg.train.cuda_graphs == "auto"
    assert graphs_decision(cfg, CUDA)[0] and GRAPH_SHAPE_BUCKETS == 64  # docs/design.md states 64


def test_cli_on_without_cuda_exits_with_the_setting(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "distlstm.train", "--train.cuda_graphs", "on",
                           "--data.synthetic_samples", "200", "--data.cache_dir", str(tmp_path / "cache"),
                           "--train.run_dir", str(tmp_path / "run"), "--log.tensorboard", "false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.cuda_graphs=on needs a CUDA device (the device is cpu)" in proc.stderr


def test_lm_stream_mode_graphs_are_opt_in_and_chunked_batches_refused():
    """Issue 18 defect 7: stream mode can be graphed (the carried state in static buffers, tested on
    CPU in tests/test_graphs_fake.py), but `auto` leaves it off until it has run on a GPU; `on`
    turns it on. data.too_long=chunk (a varying number of pieces per batch) stays refused."""
    stream = ["--model.task", "lm", "--data.lm_mode", "stream"]
    on, why = graphs_decision(load_config(None, stream), CUDA)
    assert on is False and "--train.cuda_graphs on" in why
    assert graphs_decision(load_config(None, [*stream, "--train.cuda_graphs", "on"]), CUDA)[0] is True
    chunk = ["--model.task", "lm", "--data.lm_mode", "windows", "--data.too_long", "chunk", "--data.shape_buckets", "0"]
    assert graphs_decision(load_config(None, chunk), CUDA)[0] is False
    with pytest.raises(ConfigError, match="data.too_long=chunk"):
        graphs_decision(load_config(None, [*chunk, "--train.cuda_graphs", "on"]), CUDA)

"""Sizes are checked before anything is allocated: a config (flag, or an exported config.json) or a
dataset (a stray token id in Parquet statistics) that asks for a model larger than memory is refused
with one line giving the estimate and the key at fault.

A failure means `--model.hidden_size 1000000000` or one token id 2^40 goes straight to a terabyte
allocation and a traceback (or the OOM killer).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distlstm.config import load_config
from distlstm.models.lstm import build_model, check_memory, memory_estimate, num_parameters

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _model_cfg(*overrides):
    return load_config(None, ["--model.input", "tokens", "--model.vocab_size", "100", "--model.num_classes", "3",
                              *overrides]).model


@pytest.mark.parametrize("overrides", [(), ("--model.num_layers", "2", "--model.bidirectional", "true"),
                                       ("--model.task", "lm", "--model.proj_size", "16")])
def test_estimate_counts_the_parameters_it_builds(overrides):
    cfg = _model_cfg("--model.hidden_size", "32", *overrides)
    estimated = sum(memory_estimate(cfg).values()) / 4
    assert estimated == num_parameters(build_model(cfg))


def test_huge_hidden_size_is_refused_naming_the_key():
    cfg = _model_cfg("--model.hidden_size", "1000000000")
    with pytest.raises(ValueError, match=r"needs about [\d,.]+ GiB .* model.hidden_size=1000000000"):
        build_model(cfg)
    with pytest.raises(ValueError, match=r"data.max_tokens=10000000000"):
        check_memory(_model_cfg(), budget_bytes=1 << 30, tokens_per_batch=10**10, training=True)


def test_train_with_a_huge_model_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distlstm.train", "--model.hidden_size", "1000000000",
                           "--train.run_dir", str(tmp_path / "run"), "--data.cache_dir", str(tmp_path / "c"),
                           "--data.synthetic_samples", "200"],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.hidden_size=1000000000" in proc.stderr


def test_exported_config_declaring_a_huge_model_is_refused_by_load(tmp_path):
    from distlstm.checkpoint.artifacts import CONFIG, load, model_card
    cfg = load_config(None, ["--model.input", "tokens", "--model.vocab_size", "100", "--model.num_classes", "3",
                             "--model.hidden_size", "1000000000"])
    (tmp_path / CONFIG).write_text(json.dumps(model_card(cfg, step=1, param_hash="x", vocab=None, labels=False)))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(Exception, match="model.hidden_size=1000000000"):
        load(tmp_path)


def test_token_id_2_to_the_40_in_statistics_is_refused(tmp_path):
    from distlstm.data.shards.dims import DataDims
    from distlstm.data.shards.index import open_index
    pq.write_table(pa.table({"tokens": pa.array([[1, 2, 3], [4, 2**40]], pa.list_(pa.int64())),
                             "label": [0, 1]}), tmp_path / "a.parquet")
    ix = open_index(str(tmp_path / "a.parquet"), cache_dir=tmp_path / "cache", task="classify")
    with pytest.raises(ValueError, match=r"a.parquet: column 'tokens' holds token id 1099511627776 .* "
                                         r"--model.vocab_size"):
        DataDims(ix).vocab_size


def test_a_hostile_layer_count_is_refused_at_once():
    """Found by tests/test_fuzz_inputs.py (seed 9): an exported config.json with num_layers = 2^64
    made the estimate loop over the layers; the estimate is a closed form and refuses it at once."""
    import dataclasses
    import time

    import pytest

    from distlstm.config import ModelConfig
    from distlstm.models.lstm import check_memory, memory_estimate
    small = dataclasses.replace(ModelConfig(), num_layers=3, vocab_size=100)
    per_layer = memory_estimate(dataclasses.replace(small, num_layers=2))["model.hidden_size"] - \
        memory_estimate(dataclasses.replace(small, num_layers=1))["model.hidden_size"]
    assert memory_estimate(small)["model.hidden_size"] == \
        memory_estimate(dataclasses.replace(small, num_layers=1))["model.hidden_size"] + 2 * per_layer
    started = time.monotonic()
    with pytest.raises(ValueError, match="num_layers|hidden_size"):
        check_memory(dataclasses.replace(small, num_layers=2**64), budget_bytes=2**34)
    assert time.monotonic() - started < 1.0

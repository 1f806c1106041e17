"""Configuration: TOML file + dotted overrides, validation and --help.

A failure means a user's config could be silently misread (unknown key ignored, wrong type
accepted), an error would not say which key is wrong, or the documented defaults drifted from the code.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from distlstm.config import SECTIONS, Config, ConfigError, load_config, to_dict, help_text

ROOT = Path(__file__).resolve().parents[1]


def test_default_toml_matches_the_code():
    assert to_dict(load_config(ROOT / "configs" / "default.toml")) == to_dict(Config())


def test_streams_is_auto_or_a_count_from_file_or_command_line(tmp_path):
    assert Config().data.streams == "auto"
    assert load_config(None, ["--data.streams", "8"]).data.streams == 8
    path = tmp_path / "s.toml"
    path.write_text("[data]\nstreams = 4\n")
    assert load_config(path).data.streams == 4
    path.write_text('[data]\nstreams = "auto"\n')
    assert load_config(path).data.streams == "auto"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('[optim]\nlr = 0.01\n[model]\nhidden_size = 64\n[data]\nstorage_options = {anon = "true"}\n')
    cfg = load_config(path, ["--optim.lr", "3e-3", "--model.bidirectional", "--train.max_steps=7"])
    assert cfg.optim.lr == 3e-3 and cfg.model.hidden_size == 64 and cfg.model.bidirectional
    assert cfg.train.max_steps == 7 and cfg.data.storage_options == {"anon": "true"}


@pytest.mark.parametrize("text, needle", [
    ("[optim]\nlrr = 1\n", "unknown key optim.lrr; optim keys are lr,"),
    ("[optimizer]\nlr = 1\n", "unknown config section [optimizer]"),
    ("[optim]\nlr = 'fast'\n", "optim.lr='fast' is not a number"),
    ("[train]\nprecision = 'fp8'\n", "train.precision='fp8' is not allowed; choose one of fp32, bf16, fp16"),
    ("[model]\nhidden_size = 0\n", "model.hidden_size=0 must be > 0"),
    ("[train]\naccum_steps = 1.5\n", "train.accum_steps=1.5 is not an integer"),
    ("[data]\nmax_tokens = 'lots'\n", "data.max_tokens='lots' is not an integer or 'auto'"),
    ("[data]\nshape_buckets = -2\n", "data.shape_buckets=-2 must be >= 0"),
    ("[train]\ncuda_graphs = 'yes'\n", "train.cuda_graphs='yes' is not allowed; choose one of auto, on, off"),
])
def test_file_errors_name_the_key(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_int_or_auto_values(tmp_path):
    """data.max_tokens and data.shape_buckets take an integer or "auto", from a file or the command line."""
    cfg = load_config(None, ["--data.max_tokens", "auto", "--data.shape_buckets", "48"])
    assert (cfg.data.max_tokens, cfg.data.shape_buckets) == ("auto", 48)
    assert load_config(None, ["--data.max_tokens=65_536"]).data.max_tokens == 65536
    path = tmp_path / "auto.toml"
    path.write_text('[data]\nmax_tokens = "auto"\nshape_buckets = 0\n')
    assert (load_config(path).data.max_tokens, load_config(path).data.shape_buckets) == ("auto", 0)


@pytest.mark.parametrize("args, needle", [
    (["--optim.lr", "abc"], "optim.lr='abc' is not a number"),
    (["--model.bidirectional", "maybe"], "model.bidirectional='maybe' is not a boolean"),
    (["lr=3"], "unexpected argument 'lr=3'"),
    (["--data.max_batch_size", "2", "--data.min_batch_size", "4"], "data.max_batch_size=2 is below"),
    (["--data.streams", "many"], "data.streams='many' is not an integer or 'auto'"),
    (["--data.streams", "0"], "data.streams=0 must be > 0"),
    (["--train.ddp_static_graph", "on", "--train.accum_steps", "2"], "train.ddp_static_graph=on cannot be"),
])
def test_override_errors(args, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, args)
    assert needle in str(err.value)


def test_help_lists_every_option_with_default_and_doc():
    text = help_text()
    for section, values in to_dict(Config()).items():
        for key in values:
            assert f"--{section}.{key} = " in text, key
    proc = subprocess.run([sys.executable, "-m", "distlstm.train", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--optim.lr = 0.003" in proc.stdout and "usage:" in proc.stdout


def test_bad_flag_exits_2_with_the_key():
    proc = subprocess.run([sys.executable, "-m", "distlstm.train", "--optim.lrr", "1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown key optim.lrr" in proc.stderr


def test_saved_config_never_contains_credentials(tmp_path):
    """The run directory's config.toml is shared freely: URLs lose their credentials, storage
    options their values."""
    from distlstm.config import to_toml
    from distlstm.data.sources import redact
    cfg = load_config(None, ["--data.train", "https://alice:s3cret@example.org/d/train-{0..3}.parquet?token=abc123",
                             "--data.storage_options", '{"key": "AKIAXXXX", "secret": "hunter2"}'])
    text = to_toml(cfg, redact=redact)
    for secret in ("s3cret", "abc123", "AKIAXXXX", "hunter2", "alice"):
        assert secret not in text, secret
    assert "example.org/d/train-{0..3}.parquet" in text


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_up_front(value):
    """inf passes every range check written as a comparison (inf > 0) and used to end as a
    NonFiniteError after the first steps; nan fails them with a confusing message."""
    with pytest.raises(ConfigError, match=f"optim.lr='{value}' is not a finite number"):
        load_config(None, ["--optim.lr", value])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "distlstm.train", "--train.device", "cuda"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "CUDA is not available; use --train.device cpu" in proc.stderr


def test_config_reference_page_matches_the_code():
    """docs/config.md is generated from the dataclasses; a key added without regenerating it fails here."""
    from distlstm.config import reference_markdown as markdown
    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert page == markdown(), "docs/config.md is stale: python -m distlstm.config > docs/config.md"
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in page


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """A config under configs/ that names a key the code no longer has would fail only for the user."""
    cfg = load_config(path)
    if path.name in ("shakespeare-word.toml", "shakespeare-char.toml"):
        # The classic LM recipe: SGD lr 20, clip 0.25, lr / 4 on plateau, no warmup, stream mode.
        o = cfg.optim
        assert (o.name, o.lr, o.grad_clip, o.schedule, o.plateau_factor, o.warmup_steps) == ("sgd", 20.0, 0.25,
                                                                                          "plateau", 0.25, 0)
        assert cfg.model.task == "lm" and cfg.data.lm_mode == "stream" and cfg.model.num_layers == 2

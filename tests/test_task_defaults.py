"""Per-task config defaults (issue 21): `--model.task lm` alone gets the language-model recipe
(`LanguageModel.config_defaults`), values the user gives win, other tasks keep the generic defaults.

A failure means a user who only says "language model" trains with a recipe that does not learn
(AdamW 3e-3, dropout 0: 2.4x the classic recipe's perplexity), that a value they set is silently
replaced, or that another task's defaults moved.
"""

from __future__ import annotations

import dataclasses

import pytest

from distlstm.config import Config, ConfigError
from distlstm.tasks import TASKS
from distlstm.train import parse_args


def test_lm_alone_gets_the_lm_recipe():
    cfg, _ = parse_args(["--model.task", "lm"])
    o, m = cfg.optim, cfg.model
    assert (o.name, o.lr, o.weight_decay, o.warmup_steps, o.grad_clip, o.schedule) == \
        ("sgd", 20.0, 0.0, 0, 0.25, "cosine")
    assert (m.dropout, m.embed_dropout) == (0.2, 0.2)


def test_given_values_win(tmp_path):
    cfg, _ = parse_args(["--model.task", "lm", "--optim.grad_clip", "1.0", "--model.dropout", "0"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.grad_clip, cfg.model.dropout) == ("sgd", 20.0, 1.0, 0.0)
    # A config file's values win too, and one's own optimizer (optim.lr or optim.name) keeps the
    # generic optimizer defaults whole: SGD's lr 20 never meets Adam, nor Adam's lr 1e-2 SGD.
    toml = tmp_path / "lm.toml"
    toml.write_text('[model]\ntask = "lm"\nembed_dropout = 0.1\n[optim]\nlr = 1e-2\n')
    cfg, _ = parse_args(["--config", str(toml)])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-2, Config().optim.weight_decay)
    assert (cfg.model.embed_dropout, cfg.model.dropout) == (0.1, 0.2)
    cfg, _ = parse_args(["--model.task", "lm", "--optim.name", "adamw"])
    assert cfg.optim == Config().optim


@pytest.mark.parametrize("task", [t for t in TASKS if t != "lm"])
def test_other_tasks_keep_the_generic_defaults(task):
    cfg, _ = parse_args(["--model.task", task])
    assert cfg == dataclasses.replace(Config(), model=dataclasses.replace(Config().model, task=task))
    assert parse_args([])[0] == Config()


def test_unknown_task_is_still_named():
    with pytest.raises(ConfigError, match="model.task='lmm'"):
        parse_args(["--model.task", "lmm"])

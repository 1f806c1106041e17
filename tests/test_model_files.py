"""The files of a trained model (model.safetensors, config.json, vocab.json) are user input (issue 20
class 4).

A failure here means a damaged, hostile or mismatched file in a run directory or an exported folder
ends in a traceback (SafetensorError, RuntimeError), allocates what a forged header claims (2^62
bytes), or loads silently into a model it does not belong to (another dtype, another model's
weights, another run's vocabulary), instead of one line naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import distlstm

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def env(cache: Path) -> dict:
    return {**os.environ, "DISTLSTM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A small finished run of the embedded default task, exported as safetensors."""
    tmp = tmp_path_factory.mktemp("model_files")
    for cmd in (["distlstm.train", "--model.hidden_size", "16", "--data.synthetic_samples", "400",
                 "--data.max_tokens", "512", "--train.max_steps", "4", "--train.eval_every", "0",
                 "--log.progress", "false", "--log.tensorboard", "false", "--train.run_dir", str(tmp / "run")],
                ["distlstm.export", str(tmp / "run"), "--format", "safetensors", "--out", str(tmp / "exported")]):
        proc = subprocess.run([sys.executable, "-m", *cmd], env=env(tmp / "cache"), capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "exported"


def rewrite(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "distlstm-model"})


def huge_header(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2 ** 62) + data[8:])


def garbage_header(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    (folder / "model.safetensors").write_bytes(data[:8] + b"\xff" * n + data[8 + n:])


def truncated(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def other_weights(folder: Path) -> None:
    def nudge(t):
        t["head.bias"] = t["head.bias"] + 1
    rewrite(folder, nudge)


def wrong_dtype(folder: Path) -> None:
    def double(t):
        t["embedding.weight"] = t["embedding.weight"].double()
    rewrite(folder, double)


def wrong_shape(folder: Path) -> None:
    def cut(t):
        t["lstm.weight_hh_l0"] = t["lstm.weight_hh_l0"][:8].clone()
    rewrite(folder, cut)


def extra_tensor(folder: Path) -> None:
    def add(t):
        t["backdoor.weight"] = torch.zeros(3)
    rewrite(folder, add)


def missing_tensor(folder: Path) -> None:
    rewrite(folder, lambda t: t.pop("head.bias"))


def other_vocab(folder: Path) -> None:
    tokens = [chr(0x4e00 + i) for i in range(500)]
    (folder / "vocab.json").write_text(json.dumps({"version": 1, "tokenizer": "char", "tokens": tokens}))


def card_not_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"format": "distlstm-model", "config": ')


# case -> (damage, what the one line must say besides the file's name)
CASES = {
    "huge_header": (huge_header, "model.safetensors is not a safetensors file (its header claims 4611686018427387904 bytes"),
    "garbage_header": (garbage_header, "model.safetensors is not a safetensors file (its header is not a JSON table"),
    "truncated": (truncated, "model.safetensors cannot be read ("),
    "other_weights": (other_weights, "model.safetensors does not hold the weights"),
    "wrong_dtype": (wrong_dtype, "tensor 'embedding.weight' is F64 [29, 64], but the model of"),
    "wrong_shape": (wrong_shape, "tensor 'lstm.weight_hh_l0' is F32 [8, 16], but the model of"),
    "extra_tensor": (extra_tensor, "holds a tensor 'backdoor.weight' that the model of"),
    "missing_tensor": (missing_tensor, "has no tensor 'head.bias'"),
    "other_vocab": (other_vocab, "vocab.json has 500 tokens but the model's embedding has 29 rows"),
    "card_not_json": (card_not_json, "config.json is not JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_model_file_is_one_user_error_naming_the_file(exported, tmp_path, case):
    damage, expect = CASES[case]
    folder = tmp_path / "exported"
    shutil.copytree(exported, folder)
    damage(folder)
    with pytest.raises(ValueError) as info:  # the project's user errors (ConfigError is one)
        distlstm.load(folder)
    assert expect in str(info.value) and str(folder) in str(info.value), str(info.value)
    assert "\n" not in str(info.value) and ("export the model again" in str(info.value)), str(info.value)


@pytest.mark.parametrize("case", ["huge_header", "wrong_dtype", "extra_tensor"])
def test_damaged_model_file_ends_a_command_in_one_line(exported, tmp_path, case):
    """The commands read the same files (here export, re-exporting the damaged folder)."""
    damage, expect = CASES[case]
    folder = tmp_path / "exported"
    shutil.copytree(exported, folder)
    damage(folder)
    proc = subprocess.run([sys.executable, "-m", "distlstm.export", str(folder), "--format", "safetensors", "--out",
                           str(tmp_path / "again")], env=env(tmp_path / "cache"), capture_output=True, text=True,
                          timeout=240)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "again").exists()


def test_the_exported_folder_itself_loads(exported):
    model, vocab, cfg = distlstm.load(exported)
    assert model.embedding.num_embeddings == 29 and vocab is None and cfg.model.task == "classify"

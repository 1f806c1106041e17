"""The package's shape (docs/design.md, Layers): what the folders promise, checked on the source.
The import direction itself is checked by `lint-imports` (pyproject.toml [tool.importlinter]) in CI."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from distlstm.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distlstm"
COMMANDS = ("train", "evaluate", "predict", "generate", "export", "plot", "prep")


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_top_level_holds_commands_and_floor_zero_only():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 12, modules
    assert set(modules) <= {*COMMANDS, "config", "errors", "tasks", "__init__"}, modules


def test_no_task_name_is_compared_outside_tasks_and_config():
    """Prep, predict, generate and the rest ask the Task object; a string compare would be a second
    place that knows what a task is."""
    names = set(TASKS)
    found = []
    for path, tree in _sources():
        if path.name in ("tasks.py", "config.py"):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for v in values:
                    if isinstance(v, ast.Constant) and v.value in names:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with {v.value!r}")
    assert not found, "\n".join(found)


def test_file_urls_are_stripped_in_one_place():
    found = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value == "file://":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(found) == 2 and all(f.startswith("distlstm/data/sources.py") for f in found), found


def test_console_scripts_and_modules_start():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {name.removeprefix("distlstm-") for name in scripts} == set(COMMANDS)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Started two at a time (CI has 2 cores; each is mostly `import torch` on one of them).
    names = [*COMMANDS, "data.prep", "config"]
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):
        procs = {name: subprocess.Popen([sys.executable, "-m", f"distlstm.{name}", "--help"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env) for name in pair}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, (name, err[-2000:])
            assert out.strip(), name


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "generate"])
def test_bad_input_before_a_session_is_one_line(command, tmp_path):
    """`run_command` ends every command the same way: a missing run folder is one error line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    extra = {"predict": ["--data", "x", "--out", str(tmp_path / "o")], "export": ["--format", "safetensors", "--out", str(tmp_path / "o")],
             "generate": ["--prompt", "a"]}.get(command, [])
    proc = subprocess.run([sys.executable, "-m", f"distlstm.{command}", str(tmp_path / "missing"), *extra],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], proc.stderr[-2000:]

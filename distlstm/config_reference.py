"""docs/config.md, generated from the config dataclasses (distlstm/config.py): every section and key
with its type, default, allowed values and doc line.

    python -m distlstm.config_reference > docs/config.md

tests/test_config.py checks that the committed page matches the code.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from distlstm.config import SECTIONS, _toml_value

HEADER = """# Configuration reference

Generated from `distlstm/config.py` by `python -m distlstm.config_reference > docs/config.md`; do not
edit by hand (`tests/test_config.py` checks that this page matches the code).

Every key can be set in a TOML file (`--config FILE.toml`, a `[section]` table per section) or on
the command line (`--section.key value`, which wins over the file). `configs/default.toml` lists
every key with its default. The after-training commands (`evaluate`, `predict`) take the same
`--section.key value` options to override the run's saved config.
"""


def _type_name(kind) -> str:
    """int, str, ...; a union such as IntOrAuto as `int or "auto"`."""
    if typing.get_origin(kind) is typing.Literal:
        return " or ".join(f'"{a}"' for a in typing.get_args(kind))
    args = typing.get_args(kind)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return kind.__name__


def markdown() -> str:
    out = [HEADER]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out.append(f"## [{section}]\n\n{cls.__doc__.strip()}\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        defaults = cls()
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "").replace("|", "\\|")
            choices = f.metadata.get("choices")
            if choices:
                doc += " (one of: " + ", ".join(f"`{c}`" for c in choices) + ")"
            default = _toml_value(getattr(defaults, f.name)).replace("|", "\\|")
            out.append(f"| `{section}.{f.name}` | {_type_name(hints[f.name])} | `{default}` | {doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())

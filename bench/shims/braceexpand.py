"""A stand-in for the `braceexpand` package, for machines that lack it and cannot install it (a GPU
machine with no network): bench/gpu_check.sh puts this folder on PYTHONPATH only when
`import braceexpand` fails. It covers what shard patterns use: `{a,b}` alternatives (nested too)
and `{00..09}` / `{1..10..2}` / `{a..e}` ranges, zero padding kept; unbalanced braces raise
UnbalancedBracesError; no backslash escapes.
"""

from __future__ import annotations

import re
from typing import Iterator


class UnbalancedBracesError(ValueError):
    pass

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$|^([a-zA-Z])\.\.([a-zA-Z])(?:\.\.(-?\d+))?$")


def braceexpand(pattern: str, escape: bool = True) -> Iterator[str]:
    """Every string `pattern` expands to, in bash's order (the leftmost group varies slowest)."""
    depth = 0
    for c in pattern:
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth < 0:
            break
    if depth:
        raise UnbalancedBracesError(f"Unbalanced braces: '{pattern}'")
    return _expand(pattern)


def _expand(pattern: str) -> Iterator[str]:
    group = _first_group(pattern)
    if group is None:
        yield pattern
        return
    start, end, alternatives = group
    for alternative in alternatives:
        for head in _expand(alternative):
            for tail in _expand(pattern[end + 1:]):
                yield pattern[:start] + head + tail


def _first_group(pattern: str) -> tuple[int, int, list[str]] | None:
    """(start, end, alternatives) of the first `{...}` that expands; None if there is none."""
    search_from = 0
    while True:
        start = pattern.find("{", search_from)
        if start < 0:
            return None
        depth, parts, last = 0, [], start + 1
        for i in range(start, len(pattern)):
            c = pattern[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    parts.append(pattern[last:i])
                    alternatives = parts if len(parts) > 1 else _range(parts[0])
                    if alternatives is not None:
                        return start, i, alternatives
                    break
            elif c == "," and depth == 1:
                parts.append(pattern[last:i])
                last = i + 1
        else:
            raise UnbalancedBracesError(f"Unbalanced braces: '{pattern}'")
        search_from = start + 1


def _range(body: str) -> list[str] | None:
    m = _RANGE.match(body)
    if m is None:
        return None
    if m.group(1) is not None:
        a, b, step = int(m.group(1)), int(m.group(2)), abs(int(m.group(3) or 1)) or 1
        width = max(len(m.group(1)), len(m.group(2))) if m.group(1).lstrip("-").startswith("0") or \
            m.group(2).lstrip("-").startswith("0") else 0
        values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        return [str(v).zfill(width) for v in values]
    a, b, step = ord(m.group(4)), ord(m.group(5)), abs(int(m.group(6) or 1)) or 1
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [chr(v) for v in values]

"""Load YAML keeping the line of every mapping key and sequence item, refusing duplicate keys.

Pydantic reports errors by location (``("agents", "health", "tier")``); ``LineMap`` turns
that location into the line a user should look at.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from broker.errors import PolicyError

Loc = tuple[str | int, ...]
_SCALARS = yaml.constructor.SafeConstructor()


class LineMap:
    def __init__(self) -> None:
        self._lines: dict[Loc, int] = {}

    def add(self, loc: Loc, line: int) -> None:
        self._lines.setdefault(loc, line)

    def line_for(self, loc: Sequence[str | int]) -> int | None:
        """The line of ``loc`` or of its nearest ancestor that has one."""
        key = tuple(loc)
        while key:
            if key in self._lines:
                return self._lines[key]
            key = key[:-1]
        return self._lines.get((), None)


def _construct(node: yaml.Node, loc: Loc, lines: LineMap, path: Path) -> Any:
    lines.add(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise PolicyError("mapping keys must be plain names", path=path,
                                  line=key_node.start_mark.line + 1)
            key = str(_SCALARS.construct_object(key_node))
            if key in out:
                raise PolicyError(
                    f"duplicate key {key!r} (first at line {lines.line_for((*loc, key))}); "
                    "keep one of them",
                    path=path, line=key_node.start_mark.line + 1,
                )
            lines.add((*loc, key), key_node.start_mark.line + 1)
            out[key] = _construct(value_node, (*loc, key), lines, path)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*loc, i), lines, path) for i, item in enumerate(node.value)]
    return _SCALARS.construct_object(node)


def load_yaml_with_lines(path: Path) -> tuple[Any, LineMap]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError("policy file not found; run mas from the project folder or pass --root",
                          path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read: {exc}", path=path) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"not valid YAML: {problem}", path=path,
                          line=mark.line + 1 if mark else None) from None
    lines = LineMap()
    if node is None:
        raise PolicyError("the policy is empty; it needs version, services and agents",
                          path=path, line=1)
    return _construct(node, (), lines, path), lines

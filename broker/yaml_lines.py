"""Load YAML keeping the line of every mapping key and sequence item, refusing duplicate keys.

Only plain data is accepted: text, numbers, true/false and null as values, text as keys.
Anchors, aliases and any other tag (``!!python/...``, dates, ``!!binary``, ``!!set``) are
refused with the line to fix, so a bad file is one ``PolicyError`` and never a traceback.

Pydantic reports errors by location (``("agents", "health", "tier")``); ``LineMap`` turns
that location into the line a user should look at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from broker.errors import PolicyError

Loc = tuple[str | int, ...]
_SCALARS = yaml.constructor.SafeConstructor()
_YAML_TAG = "tag:yaml.org,2002:"
_STR_TAG = _YAML_TAG + "str"
_MAP_TAG = _YAML_TAG + "map"
_SEQ_TAG = _YAML_TAG + "seq"
_Safe = yaml.constructor.SafeConstructor
# The only scalar types a policy holds. Calling the constructor methods directly (not
# ``construct_object``) keeps the shared constructor free of per-load node caches.
_SCALAR_TAGS: dict[str, Callable[[_Safe, yaml.ScalarNode], Any]] = {
    _STR_TAG: _Safe.construct_yaml_str,
    _YAML_TAG + "int": _Safe.construct_yaml_int,
    _YAML_TAG + "float": _Safe.construct_yaml_float,
    _YAML_TAG + "bool": _Safe.construct_yaml_bool,
    _YAML_TAG + "null": _Safe.construct_yaml_null,
}


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


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _tag(node: yaml.Node) -> str:
    return str(node.tag).removeprefix(_YAML_TAG)


def _shown(node: yaml.ScalarNode) -> str:
    """The scalar as written, cut short so one bad value cannot flood the message."""
    text = str(node.value)
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _scalar(node: yaml.ScalarNode, path: Path) -> Any:
    """Build a str, int, float, bool or null; any other tag (explicit like ``!!python/name``
    or implied like a date) is refused rather than handed to PyYAML's constructors."""
    build = _SCALAR_TAGS.get(node.tag)
    if node.tag == _YAML_TAG + "timestamp":
        raise PolicyError(f"{_shown(node)} reads as a date, which the policy has no use for; "
                          "quote it to use it as text", path=path, line=_line(node))
    if build is None:
        raise PolicyError(
            f"unsupported YAML tag {_tag(node)!r} for {_shown(node)}; "
            "only text, numbers, true/false and null are allowed (quote the value to use it "
            "as text)",
            path=path, line=_line(node),
        )
    try:
        return build(_SCALARS, node)
    except (yaml.YAMLError, ValueError, KeyError, IndexError, TypeError, OverflowError):
        raise PolicyError(f"{_shown(node)} is not a valid {_tag(node)}; fix it or quote it",
                          path=path, line=_line(node)) from None


def _construct(node: yaml.Node, loc: Loc, lines: LineMap, path: Path) -> Any:
    lines.add(loc, _line(node))
    if isinstance(node, yaml.MappingNode):
        if node.tag != _MAP_TAG:
            raise PolicyError(f"unsupported YAML tag {_tag(node)!r} on a mapping; remove it",
                              path=path, line=_line(node))
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise PolicyError("mapping keys must be plain names", path=path,
                                  line=_line(key_node))
            if key_node.tag != _STR_TAG:
                raise PolicyError(
                    f"key {_shown(key_node)} reads as {_tag(key_node)}, but keys must be names; "
                    "rename it or quote it",
                    path=path, line=_line(key_node),
                )
            key = str(_scalar(key_node, path))
            if key in out:
                raise PolicyError(
                    f"duplicate key {key!r} (first at line {lines.line_for((*loc, key))}); "
                    "keep one of them",
                    path=path, line=_line(key_node),
                )
            lines.add((*loc, key), _line(key_node))
            out[key] = _construct(value_node, (*loc, key), lines, path)
        return out
    if isinstance(node, yaml.SequenceNode):
        if node.tag != _SEQ_TAG:
            raise PolicyError(f"unsupported YAML tag {_tag(node)!r} on a list; remove it",
                              path=path, line=_line(node))
        return [_construct(item, (*loc, i), lines, path) for i, item in enumerate(node.value)]
    if not isinstance(node, yaml.ScalarNode):
        raise PolicyError("unsupported YAML node", path=path, line=_line(node))
    return _scalar(node, path)


class _AnchorFound(Exception):
    def __init__(self, line: int | None) -> None:
        super().__init__(line)
        self.line = line


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader that refuses any anchor or alias from the event stream, before it is composed.

    An alias can make the policy self-referential (``a: &x [*x]``) or expand exponentially
    (a "billion laughs" alias bomb); a policy never needs either. Checking here costs one
    ``isinstance`` per node instead of a second pass over the text.
    """

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.NodeEvent):  # fills current_event with the next event
            event: yaml.NodeEvent = self.current_event
            if event.anchor is not None:
                mark = event.start_mark
                raise _AnchorFound(mark.line + 1 if mark else None)
        return super().compose_node(parent, index)


def _compose(text: str) -> yaml.Node | None:
    loader = _PolicyLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def load_yaml_with_lines(path: Path) -> tuple[Any, LineMap]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError("policy file not found; run mas from the project folder or pass --root",
                          path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read: {exc}", path=path) from exc
    try:
        node = _compose(text)
    except _AnchorFound as exc:
        raise PolicyError("anchors and aliases are not allowed in the policy; "
                          "write each value out in full", path=path, line=exc.line) from None
    except RecursionError:
        raise PolicyError("not valid YAML: nested too deeply", path=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"not valid YAML: {problem}", path=path,
                          line=mark.line + 1 if mark else None) from None
    lines = LineMap()
    if node is None:
        raise PolicyError("the policy is empty; it needs version, services and agents",
                          path=path, line=1)
    try:
        return _construct(node, (), lines, path), lines
    except RecursionError:
        raise PolicyError("nested too deeply", path=path) from None

"""Reading the YAML (or JSON) files souplm takes: recipes, learn configs, task files, mapping specs.

Every YAML read goes through `load_yaml` (directly or via `parse_mapping` / `read_mapping`), which bounds:
- the file size (`MAX_YAML_BYTES`);
- the nesting depth (`MAX_YAML_DEPTH`), so a deeply nested document is a SoupError, not a RecursionError;
- alias expansion: the document's size with every alias counted as the whole value it stands for may
  exceed its number of distinct nodes by at most `MAX_ALIAS_EXPANSION` nodes, and a value may not
  contain itself. An exponential "billion laughs" document is therefore refused after composing its
  few distinct nodes, before anything is constructed or formatted.
Numbers like `1e-3` read as floats (YAML 1.1 would read a string); everything else is PyYAML's safe schema.
Types are checked where the values are read (recipe.py, learn/config.py, evaluate/tasks.py, arch/mapping.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from .errors import SoupError

MAX_YAML_BYTES = 16 * 1024 * 1024
MAX_YAML_DEPTH = 100
MAX_ALIAS_EXPANSION = 100_000

_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Refused(yaml.YAMLError):
    """Raised inside the loader; turned into a SoupError naming the file."""


class BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader with bounded nesting depth and alias expansion (checked before construction)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Node) -> Any:  # type: ignore[override]
        _check_expansion(node)
        return super().construct_document(node)


BoundedSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [x for kv in node.value for x in kv]
    return []


def _check_expansion(root: Node) -> None:
    """Refuse a node graph whose expanded size exceeds its distinct nodes by MAX_ALIAS_EXPANSION, or a cycle."""
    size: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_stack.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] > len(size) + MAX_ALIAS_EXPANSION:
                raise _Refused(f"its aliases expand to more than {MAX_ALIAS_EXPANSION} extra nodes (an alias bomb?)")
            continue
        if key in size:
            continue
        if key in on_stack:
            raise _Refused("a value contains itself through an alias")
        on_stack.add(key)
        stack.append((node, True))
        for c in _children(node):
            if id(c) in on_stack:
                raise _Refused("a value contains itself through an alias")
            if id(c) not in size:
                stack.append((c, False))


def load_yaml(text: str, where: str, loader: type[BoundedSafeLoader] = BoundedSafeLoader) -> Any:
    """Parse YAML/JSON text with the bounds above; every problem is a one-line SoupError naming `where`."""
    if len(text) > MAX_YAML_BYTES:
        raise SoupError(f"{where} is over the {MAX_YAML_BYTES} byte limit for YAML files")
    try:
        return yaml.load(text, Loader=loader)  # a SafeLoader subclass
    except _Refused as e:
        raise SoupError(f"{where} is refused: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SoupError(f"{where} is not valid YAML: {str(e.problem or e.context)[:200]}{at}") from None
    except yaml.YAMLError as e:
        raise SoupError(f"{where} is not valid YAML: {str(e).splitlines()[0][:200]}") from None
    except RecursionError:  # pragma: no cover  (the depth bound comes first)
        raise SoupError(f"{where} is nested too deeply") from None


def read_text_bounded(path: str | os.PathLike, what: str) -> str:
    """A YAML file's text, refused (one line) when missing, unreadable, not UTF-8, or over the size limit."""
    path = Path(path)
    if not path.is_file():
        raise SoupError(f"{what} not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise SoupError(f"{what} {path} is {size} bytes, over the {MAX_YAML_BYTES} byte limit for YAML files")
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise SoupError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SoupError(f"{what} {path} is not UTF-8 text") from None


def parse_mapping(text: str, where: str, what: str) -> dict:
    """Parse YAML/JSON text that must hold a mapping; `what` names the file's kind in errors."""
    data = load_yaml(text, where)
    if not isinstance(data, dict):
        raise SoupError(f"{where}: a {what} is a mapping of keys, got {type(data).__name__}")
    return data


def read_mapping(path: str | os.PathLike, what: str) -> dict:
    """Read a YAML/JSON file that must hold a mapping, with one-line errors naming the file."""
    return parse_mapping(read_text_bounded(path, what), str(path), what)

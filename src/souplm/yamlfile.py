"""Reading the YAML (or JSON) files souplm takes: recipes, learn configs, task files, mapping specs."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import SoupError


def parse_mapping(text: str, where: str, what: str) -> dict:
    """Parse YAML/JSON text that must hold a mapping; `what` names the file's kind in errors."""
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as e:
        raise SoupError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SoupError(f"{where}: a {what} is a mapping of keys, got {type(data).__name__}")
    return data


def read_mapping(path: str | os.PathLike, what: str) -> dict:
    """Read a YAML/JSON file that must hold a mapping, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SoupError(f"{what} not found: {path}")
    return parse_mapping(path.read_text(encoding="utf-8"), str(path), what)

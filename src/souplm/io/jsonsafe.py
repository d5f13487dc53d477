"""Bounded JSON parsing for the files a checkpoint brings: safetensors headers, shard indexes, config.json.

`json.loads` recurses once per nesting level, so a 200k-deep `[[[[...]]]]` ends in RecursionError, and
it silently keeps the last of two equal keys (a header naming one tensor twice). `load_json` refuses
both, and every other decoding problem, with one SoupError naming the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import SoupError

MAX_JSON_BYTES = 100 * 1024 * 1024  # configs and indexes are kilobytes; headers are bounded by the format too
DEFAULT_MAX_DEPTH = 64

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_LEAF = re.compile(r"\{\}|\[\]")


def nesting_depth_exceeds(text: str, max_depth: int) -> bool:
    """True when the JSON text nests objects/arrays deeper than `max_depth` (without recursing).

    Strings are removed first (brackets inside them do not count), then the innermost empty pairs are
    peeled off one level per pass; text still holding a pair after `max_depth` passes is deeper."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    for _ in range(max_depth):
        peeled = _LEAF.sub("", brackets)
        if peeled == brackets:
            return False
        brackets = peeled
    return _LEAF.search(brackets) is not None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            from ..errors import short_repr

            raise _Duplicate(short_repr(k))
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def load_json(data: bytes | str, where: str, max_depth: int = DEFAULT_MAX_DEPTH):
    """Parse JSON text; any problem (invalid, too deep, a key given twice, a number too long) is a SoupError."""
    if isinstance(data, bytes):
        if len(data) > MAX_JSON_BYTES:
            raise SoupError(f"{where} is {len(data)} bytes, over the {MAX_JSON_BYTES} byte limit")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SoupError(f"{where} is not valid JSON (not UTF-8 text)") from None
    else:
        text = data
    if nesting_depth_exceeds(text, max_depth):
        raise SoupError(f"{where} is nested deeper than {max_depth} levels; refused")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise SoupError(f"{where} names key {e} twice") from None
    except RecursionError:  # pragma: no cover  (the depth check comes first)
        raise SoupError(f"{where} is nested too deeply; refused") from None
    except ValueError as e:  # JSONDecodeError, and int() of a number with thousands of digits
        raise SoupError(f"{where} is not valid JSON: {str(e).splitlines()[0][:120]}") from None


def read_json(path: str | os.PathLike, what: str, max_depth: int = DEFAULT_MAX_DEPTH):
    """Read a JSON file (bounded in size and depth); errors name the file and its kind."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise SoupError(f"{what} {path} is {size} bytes, over the {MAX_JSON_BYTES} byte limit")
        data = path.read_bytes()
    except OSError as e:
        raise SoupError(f"cannot read {what} {path}: {e.strerror}") from None
    return load_json(data, f"{what} {path}", max_depth)

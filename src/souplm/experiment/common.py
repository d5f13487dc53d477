"""Small helpers every study module uses: the progress log, stable digests, atomic writes, JSON rounding."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    """A progress line on stderr (kept in logs of background runs)."""
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)



def stable_digest(obj: Any, n: int = 12) -> str:
    """Short sha256 of a JSON-able object: names cache folders and soup keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def write_if_changed(path: Path, text: str) -> None:
    """Write atomically, and only when the content changed (keeps mtimes of unchanged data)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Rows as JSON lines (keys sorted, so the same rows give the same bytes and cache keys)."""
    write_if_changed(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def rounded(obj: Any, digits: int = 6) -> Any:
    """Floats rounded for the JSON (NaN becomes None, which JSON can hold)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


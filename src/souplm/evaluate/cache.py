"""On-disk cache of evaluation results, shared safely by several processes.

One JSON file per result, named by the hash of its key: everything that changes a score. The model
part (`model_hash`) is the sha256 of the weights' bytes plus config.json, generation config and every
tokenizer / processor file (a size+mtime memo skips rehashing only while inode and ctime, which no
`touch` can restore, are unchanged too); the caller adds the dtype the model is evaluated in (a soup's
key, `soup_key`, names its inputs' model hashes, method, weights and dtype). Then the task's name and
version (declared version + a fingerprint of the task's definition and data), the limit, and the souplm
version. Writes go to a temporary file in the same folder and are renamed into place, which
is atomic on POSIX: a reader sees either no file or a whole one, and two processes that compute the
same result just replace each other's identical file. Under `torchrun` the ranks gather their results
and rank 0 writes them (souplm/distributed.py), so a rerun with any number of processes finds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import SoupError

CACHE_FORMAT = 1


def default_cache_root() -> Path:
    """`$SOUPLM_CACHE`, else `~/.cache/souplm` (the same root the engine's hash memo uses)."""
    env = os.environ.get("SOUPLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "souplm"


def key_fields(model: str, task: str, version: str, limit: int | None) -> dict[str, Any]:
    from .. import __version__

    return {"format": CACHE_FORMAT, "model": model, "task": task, "version": version, "limit": limit,
            "souplm": __version__}


def cache_key(model: str, task: str, version: str, limit: int | None) -> str:
    """Hex digest naming the cache entry for one (model, task, version, limit)."""
    blob = json.dumps(key_fields(model, task, version, limit), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultCache:
    """A folder of cached task results. `hits`/`misses` count lookups (tests and logs use them)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_root() / "eval"
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, model: str, task: str, version: str, limit: int | None) -> dict[str, Any] | None:
        """The cached result, or None. A corrupt or foreign entry counts as a miss, never an error."""
        key = cache_key(model, task, version, limit)
        try:
            entry = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            self.misses += 1
            return None
        if entry.get("key") != key_fields(model, task, version, limit):
            self.misses += 1
            return None
        self.hits += 1
        return entry["result"]

    def put(self, model: str, task: str, version: str, limit: int | None, result: dict[str, Any]) -> Path:
        """Store a result atomically (temp file in the same folder, fsync, rename)."""
        key = cache_key(model, task, version, limit)
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{key[:8]}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"key": key_fields(model, task, version, limit), "result": result}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise SoupError(f"cannot write evaluation cache {self.root}: {e.strerror or e}") from None
        return target


def as_cache(cache: ResultCache | str | Path | bool | None) -> ResultCache | None:
    """Accept a cache, a folder, True (the default folder) or None/False (no cache)."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return ResultCache()
    if isinstance(cache, ResultCache):
        return cache
    return ResultCache(cache)


def soup_key(input_hashes: list[str], method: str, params: dict[str, Any]) -> str:
    """Cache identity of an in-memory soup that was never written: its inputs, method and coefficients.

    Floats are rounded to 10 digits so 0.30000000000000004 and 0.3 name the same soup.
    """
    def norm(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 10)
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in sorted(v.items())}
        return v

    blob = json.dumps({"inputs": list(input_hashes), "method": method, "params": norm(params)}, sort_keys=True)
    return "soup-" + hashlib.sha256(blob.encode()).hexdigest()


# Files beside the weights that change what a model scores: architecture, generation defaults, tokenizer.
SCORE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
)


def model_hash(model_dir: str | Path) -> str:
    """Cache identity of a model dir: its weights' content hash and the bytes of every `SCORE_FILES` file."""
    from ..io.checkpoint import content_hash

    p = Path(model_dir)
    weights = str(content_hash(p))
    folder = p if p.is_dir() else p.parent
    h = hashlib.sha256(weights.encode())
    for name in SCORE_FILES:
        f = folder / name
        if f.is_file():
            h.update(b"\0" + name.encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()

"""What a model directory may name, and how its index must agree with its shards: one check per concern.

- `contained_file`: every file a checkpoint names lies inside its directory. A name is a plain relative
  path (no `..`, not absolute), and it resolves, symlinks followed, inside the directory -- or, for a
  Hugging Face hub cache snapshot (`.../snapshots/<rev>/`), inside that repository's `blobs/` folder,
  where the hub keeps the files its snapshot links point to.
- `read_index`: a shard index is an object whose `weight_map` is an object of tensor name -> file name,
  each file name passing `contained_file` and carrying the index's weight suffix.
- `check_index_agrees`: every tensor the index names is in the shard it names, and every tensor of a
  listed shard is named by the index (for that shard). Either mismatch is refused: which tensors a merge
  reads must not depend on which of two disagreeing descriptions one believes.
- `unlisted_shards`: weight files in the directory that the index does not list are reported with a
  warning and not read (Mistral-style repositories ship a `consolidated.safetensors` beside the HF shards).
- `read_config`: config.json, when present, is a JSON object.
- `require_tokenizer`: a directory that must be tokenised has tokenizer files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from ..errors import SoupError, short_repr
from .jsonsafe import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model",
                   "vocab.txt", "sentencepiece.bpe.model")


def _allowed_roots(root: Path) -> list[Path]:
    real = root.resolve()
    roots = [real]
    if root.parent.name == "snapshots":  # a hub cache snapshot: its links point into ../../blobs
        blobs = (root.parent.parent / "blobs").resolve()
        if blobs.is_dir():
            roots.append(blobs)
    return roots


def contained_file(root: Path, name: object, where: str) -> Path:
    """`root / name`, refused unless `name` is a relative path that stays (symlinks resolved) inside `root`."""
    if not isinstance(name, str) or not name:
        raise SoupError(f"{where}: a file name must be a non-empty string, got {short_repr(name)}")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or os.path.isabs(name):
        raise SoupError(f"{where} names {short_repr(name)}, which is outside the model directory {root}; refused")
    path = root / name
    real = path.resolve()
    if not any(real == r or real.is_relative_to(r) for r in _allowed_roots(root)):
        raise SoupError(f"{where} names {short_repr(name)}, which resolves to {real}, outside the model "
                        f"directory {root}; refused")
    return path


def read_index(index: Path, root: Path, suffix: str) -> dict[str, Path]:
    """The index's weight_map as tensor name -> shard path, every entry checked (see the module docstring)."""
    data = read_json(index, "shard index")
    if not isinstance(data, dict) or "weight_map" not in data:
        raise SoupError(f"{index} is not a valid shard index (no weight_map)")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise SoupError(f"{index}: weight_map must be an object of tensor name -> file, got {type(weight_map).__name__}")
    out: dict[str, Path] = {}
    checked: dict[str, Path] = {}  # each shard's name checked once (an index names a few files, many times)
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise SoupError(f"{index}: weight_map entry {short_repr(name)} must name a file, got {short_repr(file)}")
        if file not in checked:
            checked[file] = contained_file(root, file, str(index))
        if not file.endswith(suffix):
            raise SoupError(f"{index}: weight_map entry {short_repr(name)} names {short_repr(file)}, not a {suffix} file")
        out[name] = checked[file]
    for path in set(out.values()):
        if not path.is_file():
            raise SoupError(f"{index} names shard {path.name}, which is missing")
    return out


def check_index_agrees(index: Path, weight_map: Mapping[str, Path], stored: Mapping[Path, Iterable[str]]) -> None:
    """Refuse an index and shards that disagree about which tensor lives where."""
    where = {}
    for path, names in stored.items():
        for n in names:
            where[n] = path
    for name, path in weight_map.items():
        if where.get(name) != path:
            raise SoupError(f"{index} names tensor {short_repr(name)} in shard {path.name}, which lacks it")
    for name, path in where.items():
        if name not in weight_map:
            raise SoupError(f"{index} does not list tensor {short_repr(name)}, stored in shard {path.name}; "
                            "the index and its shards disagree")


def unlisted_shards(root: Path, listed: Iterable[Path], suffix: str, index: Path) -> list[Path]:
    """Weight files with `suffix` in `root` that the index does not list; each is named in a warning."""
    names = {p.name for p in listed}
    extra = sorted(p for p in root.glob(f"*{suffix}") if p.name not in names)
    for p in extra:
        print(f"souplm: warning: {p} is not listed in {index.name}; it is not read", file=sys.stderr)
    return extra


def read_config(path: Path) -> dict:
    """config.json as a dict ({} when absent); anything but a JSON object is a one-line SoupError."""
    if not path.is_file():
        return {}
    cfg = read_json(path, "model config")
    if not isinstance(cfg, dict):
        raise SoupError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def require_tokenizer(model_dir: Path, what: str = "evaluating it") -> None:
    """Refuse, in one line, a local model directory without tokenizer files when one is needed."""
    if model_dir.is_dir() and not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise SoupError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...), "
                        f"which {what} needs; copy the tokenizer files of one of its inputs into it")

"""Coefficient tables: per-unit mixing weights, the common currency of every soup.

A table maps keys to one weight per model. A key is, from most to least specific:

- a canonical tensor name (`model.layers.3.mlp.up_proj.weight`), for tensor-granularity soups;
- a soup-unit key (`layers.3.up`, `embed`, `lm_head`; see `souplm.arch.units`);
- `default`, for every tensor nothing else names.

A weight is a number, or a list with one number per output row (row-granularity soups). The table
overrides the recipe's per-model `weight`; whatever it does not name keeps the recipe's value. A
learned soup writes such a table and `souplm merge --coefficients table.json` applies it.

On disk (JSON):

    {"format": "souplm.coefficients/1",
     "models": ["/abs/path/to/A", "/abs/path/to/B"],
     "model_hashes": ["<sha256 of A's weights>", "<sha256 of B's weights>"],
     "coefficients": {"layers.0.q": [0.31, 0.69], "embed": [0.5, 0.5]},
     "meta": {"source": "souplm learn", ...}}

Column i belongs to model i of `models`. A table is matched to a recipe by identity, not by count
(`aligned_to`): by content hash (`souplm.io.checkpoint.content_hash`) when the table records them, so a
table learned for (B, A) is reordered for a recipe of (A, B), and a table for other models is refused;
an older table without `model_hashes` is matched by path, else applied by position with a warning.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..arch.units import parse_unit_key, unit_of
from ..errors import SoupError

FORMAT = "souplm.coefficients/1"


@dataclass
class CoefficientTable:
    models: list[str]
    coefficients: dict[str, list] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    model_hashes: list[str] | None = None  # content hash of each model, in column order

    def __post_init__(self) -> None:
        if not isinstance(self.models, list) or not all(isinstance(m, str) for m in self.models):
            raise SoupError("coefficient table: models must be a list of paths")
        if self.model_hashes is not None and (
                not isinstance(self.model_hashes, list) or len(self.model_hashes) != len(self.models)
                or not all(isinstance(h, str) for h in self.model_hashes)):
            raise SoupError("coefficient table: model_hashes must list one hash (a string) per model")
        for key, value in self.coefficients.items():
            self._check_entry(key, value)

    @classmethod
    def identified(cls, models: list[str], coefficients: dict, meta: dict | None = None) -> CoefficientTable:
        """A table that names its models by absolute path and content hash (what `learn` writes)."""
        from ..io.checkpoint import content_hash

        paths = [os.path.abspath(m) if Path(m).exists() else m for m in models]
        return cls(paths, coefficients, meta or {}, [_hash_or_empty(m, content_hash) for m in models])

    def aligned_to(self, models: list[str | os.PathLike]) -> tuple[CoefficientTable, str | None]:
        """This table with its columns in the order of `models` (the recipe's), and a note when it had to
        reorder or could only trust the position. Refuses a table made for other models."""
        from ..io.checkpoint import content_hash

        n = len(models)
        if self.n_models != n:
            raise SoupError(f"coefficient table has weights for {self.n_models} models "
                            f"({', '.join(self.models)}); the recipe merges {n}")
        if self.model_hashes and all(self.model_hashes):
            mine = [_hash_or_empty(str(m), content_hash) for m in models]
            order = _match(mine, list(self.model_hashes))
            if order is None:
                missing = next(m for m, h in zip(models, mine) if h not in self.model_hashes)
                raise SoupError(f"coefficient table was learned for {', '.join(self.models)}; recipe model {missing} "
                                "is not one of them (its weights' content hash matches none of the table's)")
            return self._reordered(order, "content hash")
        # an older table: by path where every path matches, else by position
        mine = [os.path.abspath(str(m)) for m in models]
        order = _match(mine, [os.path.abspath(m) for m in self.models])
        note = ("coefficient table names no model content hashes (an older table): matched to the recipe's "
                "models by path")
        if order is None:
            note = ("coefficient table names no model content hashes and its paths "
                    f"({', '.join(self.models)}) are not the recipe's: applied by position, column i to model i")
            order = list(range(n))
        table, _ = self._reordered(order, "path")
        return table, note

    def _reordered(self, order: list[int], by: str) -> tuple[CoefficientTable, str | None]:
        if order == list(range(len(order))):
            return self, None
        table = CoefficientTable([self.models[j] for j in order],
                                 {k: [v[j] for j in order] for k, v in self.coefficients.items()},
                                 self.meta, None if self.model_hashes is None else [self.model_hashes[j] for j in order])
        return table, f"coefficient table columns reordered to the recipe's model order (matched by {by})"

    @property
    def n_models(self) -> int:
        return len(self.models)

    def _check_entry(self, key: str, value) -> None:
        if not key.startswith(("model.", "lm_head.")) and key != "default":
            try:
                parse_unit_key(key)
            except ValueError as e:
                raise SoupError(f"coefficient table: {e}") from None
        if not isinstance(value, (list, tuple)) or len(value) != self.n_models:
            raise SoupError(
                f"coefficient table: entry {key!r} must list one weight per model ({self.n_models})"
            )
        flat = [v for w in value for v in (w if isinstance(w, (list, tuple)) else [w])]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in flat):
            raise SoupError(f"coefficient table: entry {key!r} has a non-finite or non-numeric weight")

    def lookup(self, canonical: str) -> np.ndarray | None:
        """Weights for one canonical tensor: float32, shape [N] or [N, rows]; None when the table is silent."""
        for key in (canonical, unit_of(canonical).key, "default"):
            if key in self.coefficients:
                return np.asarray(self.coefficients[key], dtype=np.float32)
        return None

    def to_dict(self) -> dict:
        out: dict = {"format": FORMAT, "models": self.models}
        if self.model_hashes is not None:
            out["model_hashes"] = self.model_hashes
        return {**out, "coefficients": self.coefficients, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves half a table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CoefficientTable:
        path = Path(path)
        if not path.is_file():
            raise SoupError(f"coefficient table not found: {path}")
        from ..io.jsonsafe import read_json

        data = read_json(path, "coefficient table")  # bounded in size and nesting; one-line errors
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SoupError(f"coefficient table {path}: expected \"format\": \"{FORMAT}\"")
        try:
            if not isinstance(data["coefficients"], dict) or not isinstance(data.get("meta", {}), dict):
                raise SoupError("coefficients and meta must be mappings")
            return cls(data["models"], dict(data["coefficients"]), dict(data.get("meta", {})), data.get("model_hashes"))
        except KeyError as e:
            raise SoupError(f"coefficient table {path}: missing key {e}") from None
        except SoupError as e:
            raise SoupError(f"{path}: {e}") from None


def _hash_or_empty(model: str, content_hash) -> str:
    """A model's content hash; "" for what has no local weight files (a Hub id not yet fetched, an adapter spec)."""
    try:
        return content_hash(model) if Path(model).exists() else ""
    except (SoupError, OSError):
        return ""


def _match(mine: list[str], theirs: list[str]) -> list[int] | None:
    """order such that theirs[order[i]] == mine[i], each column used once; None if no such order."""
    free = list(range(len(theirs)))
    order = []
    for key in mine:
        j = next((j for j in free if key and theirs[j] == key), None)
        if j is None:
            return None
        free.remove(j)
        order.append(j)
    return order

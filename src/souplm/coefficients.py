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
     "models": ["path/to/A", "path/to/B"],
     "coefficients": {"layers.0.q": [0.31, 0.69], "embed": [0.5, 0.5]},
     "meta": {"source": "souplm learn", ...}}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arch.units import parse_unit_key, unit_of
from .errors import SoupError

FORMAT = "souplm.coefficients/1"


@dataclass
class CoefficientTable:
    models: list[str]
    coefficients: dict[str, list] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.coefficients.items():
            self._check_entry(key, value)

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
        return {"format": FORMAT, "models": self.models, "coefficients": self.coefficients, "meta": self.meta}

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
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SoupError(f"coefficient table {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SoupError(f"coefficient table {path}: expected \"format\": \"{FORMAT}\"")
        try:
            return cls(list(data["models"]), dict(data["coefficients"]), dict(data.get("meta", {})))
        except KeyError as e:
            raise SoupError(f"coefficient table {path}: missing key {e}") from None
        except SoupError as e:
            raise SoupError(f"{path}: {e}") from None

"""Granularity: which learnable alpha a canonical tensor answers to.

Each tensor of the language model belongs to one *group*; all tensors of a group share one alpha
(one per output row for `row`). From coarsest to finest:

    model          one alpha for the whole LM (a vanilla soup, but learned)     group `model`
    layer          one per decoder layer; embed, final_norm, lm_head alone     `layers.3`, `embed`
    mapping        one per mapping kind, shared by every layer                 `layers.*.q`, `embed`
    layer_mapping  one per soup unit: the paper's per-mapping soup (default)   `layers.3.q`, `embed`
    tensor         one per tensor (a bias apart from its weight)               canonical tensor name
    row            one per output row (dim 0) of every tensor                  canonical tensor name

Coefficient tables are keyed by soup unit for the first four (every unit listed, so a table is
readable without knowing the granularity) and by canonical tensor name for `tensor` and `row`.
"""

from __future__ import annotations

from ..arch.units import unit_of

GRANULARITIES: tuple[str, ...] = ("model", "layer", "mapping", "layer_mapping", "tensor", "row")


def group_of(canonical: str, granularity: str) -> str:
    """Name of the alpha group a canonical LM tensor uses."""
    unit = unit_of(canonical)
    if granularity == "model":
        return "model"
    if granularity == "layer":
        return unit.key if unit.layer is None else f"layers.{unit.layer}"
    if granularity == "mapping":
        return unit.key if unit.layer is None else f"layers.*.{unit.mapping}"
    if granularity == "layer_mapping":
        return unit.key
    if granularity in ("tensor", "row"):
        return canonical
    raise ValueError(f"unknown granularity {granularity!r}")


def table_key(canonical: str, granularity: str) -> str:
    """Key of the coefficient-table entry that carries this tensor's alpha."""
    return canonical if granularity in ("tensor", "row") else unit_of(canonical).key


def rows_of(shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """Row shape of a tensor's alpha: `(shape[0],)` for row granularity, else `()`."""
    return (int(shape[0]),) if granularity == "row" and len(shape) >= 1 else ()

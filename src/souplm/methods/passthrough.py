"""Passthrough: one model's tensors, unchanged or times a `scale` (mergekit 0.1.5's `passthrough`).

    out = scale * theta          (scale unset: theta itself)

`scale` is usually given with filters, e.g. `[{filter: o_proj, value: 0.0}, {value: 1.0}]`. This is
the per-tensor method; stacking layer ranges of several models (`slices:`) is the recipe's business.
Stated as a Form (a weighted sum of one model, weight `scale`): the fused executor copies and scales in
one pass; a scale of 1 writes the input's values exactly (x * 1 = x, rounded to the output dtype).
"""

from __future__ import annotations

import numpy as np

from .form import Form
from .registry import ParamSpec, register


@register(
    "passthrough",
    specs={"scale": ParamSpec(float)},
    needs_base=False,
    forbids_base=True,
    min_models=1,
    max_models=1,
    model_params={"scale": 1.0},
    row_weights=False,
    reference="mergekit 0.1.5 merge_methods/passthrough.py",
)
def passthrough(scale) -> Form:
    """The one model's tensor, times its scale (1: unchanged)."""
    return Form(np.asarray(scale, dtype=np.float32).reshape(-1))

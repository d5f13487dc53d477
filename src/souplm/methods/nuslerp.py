"""NuSLERP: mergekit's SLERP of two models by their weights, optionally of task vectors and row by row.

With v_i the two models' tensors (or, given a base model, their task vectors theta_i - base), and
t = w_2 / (w_1 + w_2) (0.5 when |w_1 + w_2| < 1e-6):

    cos O = <v_1 / max(|v_1|, 1e-7), v_2 / max(|v_2|, 1e-7)>, clamped to [-1, 1]
    out   = sin((1-t) O) / sin O * v_1 + sin(t O) / sin O * v_2     (then + base)
    out   = (1-t) v_1 + t v_2  where 1 - cos^2 O <= 1e-16 (parallel or antiparallel)

The vectors are the whole flattened tensors (`nuslerp_flatten: true`, the default), else each vector
along the last axis (one SLERP per row), or along axis 0 with `nuslerp_row_wise: true` (one per column
of a matrix; a 1-D tensor is one vector either way). `nuslerp_row_wise` only acts when
`nuslerp_flatten` is false, as in mergekit.

The result is a linear combination of v_1 and v_2 whose two coefficients depend only on the Gram matrix
of each vector pair: `coefficients_from_gram`. Whole tensors are a Form (weights from the Gram matrix of the models or, with a
base, of their task vectors: both executors, two reads of the inputs); rows and columns are `nuslerp_torch`
(one Gram matrix per vector, then the weighted sum).
"""

from __future__ import annotations

import numpy as np

from ..errors import SoupError
from .form import Form
from .gram import coefficient_weights, gram, gram_along
from .linear import weighted_sum
from .registry import ParamSpec, register
from .task_arithmetic import add_to_base, task_vectors

NORM_FLOOR = 1e-7  # a vector's norm is clamped to this before normalizing
PARALLEL_EPS = 1e-8  # parallel when 1 - cos^2 <= PARALLEL_EPS^2: plain interpolation


def interpolation_t(weight: np.ndarray) -> float:
    """Model 2's share t = w_2 / (w_1 + w_2); 0.5 when the weights sum to (nearly) zero."""
    total = float(weight[0]) + float(weight[1])
    return 0.5 if abs(total) < 1e-6 else float(weight[1]) / total


def coefficients_from_gram(gram: np.ndarray, t: float) -> np.ndarray:
    """Coefficients [..., 2] of (v_1, v_2) from Gram matrices [..., 2, 2] (float64)."""
    g = np.asarray(gram, dtype=np.float64)
    n1 = np.maximum(np.sqrt(np.maximum(g[..., 0, 0], 0.0)), NORM_FLOOR)
    n2 = np.maximum(np.sqrt(np.maximum(g[..., 1, 1], 0.0)), NORM_FLOOR)
    cos = np.clip(g[..., 0, 1] / (n1 * n2), -1.0, 1.0)
    parallel = (1.0 - cos * cos) <= PARALLEL_EPS**2
    theta = np.arccos(np.where(parallel, 0.0, cos))
    sin = np.where(parallel, 1.0, np.sin(theta))
    c1 = np.where(parallel, 1.0 - t, np.sin((1.0 - t) * theta) / sin)
    c2 = np.where(parallel, t, np.sin(t * theta) / sin)
    return np.stack([c1, c2], axis=-1)


def nuslerp_torch(tensors, base, weight, nuslerp_flatten=True, nuslerp_row_wise=False):
    """The torch statement, for what the Form cannot state: per-row/column SLERPs (and, called directly, any case)."""
    import torch

    if weight.dim() != 1:
        raise SoupError("nuslerp takes one weight per model, not per row")
    t = interpolation_t(weight.double().cpu().numpy())
    vs = task_vectors(tensors, base) if base is not None else tensors
    if nuslerp_flatten or vs[0].dim() <= 1:
        coef = torch.from_numpy(coefficients_from_gram(gram(vs), t))
    else:
        dim = 0 if nuslerp_row_wise else -1
        coef = coefficient_weights(coefficients_from_gram(gram_along(vs, dim), t), dim, vs[0].dim())
        coef = coef.to(device=vs[0].device, dtype=torch.float32)
    out = weighted_sum(vs, coef)
    return add_to_base(out, base, 1.0) if base is not None else out


@register(
    "nuslerp",
    specs={
        "weight": ParamSpec(float),
        "nuslerp_flatten": ParamSpec(bool),
        "nuslerp_row_wise": ParamSpec(bool),
    },
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
    model_params={"weight": 1.0},
    global_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
    required=("weight",),
    row_weights=False,
    torch=nuslerp_torch,
    reference="mergekit 0.1.5 merge_methods/nuslerp.py; Shoemake 1985 (SLERP)",
)
def nuslerp(weight, nuslerp_flatten=True, nuslerp_row_wise=False, has_base=False) -> Form | None:
    """SLERP of two models (or task vectors) by t = w_2 / (w_1 + w_2), whole-tensor or per row/column."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 1:
        raise SoupError("nuslerp takes one weight per model, not per row")
    if not nuslerp_flatten:
        return None  # one Gram matrix per row or column: nuslerp_torch
    t = interpolation_t(w)
    return Form(np.array([1 - t, t], np.float32), use_base=has_base,
                reweigh=lambda g: coefficients_from_gram(g, t).astype(np.float32))

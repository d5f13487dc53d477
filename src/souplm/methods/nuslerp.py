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
of each vector pair: `coefficients_from_gram`. Whole tensors are a Form (weights from the Gram matrix of the
models or, with a base, of their task vectors); rows and columns are a Program (methods/program.py: one pass
sums each vector's three dot products in float64, a second forms c_1 v_1 + c_2 v_2 with one pair of
coefficients per vector). Both run on either executor, two reads of the inputs.
"""

from __future__ import annotations

import numpy as np

from ..errors import SoupError
from .form import Form
from .program import Ops, Program
from .registry import ParamSpec, register

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


def vectors_program(t: float, has_base: bool, along_first: bool) -> Program:
    """NuSLERP per vector: along the last axis (each row), or along axis 0 (each column)."""
    n_in = 3 if has_base else 2

    def terms(ops: Ops) -> list[int]:
        return [ops.sub(ops.input(i), ops.input(2)) if has_base else ops.input(i) for i in range(2)]

    def body(sweep, compute):
        ops = Ops(n_in)
        v = terms(ops)
        for i, j in ((0, 0), (1, 1), (0, 1)):
            ops.sum(ops.mul(v[i], v[j], exact=True))
        g11, g22, g12 = sweep(ops)  # one value per vector
        gram = np.stack([np.stack([g11, g12], -1), np.stack([g12, g22], -1)], -2)  # [vectors, 2, 2]
        coef = coefficients_from_gram(gram, t).astype(np.float32)
        ops = Ops(n_in)
        v = terms(ops)
        out = ops.add(ops.mul(v[0], ops.vector_const(coef[:, 0])), ops.mul(v[1], ops.vector_const(coef[:, 1])))
        ops.store(ops.add(out, ops.input(2)) if has_base else out)
        sweep(ops)

    return Program(body, axis=0 if along_first else -1)


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
    reference="mergekit 0.1.5 merge_methods/nuslerp.py; Shoemake 1985 (SLERP)",
)
def nuslerp(weight, nuslerp_flatten=True, nuslerp_row_wise=False, has_base=False) -> Form | Program:
    """SLERP of two models (or task vectors) by t = w_2 / (w_1 + w_2), whole-tensor or per row/column."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 1:
        raise SoupError("nuslerp takes one weight per model, not per row")
    t = interpolation_t(w)
    if not nuslerp_flatten:  # one Gram matrix per row or column
        return vectors_program(t, has_base, bool(nuslerp_row_wise))
    return Form(np.array([1 - t, t], np.float32), use_base=has_base,
                reweigh=lambda g: coefficients_from_gram(g, t).astype(np.float32))

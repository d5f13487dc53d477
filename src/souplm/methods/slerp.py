"""SLERP: spherical linear interpolation between two models, tensor by tensor."""

from __future__ import annotations

import math

import numpy as np

from ..errors import SoupError
from .form import Form
from .registry import register

DOT_THRESHOLD = 0.9995  # above this |cos|, the two are treated as parallel (mergekit 0.1.5's threshold)


def slerp_coefficients(gram: np.ndarray, t: float, epsilon: float) -> np.ndarray:
    """The two weights of SLERP from the tensors' Gram matrix: sin((1-t)O)/sin(O) and sin(tO)/sin(O), O the
    angle between them. As mergekit 0.1.5: a norm at or below epsilon counts as 1 (so a zero tensor sits at
    a right angle to the other), and |cos O| > 0.9995 falls back to lerp, (1-t, t)."""
    na, nb = math.sqrt(gram[0, 0]), math.sqrt(gram[1, 1])
    na, nb = na if na > epsilon else 1.0, nb if nb > epsilon else 1.0
    cos = min(1.0, max(-1.0, gram[0, 1] / (na * nb)))
    if abs(cos) > DOT_THRESHOLD:
        return np.array([1 - t, t], np.float32)
    omega = math.acos(cos)
    s = math.sin(omega)
    return np.array([math.sin((1 - t) * omega) / s, math.sin(t * omega) / s], np.float32)


@register(
    "slerp",
    needs_base=False,
    min_models=2,
    max_models=2,
    model_params={"weight": 1.0},
    global_params={"t": None, "epsilon": 1e-8},
    row_weights=False,
    required=("t",),  # as mergekit's; a coefficient table's per-model weights state it instead
    table_states=("t",),
    reference="Shoemake 1985, 'Animating rotation with quaternion curves'",
)
def slerp(weight, t=None, epsilon=1e-8) -> Form:
    """sin((1-t)O)/sin(O) a + sin(tO)/sin(O) b, O the angle between a and b; t = share of model 2."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 1:
        raise SoupError("slerp takes one weight per model, not per row")
    if t is None:  # from per-model weights (a coefficient table, which the plan allows only without t)
        t = float(weight[1] / weight.sum())
    t, eps = float(t), float(epsilon)
    return Form(np.array([1 - t, t], np.float32), reweigh=lambda g: slerp_coefficients(g, t, eps))

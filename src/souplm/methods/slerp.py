"""SLERP: spherical linear interpolation between two models, tensor by tensor."""

from __future__ import annotations

import math

from ..errors import SoupError
from .linear import weighted_sum
from .registry import register


@register(
    "slerp",
    needs_base=False,
    min_models=2,
    max_models=2,
    model_params={"weight": 1.0},
    global_params={"t": None, "epsilon": 1e-8},
    row_weights=False,
    reference="Shoemake 1985, 'Animating rotation with quaternion curves'",
)
def slerp(tensors, base, weight, t=None, epsilon=1e-8):
    """sin((1-t)O)/sin(O) a + sin(tO)/sin(O) b, O the angle between a and b; t = share of model 2."""
    import torch

    if weight.dim() != 1:
        raise SoupError("slerp takes one weight per model, not per row")
    if t is None:  # from per-model weights (a coefficient table): t is model 2's share
        t = float(weight[1] / weight.sum())
    a, b = tensors
    na, nb = a.norm(), b.norm()
    if na < epsilon or nb < epsilon:
        return weighted_sum(tensors, torch.tensor([1 - t, t]))
    cos = float(((a / na) * (b / nb)).sum().clamp(-1.0, 1.0))
    omega = math.acos(cos)
    if abs(math.sin(omega)) < 1e-6:  # (anti)parallel: the arc degenerates, fall back to lerp
        return weighted_sum(tensors, torch.tensor([1 - t, t]))
    s = math.sin(omega)
    return weighted_sum(tensors, torch.tensor([math.sin((1 - t) * omega) / s, math.sin(t * omega) / s]))

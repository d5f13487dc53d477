"""TIES merging: trim task vectors to their largest entries, elect a sign, average those that agree."""

from __future__ import annotations

from .form import Form, as_weights
from .registry import register
from .steps import elect_and_merge, kth_largest, trim_all, trim_to_density

__all__ = ["elect_and_merge", "kth_largest", "ties", "trim_all", "trim_to_density"]


@register(
    "ties",
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"lambda": 1.0, "normalize": True},
    required=("weight",),
    native_dtype=True,
    reference="https://arxiv.org/abs/2306.01708",
)
def ties(weight, density, normalize=True, lam=1.0) -> Form:
    """base + lambda * disjoint_mean(elect_sign(trim(theta_i - base, density_i)))."""
    return Form(as_weights(weight), use_base=True, elect=True, normalize=normalize, lam=lam,
                trim=[float(p) for p in density])

"""Task arithmetic: add weighted task vectors (theta_i - base) to the base."""

from __future__ import annotations

from .form import Form, as_weights
from .registry import register
from .steps import add_to_base, task_vectors

__all__ = ["add_to_base", "task_arithmetic", "task_vectors"]


@register(
    "task_arithmetic",
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},
    global_params={"lambda": 1.0, "normalize": False},
    required=("weight",),
    native_dtype=True,
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(weight, normalize=False, lam=1.0) -> Form:
    """theta_base + lambda * sum_i w_i (theta_i - theta_base)."""
    return Form(as_weights(weight), use_base=True, normalize=normalize, lam=lam)

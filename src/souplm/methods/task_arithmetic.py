"""Task arithmetic: add weighted task vectors (theta_i - base) to the base."""

from __future__ import annotations

from .linear import normalized, weighted_sum
from .registry import register


def task_vectors(tensors, base):
    """theta_i - base, in place: the engine hands each method fresh copies it may overwrite."""
    return [t.sub_(base) for t in tensors]


def add_to_base(merged, base, lam):
    """base + lam * merged, written into `merged` (the method's own buffer): no fresh temporaries."""
    if lam != 1.0:
        merged.mul_(lam)
    return merged.add_(base)


@register(
    "task_arithmetic",
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},
    global_params={"lambda": 1.0, "normalize": False},
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(tensors, base, weight, normalize=False, **g):
    """theta_base + lambda * sum_i w_i (theta_i - theta_base)."""
    w = normalized(weight) if normalize else weight
    return add_to_base(weighted_sum(task_vectors(tensors, base), w), base, g.get("lambda", 1.0))

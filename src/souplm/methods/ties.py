"""TIES merging: trim task vectors to their largest entries, elect a sign, average those that agree."""

from __future__ import annotations

import torch

from .registry import broadcast, register
from .task_arithmetic import task_vectors


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `density` fraction of entries with the largest magnitude.

    A k-th value threshold (selection, O(n)) replaces a full sort; entries tied with the threshold
    are all kept. Non-negative floats order like their int32 bit patterns, and integer selection is
    about twice as fast, so the threshold is found on that view.
    """
    if density >= 1.0:
        return delta
    n = delta.numel()
    k = round(density * n)
    if k <= 0:
        return delta.zero_()
    mag = delta.abs()
    bits = mag.view(torch.int32) if mag.dtype == torch.float32 else mag
    threshold = bits.reshape(-1).kthvalue(n - k + 1).values
    return torch.where(bits >= threshold, delta, 0.0)  # where beats masked_fill_ on CPU


def elect_and_merge(deltas: list[torch.Tensor], weight: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Sign election and disjoint (weighted) mean of task vectors.

    sign = sign(sum_i w_i d_i); model i agrees at an entry when w_i d_i has that sign (and d_i != 0);
    the result is sum over agreeing i of w_i d_i, divided by the agreeing weight mass when normalizing.
    Written as running sums so that no [N, ...] stack is materialised.
    """
    w = broadcast(weight, deltas[0])
    sign = torch.zeros_like(deltas[0])
    for d, wi in zip(deltas, w):
        sign.addcmul_(d, wi)
    sign.sign_()
    merged = torch.zeros_like(sign)
    mass = torch.zeros_like(sign) if normalize else None
    for d, wi in zip(deltas, w):
        wd = d * wi
        agree = (wd * sign) > 0  # same sign as elected and non-zero
        merged.add_(torch.where(agree, wd, 0.0))
        if mass is not None:
            mass.add_(agree * wi)
    if mass is not None:
        merged.div_(torch.where(mass == 0, 1.0, mass))
    return merged
@register(
    "ties",
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"lambda": 1.0, "normalize": True},
    reference="https://arxiv.org/abs/2306.01708",
)
def ties(tensors, base, weight, density, normalize=True, **g):
    """base + lambda * disjoint_mean(elect_sign(trim(theta_i - base, density_i)))."""
    deltas = [trim_to_density(d, float(p)) for d, p in zip(task_vectors(tensors, base), density)]
    return base + g.get("lambda", 1.0) * elect_and_merge(deltas, weight, normalize)

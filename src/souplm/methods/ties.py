"""TIES merging: trim task vectors to their largest entries, elect a sign, average those that agree."""

from __future__ import annotations

import torch

from .registry import broadcast, register
from .task_arithmetic import task_vectors


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `density` fraction of entries with the largest magnitude.

    A k-th value threshold (selection, O(n)) replaces a full sort; entries tied with the threshold
    are all kept.
    """
    if density >= 1.0:
        return delta
    n = delta.numel()
    k = int(round(density * n))
    if k <= 0:
        return torch.zeros_like(delta)
    mag = delta.abs().reshape(-1)
    threshold = mag.kthvalue(n - k + 1).values
    return delta * (delta.abs() >= threshold)


def elect_and_merge(deltas: torch.Tensor, weight: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Sign election and disjoint (weighted) mean over stacked deltas [N, ...]."""
    w = broadcast(weight, deltas[0])
    weighted = deltas * w
    sign = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(weighted) == sign) & (deltas != 0)
    merged = (weighted * agree).sum(dim=0)
    if normalize:
        # divide by the weight mass of the models that agree at each entry; 0/0 -> 0
        mass = (w * agree).sum(dim=0)
        merged = torch.where(mass != 0, merged / torch.where(mass != 0, mass, 1.0), 0.0)
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
    deltas = torch.stack([trim_to_density(d, float(p)) for d, p in zip(task_vectors(tensors, base), density)])
    return base + g.get("lambda", 1.0) * elect_and_merge(deltas, weight, normalize)

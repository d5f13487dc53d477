"""Model Breadcrumbs: drop the largest `gamma` fraction of each task vector (outliers) and the smallest
entries, keeping a `density` fraction; then task arithmetic (`breadcrumbs`) or TIES election
(`breadcrumbs_ties`).

Per tensor (flattened, mergekit 0.1.5's ranking): with n entries, keep = int(density * n), top =
int(gamma * n), the entries of ascending-magnitude rank [n - keep - top, n - top) survive (the outlier
cut shrinks when keep + top > n). density >= 1 leaves the task vector whole (gamma is then not applied).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .gta import combine, keep_positions, l1_rescaled, lam_of, values
from .registry import ParamSpec, register
from .task_arithmetic import task_vectors

if TYPE_CHECKING:
    import torch

SPECS = {
    "gamma": ParamSpec(float, 0.0, 1.0),
    "rescale": ParamSpec(bool),
}


def outlier_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """[lo, hi) in ascending-magnitude rank of the entries a breadcrumbs trim keeps, out of n."""
    keep, top = int(density * n), int(gamma * n)
    lo = max(0, n - keep - top)
    return lo, lo + keep


def breadcrumb(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Keep the entries of `delta` inside the outlier window, in place (L1-rescaled with `rescale`)."""
    if density >= 1.0:
        return delta
    import torch

    from ..io import pool

    lo, hi = outlier_window(delta.numel(), density, gamma)
    mag = torch.abs(delta, out=pool.empty_like(delta))
    keep = keep_positions(mag, lo, hi).view(delta.shape)
    pool.release(mag)
    return l1_rescaled(delta, keep, rescale)


def _trimmed(tensors, base, density, gamma, rescale):
    return [breadcrumb(d, p, g, rescale)
            for d, p, g in zip(task_vectors(tensors, base), values(density), values(gamma))]


CONTRACT = {
    "specs": SPECS,
    "needs_base": True,
    "min_models": 1,
    "max_models": None,
    "model_params": {"weight": 1.0, "density": 1.0, "gamma": 0.01},
    "required": ("weight",),
    "reference": "https://arxiv.org/abs/2312.06795",
}


@register("breadcrumbs", global_params={"lambda": 1.0, "normalize": False, "rescale": False}, **CONTRACT)
def breadcrumbs(tensors, base, weight, density, gamma, normalize=False, rescale=False, **g):
    """base + lambda * sum_i w_i breadcrumb(theta_i - base; density_i, gamma_i)."""
    deltas = _trimmed(tensors, base, density, gamma, rescale)
    return combine(deltas, base, weight, False, normalize, lam_of(g))


@register("breadcrumbs_ties", global_params={"lambda": 1.0, "normalize": False, "rescale": False}, **CONTRACT)
def breadcrumbs_ties(tensors, base, weight, density, gamma, normalize=False, rescale=False, **g):
    """base + lambda * disjoint_sum(elect_sign(w_i breadcrumb(theta_i - base; density_i, gamma_i)))."""
    deltas = _trimmed(tensors, base, density, gamma, rescale)
    return combine(deltas, base, weight, True, normalize, lam_of(g))

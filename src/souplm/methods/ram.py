"""RAM (Reinforced Agent Merging) and RAM+ tensor-local (mergekit 0.1.5's `ram`, `ramplus_tl`).

Task vectors d_i = theta_i - base; an entry of model i counts when |d_ij| > epsilon (default 1e-5);
c_j is how many models' entries count at j. An entry only one model changed is kept whole, an entry
several changed is their mean, an entry none changed stays the base's:

    ram:         out_j = base_j + sum_i [counts_ij] d_ij / max(c_j, 1)

RAM+ (tensor-local) rescales each model's unique entries by how much of its change it shares: with
shared_i = #{j: counts_ij, c_j > 1} and unique_i = #{j: counts_ij, c_j = 1} over this tensor,

    rho_i    = shared_i / max(unique_i, epsilon)
    lambda_i = 1 + r clamp(rho_i, 0, alpha)                      (r = 0.1, alpha = 0.2 by default)
    out_j    = base_j + sum_i [counts_ij] d_ij (lambda_i if c_j = 1 else 1 / c_j)

No weights: every model counts the same. Passes over each task vector: one to count, one (RAM+: two)
to sum; not a linear combination (the masks are per entry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..io import pool
from .registry import ParamSpec, register
from .steps import rounder, task_vectors

if TYPE_CHECKING:
    import torch


def _counted(d: torch.Tensor, epsilon: float, mask: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """mask = |d| > epsilon (into the given bool buffer; `scratch` holds |d|)."""
    import torch

    return torch.gt(torch.abs(d, out=scratch), epsilon, out=mask)


def ram_merge(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float, r: float | None = None,
              alpha: float | None = None, compute: str = "F32") -> torch.Tensor:
    """base + sum_i [|d_i| > eps] d_i / max(c, 1), RAM+'s unique entries times lambda_i when r is given.
    Consumes the tensors (overwritten in place). `compute` "BF16"/"F16": the inputs, each difference, each
    share and the results rounded as mergekit's ops in that dtype round them (RAM only; the sum over models
    accumulates in float32, as a torch reduction does)."""
    import torch

    rnd = rounder(compute) if r is None else None
    deltas = task_vectors(tensors, base, rnd)
    like = deltas[0]
    scratch = pool.empty_like(like)
    mask = pool.empty(tuple(like.shape), torch.bool)
    count = pool.empty_like(like).zero_()
    for d in deltas:  # c_j, the number of models whose entry j counts
        count.add_(_counted(d, epsilon, mask, scratch))
    unique = torch.eq(count, 1.0, out=pool.empty(tuple(like.shape), torch.bool)) if r is not None else None
    divisor = count.clamp_(min=1.0)  # max(c, 1): entries of one contributor divide by 1, exactly
    out = None
    for d in deltas:
        counted = _counted(d, epsilon, mask, scratch)
        d.mul_(counted).div_(divisor)  # the model's share of every entry it counts at
        if rnd is not None:
            rnd(d)
        if unique is not None:
            lam = ramplus_lambda(counted, unique, epsilon, r, alpha)
            d.mul_(torch.where(unique, lam, torch.ones((), dtype=d.dtype, device=d.device), out=scratch))
        out = d if out is None else out.add_(d)
    for t in (scratch, mask, count, unique):
        if t is not None:
            pool.release(t)
    if rnd is not None:
        rnd(out)
    out.add_(base)
    return out if rnd is None else rnd(out)


def ramplus_lambda(counted: torch.Tensor, unique: torch.Tensor, epsilon: float, r: float,
                   alpha: float) -> torch.Tensor:
    """lambda_i = 1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha) (float32 arithmetic, as mergekit)."""
    import torch

    n_counted = int(torch.count_nonzero(counted))
    n_unique = int(torch.count_nonzero(counted & unique))
    shared = torch.tensor(float(n_counted - n_unique), dtype=torch.float32)
    rho = shared / torch.tensor(max(float(n_unique), epsilon), dtype=torch.float32)
    return (1.0 + r * rho.clamp(0.0, alpha)).to(device=counted.device)


@register(
    "ram",
    specs={"epsilon": ParamSpec(float, 0.0, None)},
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does (its recipes often set it)
    global_params={"epsilon": 1e-5},
    native_dtype=True,  # mergekit computes it in the recipe's dtype: every step of a bf16 recipe rounds to bf16
    reference="https://arxiv.org/abs/2601.13572 (mergekit 0.1.5)",
)
def ram(tensors, base, weight=None, epsilon=1e-5, compute="F32"):
    """base + per entry: the one model's change where only one changed it, their mean where several did."""
    return ram_merge(tensors, base, float(epsilon), compute=compute)


@register(
    "ramplus_tl",
    specs={
        "r": ParamSpec(float, 0.0, None),
        "alpha": ParamSpec(float, 0.0, None),
        "epsilon": ParamSpec(float, 0.0, None, lo_open=True),
    },
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does
    global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    reference="https://arxiv.org/abs/2601.13572 (mergekit 0.1.5)",
)
def ramplus_tl(tensors, base, weight=None, r=0.1, alpha=0.2, epsilon=1e-5):
    """RAM with each model's unique entries scaled by 1 + r min(shared/unique, alpha) (tensor-local)."""
    return ram_merge(tensors, base, float(epsilon), float(r), float(alpha))

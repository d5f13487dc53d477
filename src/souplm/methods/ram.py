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

No weights: every model counts the same. Not a linear combination (the masks are per entry).

Computed in the tensors' dtype (the recipe's, engine/precision.py) with mergekit's operations: each task
vector and each share d_ij / c_j rounded to it, the sum over models accumulated in float32 and rounded
once (a torch reduction), then the base added. RAM+ follows mergekit's type promotion: lambda_i is float32,
so the unique entries' products, the sum over models and the sum with the base are float32 (rounded to
the output dtype when written). Passes over each task vector: the subtraction, one to count, two to form
its share and add it (RAM+: two more, its two counts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..io import pool
from .registry import ParamSpec, register

if TYPE_CHECKING:
    import torch


def _counted(d: torch.Tensor, epsilon: float, mask: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """mask = |d| > epsilon (into the given bool buffer; `scratch` holds |d|). The comparison is torch's in
    d's dtype (epsilon rounded to it), as mergekit's."""
    import torch

    return torch.gt(torch.abs(d, out=scratch), epsilon, out=mask)


def ram_merge(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float, r: float | None = None,
              alpha: float | None = None) -> torch.Tensor:
    """base + sum_i [|d_i| > eps] d_i / max(c, 1), RAM+'s unique entries times lambda_i when r is given.
    Consumes the tensors (overwritten in place); computes in their dtype, as mergekit does (RAM+: the
    result is float32, as mergekit's)."""
    import torch

    deltas = [t.sub_(base) for t in tensors]
    like = deltas[0]
    shape = tuple(like.shape)
    scratch = pool.empty_like(like)
    mask = pool.empty(shape, torch.bool, like.device)
    count = pool.empty_like(like).zero_()  # small whole numbers: exact in any float dtype
    for d in deltas:  # c_j, the number of models whose entry j counts
        count.add_(_counted(d, epsilon, mask, scratch))
    divisor = count.clamp_(min=1.0)  # max(c, 1): entries of one contributor divide by 1, exactly
    temporaries = [scratch, mask, count]
    if r is None:
        # the sum over models: in float32, rounded once (a torch sum over stacked models); in place in the
        # dtype when that is the same number (float32, or two models: one float32 sum, one rounding)
        acc = None
        if like.dtype != torch.float32 and len(deltas) > 2:
            acc = pool.empty(shape, torch.float32, like.device)
            temporaries.append(acc)
        out = None
        for d in deltas:
            d.mul_(_counted(d, epsilon, mask, scratch)).div_(divisor)  # the model's share of every entry it counts at
            if acc is not None:
                out = acc.copy_(d) if out is None else out.add_(d)
            else:
                out = d if out is None else out.add_(d)
        if acc is not None:
            out = like.copy_(acc)
        for t in temporaries:
            pool.release(t)
        return out.add_(base)
    # RAM+: lambda_i is float32 (mergekit's type promotion), so each model's term and their sum are float32:
    # unique entries float(d) * lambda_i, the others their share d / c rounded in d's dtype
    unique = torch.eq(count, 1.0, out=pool.empty(shape, torch.bool, like.device))
    acc, term = pool.empty(shape, torch.float32, like.device), pool.empty(shape, torch.float32, like.device)
    wide = pool.empty(shape, torch.float32, like.device) if like.dtype != torch.float32 else None
    temporaries += [unique, acc, term] + ([wide] if wide is not None else [])
    for k, d in enumerate(deltas):
        counted = _counted(d, epsilon, mask, scratch)
        lam = float(ramplus_lambda(counted, unique, epsilon, r, alpha))
        d.mul_(counted)
        share = torch.div(d, divisor, out=scratch)
        if wide is not None:
            share = wide.copy_(share)
        torch.where(unique, term.copy_(d).mul_(lam), share, out=term)
        if k == 0:
            acc.copy_(term)
        else:
            acc.add_(term)
    for t in temporaries:
        if t is not acc:
            pool.release(t)
    return acc.add_(base)


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
def ram(tensors, base, weight=None, epsilon=1e-5):
    """base + per entry: the one model's change where only one changed it, their mean where several did."""
    return ram_merge(tensors, base, float(epsilon))


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
    native_dtype=True,  # mergekit computes it in the recipe's dtype (engine/precision.py)
    reference="https://arxiv.org/abs/2601.13572 (mergekit 0.1.5)",
)
def ramplus_tl(tensors, base, weight=None, r=0.1, alpha=0.2, epsilon=1e-5):
    """RAM with each model's unique entries scaled by 1 + r min(shared/unique, alpha) (tensor-local)."""
    return ram_merge(tensors, base, float(epsilon), float(r), float(alpha))

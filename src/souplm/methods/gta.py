"""Shared pieces of the sparsified task-vector methods (breadcrumbs, DELLA, SCE): exact-count selection
by magnitude rank, the L1 rescale, and the final weighted (optionally sign-elected) combination.

mergekit 0.1.5 runs these methods as "generalized task arithmetic": sparsify each task vector
tau_i = theta_i - base on its own, multiply by its weight, then either sum (no consensus) or keep, per
entry, the models whose weighted entry has the elected sign (sign of the weighted sum, + where the sum
is exactly 0; TIES's own election) and divide by their weight mass; normalize by the weight sum, scale by lambda, add the base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import SoupError
from . import ties
from .linear import normalized, weighted_sum
from .task_arithmetic import add_to_base

if TYPE_CHECKING:
    import torch

RESCALE_EPS = 1e-7  # below this L1 norm (before or after the mask) the masked tensor is not rescaled


def exact(value: float) -> float:
    """The decimal a recipe wrote, from the float32 copy the plan holds (0.01 stays 0.01, not 0.0099999998):
    counts such as int(density * n) must see the recipe's number, as mergekit (float64) does."""
    return float(str(np.float32(value)))


def values(t: torch.Tensor) -> list[float]:
    """Per-model parameter values ([N] tensor) as the recipe's decimals."""
    return [exact(v) for v in t.reshape(-1).tolist()]


def lam_of(g: dict) -> float:
    """The recipe's `lambda` (a Python keyword, so it arrives in **kwargs, as `lambda` or `lam`)."""
    return float(g.get("lam", g.get("lambda", 1.0)))


def keep_positions(mag: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Boolean mask (flat) of the entries whose rank in ascending order of `mag` lies in [lo, hi).

    Exactly hi - lo entries are kept: two selections (`ties.kth_largest`, O(n)) give the values at ranks lo
    and hi - 1; entries strictly between are kept. Ties are broken by index, a lower index ranking as the
    larger: the top k of a tensor keeps the lowest-indexed of the entries tied at the cut (mergekit's
    sorts break such ties in an unspecified order)."""
    import torch

    n = mag.numel()
    flat = mag.reshape(-1)
    if hi <= lo:
        return torch.zeros_like(flat, dtype=torch.bool)
    if lo <= 0 and hi >= n:
        return torch.ones_like(flat, dtype=torch.bool)
    v_lo = _value_at_rank(flat, lo)
    v_hi = _value_at_rank(flat, hi - 1)
    keep = torch.ge(flat, v_lo).logical_and_(torch.le(flat, v_hi))
    if int(torch.count_nonzero(keep)) == hi - lo:  # no ties straddle a cut (the common case for fp32)
        return keep
    keep = torch.gt(flat, v_lo).logical_and_(torch.lt(flat, v_hi))
    for v in (v_lo,) if bool(v_lo == v_hi) else (v_lo, v_hi):
        tied = torch.nonzero(flat == v).reshape(-1).flip(0)  # in ascending rank: descending index
        below = int(torch.count_nonzero(flat < v))
        # the tied block holds ranks below .. below + len - 1; keep the part inside [lo, hi)
        first, last = max(lo - below, 0), min(hi - below, tied.numel())
        if last > first:
            keep[tied[first:last]] = True
    return keep


def _value_at_rank(flat: torch.Tensor, r: int) -> torch.Tensor:
    """The value of ascending rank r (0-based), by selection (`ties.kth_largest`, O(n) at any rank; a
    partial `topk` near either end measured 4x slower)."""
    return ties.kth_largest(flat, flat.numel() - r)


def l1_rescaled(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """delta * keep, in place; with `rescale`, times ||delta||_1 / ||delta * keep||_1 (mergekit's `rescale`:
    the tensor keeps its L1 norm), unless either norm is below 1e-7."""
    import torch

    before = float(torch.linalg.vector_norm(delta, ord=1)) if rescale else 0.0
    delta.mul_(keep)
    if rescale:
        after = float(torch.linalg.vector_norm(delta, ord=1))
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            delta.mul_(before / after)
    return delta


def combine(deltas: list[torch.Tensor], base: torch.Tensor, weight: torch.Tensor, consensus: bool,
            normalize: bool, lam: float) -> torch.Tensor:
    """base + lambda * merge of the (sparsified) task vectors, consumed in place.

    consensus: TIES's sign election (`ties.elect_and_merge`, mergekit's rule: + where the weighted sum is
    exactly 0), the agreeing sum divided by the agreeing weight mass when normalizing (0 where that mass is 0:
    mergekit divides by 1 there, which differs only when weights of both signs cancel exactly); otherwise the
    weighted sum, divided by the weight sum when normalizing."""
    if consensus:
        merged = ties.elect_and_merge(deltas, weight, normalize)
    else:
        merged = weighted_sum(deltas, normalized(weight) if normalize else weight)
    return add_to_base(merged, base, lam)


def refuse(method: str, where: str, why: str) -> None:
    raise SoupError(f"method {method}: {where} {why}")

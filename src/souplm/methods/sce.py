"""SCE (select, calculate, erase) merging of task vectors, as mergekit 0.1.5 states it.

Per tensor, with tau_i = theta_i - base:
1. select: when select_topk < 1, keep only the int(select_topk * nnz) entries where the models' task
   vectors vary most (population variance across models; nnz = entries of non-zero variance), zeroing the
   rest in every tau_i (select_topk <= 0 zeroes all of them);
2. calculate: model weight w_i = mean(tau_i^2) over the tensor, normalized to sum 1 (uniform 1/N when the
   sum is below 1e-6);
3. erase: elect s = sign(sum_i tau_i) per entry (+ where the sum is 0), keep the models whose entry has it;
   result = base + sum_{i agrees} w_i tau_i / max(sum_{i agrees} w_i, 1e-6).

Computed in the tensors' dtype (the recipe's, engine/precision.py) with mergekit's operations, so a bf16
recipe rounds where mergekit's does: the task vectors, the variance, each square before the mean, the
weights, each product w_i tau_i before the sum over models, the quotient and the final sum. The selection
is torch's top-k of the variance (which of several entries tied at the cut it keeps is torch's choice, the
same as mergekit's). The task vectors are stacked [N, ...] (one buffer), as the reductions over models
are mergekit's. Passes over the stacked task vectors: the subtraction, the variance and the top-k with
its mask (select_topk < 1), the sum for the sign, the squares and their means, the agreement, the
weighting, and two sums over models; then the quotient and the sum with the base.
"""

from __future__ import annotations

from ..io import pool
from .registry import ParamSpec, register

SPECS = {"select_topk": ParamSpec(float, 0.0, 1.0)}
WEIGHT_FLOOR = 1e-6


VAR_BLOCK = 1 << 18  # entries per block of the variance's float64 arithmetic (bounded temporaries)


def model_variance(tv):
    """torch.var(tv, dim=0, unbiased=False) of stacked task vectors [N, ...], in their dtype, bit for bit:
    torch accumulates it by Welford's update in float64 (mean += delta / k, m2 += delta (x - mean)) and
    rounds m2 / N to the dtype once; the same arithmetic here, block by block (it is elementwise), runs
    in a fraction of the time of torch's reduction over the leading axis."""
    import torch

    n = tv.shape[0]
    flat = tv.reshape(n, -1)
    size = flat.shape[1]
    out = torch.empty(tv.shape[1:], dtype=tv.dtype, device=tv.device).view(-1)
    block = min(VAR_BLOCK, max(size, 1)) if tv.device.type == "cpu" else max(size, 1)
    mean, m2, x, delta = (torch.empty(block, dtype=torch.float64, device=tv.device) for _ in range(4))
    for lo in range(0, size, block):
        m = min(block, size - lo)
        mu, sq, xx, dd = mean[:m].zero_(), m2[:m].zero_(), x[:m], delta[:m]
        for i in range(n):
            xx.copy_(flat[i, lo : lo + m])
            torch.sub(xx, mu, out=dd)
            mu.add_(dd / (i + 1))
            sq.add_(dd.mul_(xx.sub_(mu)))
        out[lo : lo + m].copy_(sq.div_(n))
    return out.view(tv.shape[1:])


def select_mask(tv, select_topk: float):
    """Boolean mask (the shape of one task vector) of the int(select_topk * nnz) entries of largest
    variance across models (tv stacked [N, ...]); None: keep nothing."""
    import torch

    var = model_variance(tv)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k == 0:
        return None
    keep = torch.zeros(var.shape, dtype=torch.bool, device=var.device)
    # The set of the k largest does not depend on `sorted` (only the order of the indices does)
    keep.view(-1)[torch.topk(var.abs().view(-1), k, sorted=False).indices] = True
    return keep


@register(
    "sce",
    specs=SPECS,
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does (its recipes often set it)
    global_params={"select_topk": 1.0},
    row_weights=False,
    native_dtype=True,  # mergekit computes it in the recipe's dtype (engine/precision.py)
    reference="https://arxiv.org/abs/2408.07990",
)
def sce(tensors, base, weight=None, select_topk=1.0):
    """base + sum_{i agrees with sign(sum tau)} w_i tau_i / sum_{i agrees} w_i, w_i ~ mean(tau_i^2), after top-k variance selection."""
    import torch

    n = len(tensors)
    select_topk = float(select_topk)
    if select_topk <= 0.0:
        return base  # every task vector zeroed: nothing agrees, the quotient is 0
    tv = pool.empty((n, *base.shape), base.dtype, base.device)
    for i, t in enumerate(tensors):
        torch.sub(t, base, out=tv[i])
    if select_topk < 1.0:
        keep = select_mask(tv, select_topk)
        if keep is None:
            return base
        tv.mul_(keep)
    flat = tv.view(n, -1)
    scratch = pool.empty_like(tv)
    ms = torch.square(flat, out=scratch.view(n, -1)).mean(dim=1)  # mean(tau_i^2), each square rounded
    total = torch.sum(ms).item()
    w = torch.ones_like(ms) / n if abs(total) < WEIGHT_FLOOR else ms / total
    # the elected sign: + where the sum over models is >= 0; model i agrees where tau_i * sign > 0
    sign = torch.where(tv.sum(dim=0) >= 0, 1.0, -1.0).to(tv.dtype)
    erased = torch.mul(tv, sign, out=scratch).gt_(0)  # 1 where it agrees, 0 elsewhere (tau = 0 included)
    erased.mul_(w.view(n, *([1] * base.dim())))  # w_i where model i agrees
    merged = tv.mul_(erased).sum(dim=0)
    mass = erased.sum(dim=0).clamp_(min=WEIGHT_FLOOR)
    pool.release(scratch)
    pool.release(tv)
    return merged.div_(mass).add_(base)

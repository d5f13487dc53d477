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
same as mergekit's). The task vectors are stacked [N, ...] (one buffer). Passes: the subtractions; with
select_topk < 1 the variance (by the C kernel on the CPU: torch's float64 Welford update), the top-k and
its mask; then two passes of entrywise operations (methods/program.py, by the C kernels on the CPU): the
sums of the squares, then the elected sign, the agreement, the weighting, the two sums over models, the
quotient and the sum with the base. The means of the squares are float64 sums (torch's float32 sums have
their own order: a step apart at most).
"""

from __future__ import annotations

from ..io import pool
from .program import KERNEL_CODES, Ops, apply, c_kernels, compute_of, scalar
from .registry import ParamSpec, register

SPECS = {"select_topk": ParamSpec(float, 0.0, 1.0)}
WEIGHT_FLOOR = 1e-6


VAR_BLOCK = 1 << 18  # entries per block of the variance's float64 arithmetic (bounded temporaries)


def model_variance(tv):
    """torch.var(tv, dim=0, unbiased=False) of stacked task vectors [N, ...], in their dtype, bit for bit:
    torch accumulates it by Welford's update in float64 (mean += delta / k, m2 += delta (x - mean)) and
    rounds m2 / N to the dtype once (through float32). On the CPU the C kernel (`_kernels.variance`) runs
    that update; elsewhere the same arithmetic with torch, block by block (it is elementwise), in a fraction
    of the time of torch's reduction over the leading axis."""
    import torch

    n = tv.shape[0]
    flat = tv.reshape(n, -1)
    size = flat.shape[1]
    out = torch.empty(tv.shape[1:], dtype=tv.dtype, device=tv.device).view(-1)
    kernels = c_kernels()
    if kernels is not None and tv.device.type == "cpu" and str(tv.dtype) in KERNEL_CODES and size:
        code = KERNEL_CODES[str(tv.dtype)]
        raw = (lambda t: t.numpy()) if code == 0 else (lambda t: t.view(torch.int16).numpy())
        kernels.variance(raw(out), code, [raw(flat[i]) for i in range(n)], [code] * n, 0, size)
        return out.view(tv.shape[1:])
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
    variance across models (tv stacked [N, ...]); None: keep nothing. The entries torch.topk keeps (and
    mergekit): on the CPU by the C kernel, which runs torch's algorithm (`_kernels.topk_mask`: the same
    choice among entries tied at the cut, in a fraction of the time)."""
    import numpy as np
    import torch

    var = model_variance(tv)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k == 0:
        return None
    n = var.numel()
    kernels = c_kernels()
    if kernels is not None and var.device.type == "cpu" and n < 1 << 32:
        keys = var.reshape(-1).to(torch.float32).abs_().numpy().view(np.uint32)  # ordered as the values
        mask = np.empty(n, np.uint8)
        kernels.topk_mask(mask, keys, k)
        return torch.from_numpy(mask).view(torch.bool).view(var.shape)
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
    compute = compute_of(base.dtype)
    taus = [tv[i] for i in range(n)]
    ops = Ops(n)
    for i in range(n):
        ops.sum(ops.mul(i, i))  # mean(tau_i^2): each square rounded
    sums, _ = apply(ops, taus, None, compute)
    ms = torch.from_numpy(sums[:, 0] / max(base.numel(), 1)).to(base.dtype)
    total = torch.sum(ms).item()
    w = (torch.ones_like(ms) / n if abs(total) < WEIGHT_FLOOR else ms / total).float().cpu().numpy()
    ops = Ops(n + 1)  # the task vectors, then the base
    total_tau = 0
    for i in range(1, n):  # the sum over models for the sign: its sign is the rounded sum's
        total_tau = ops.add(total_tau, i, exact=True)
    # the elected sign: + where the sum over models is >= 0; model i agrees where tau_i * sign > 0
    sign = ops.where(ops.gt(ops.const(0.0), total_tau), ops.const(-1.0), ops.const(1.0))
    merged = mass = None
    for i in range(n):
        agree = ops.gt(ops.mul(i, sign, exact=True), ops.const(0.0))  # tau = 0 does not agree
        erased = ops.mul(agree, ops.const(w[i]), exact=True)  # w_i where model i agrees
        term = ops.mul(i, erased)
        merged = term if merged is None else ops.add(merged, term, exact=True)  # one rounding per sum
        mass = erased if mass is None else ops.add(mass, erased, exact=True)
    floor = ops.const(scalar(compute)(WEIGHT_FLOOR) if compute != "F32" else WEIGHT_FLOOR)
    mass = ops.max(ops.round(mass), floor)  # clamp(min=1e-6), the bound in the dtype (as torch's clamp)
    ops.store(ops.add(ops.div(ops.round(merged), mass), n))
    _, out = apply(ops, [*taus, base], None, compute)
    pool.release(tv)
    return out

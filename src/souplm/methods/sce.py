"""SCE (select, calculate, erase) merging of task vectors, as mergekit 0.1.5 states it.

Per tensor, with tau_i = theta_i - base:
1. select: when select_topk < 1, keep only the int(select_topk * nnz) entries where the models' task
   vectors vary most (population variance across models; nnz = entries of non-zero variance), zeroing the
   rest in every tau_i (select_topk <= 0 zeroes all of them);
2. calculate: model weight w_i = mean(tau_i^2) over the tensor, normalized to sum 1 (uniform 1/N when the
   sum is below 1e-6);
3. erase: elect s = sign(sum_i tau_i) per entry (+ where the sum is 0), keep the models whose entry has it;
   result = base + sum_{i agrees} w_i tau_i / max(sum_{i agrees} w_i, 1e-6).
Three passes over the task vectors: variance and selection, the weights' mean squares, the erase and sum.
"""

from __future__ import annotations

from .gta import keep_positions
from .registry import ParamSpec, register
from .task_arithmetic import task_vectors

SPECS = {"select_topk": ParamSpec(float, 0.0, 1.0)}
WEIGHT_FLOOR = 1e-6


def select_mask(deltas, select_topk: float):
    """0/1 mask of the entries with the top select_topk fraction of non-zero variance across models."""
    import torch

    n = len(deltas)
    mean = deltas[0].clone()
    for d in deltas[1:]:
        mean.add_(d)
    mean.div_(n)
    var = torch.zeros_like(mean)
    for d in deltas:
        var.add_((d - mean).square_())
    var.div_(n)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    size = var.numel()
    return keep_positions(var, size - k, size).view(var.shape)


@register(
    "sce",
    specs=SPECS,
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does (its recipes often set it)
    global_params={"select_topk": 1.0},
    row_weights=False,
    reference="https://arxiv.org/abs/2408.07990",
)
def sce(tensors, base, weight=None, select_topk=1.0):
    """base + sum_{i agrees with sign(sum tau)} w_i tau_i / sum_{i agrees} w_i, w_i ~ mean(tau_i^2), after top-k variance selection."""
    import torch

    deltas = task_vectors(tensors, base)
    if select_topk < 1.0:
        if select_topk <= 0.0:
            return base
        keep = select_mask(deltas, select_topk)
        for d in deltas:
            d.mul_(keep)
    ms = [float(d.square().mean()) for d in deltas]
    total = sum(ms)
    w = [1.0 / len(deltas)] * len(deltas) if abs(total) < WEIGHT_FLOOR else [m / total for m in ms]
    sign = deltas[0].clone()
    for d in deltas[1:]:
        sign.add_(d)
    sign = torch.where(sign >= 0, 1.0, -1.0)
    merged = torch.zeros_like(base)
    mass = torch.zeros_like(base)
    for d, wi in zip(deltas, w):
        agree = (torch.sign(d) == sign).to(d.dtype)
        merged.addcmul_(d, agree, value=wi)
        mass.add_(agree, alpha=wi)
    return merged.div_(mass.clamp_(min=WEIGHT_FLOOR)).add_(base)

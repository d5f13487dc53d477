"""Model Stock: move from the base toward the models' average by a ratio set by the angle between their
task vectors (Jang et al. 2024), as mergekit 0.1.5 states it.

With N >= 2 task vectors tau_i = theta_i - base, cos = the mean over pairs i < j of
<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6) (each clamped to [-1, 1]), t = N cos / (1 + (N - 1) cos)
(t = 0, the base, where |1 + (N - 1) cos| < 1e-6), and the result is t * mean_i theta_i + (1 - t) * base.
The cosine is taken over the whole tensor, or per row (the last dimension) with `filter_wise: true`
(a 1-D tensor is one row either way). Two passes: the norms and pairwise dot products, then the sum.
"""

from __future__ import annotations

from .registry import ParamSpec, register
from .task_arithmetic import task_vectors

SINGULAR = 1e-6
NORM_FLOOR = 1e-6


@register(
    "model_stock",
    specs={"filter_wise": ParamSpec(bool)},
    needs_base=True,
    min_models=2,
    max_models=None,
    global_params={"filter_wise": False},
    reference="https://arxiv.org/abs/2403.19522",
)
def model_stock(tensors, base, filter_wise=False):
    """t * mean_i theta_i + (1 - t) * base, t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors."""
    import torch

    deltas = task_vectors(tensors, base)
    n = len(deltas)
    rows = [d.reshape(-1, d.shape[-1]) if filter_wise and d.dim() >= 2 else d.reshape(1, -1) for d in deltas]
    norms = [torch.linalg.vector_norm(r, dim=-1) for r in rows]
    cos = torch.zeros_like(norms[0])
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.linalg.vecdot(rows[i], rows[j])
            cos.add_(dot.div_((norms[i] * norms[j]).clamp_(min=NORM_FLOOR)).clamp_(-1.0, 1.0))
    cos.div_(n * (n - 1) // 2)
    denom = cos * (n - 1) + 1
    singular = denom.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos), cos * n / torch.where(singular, torch.ones_like(denom), denom))
    mean = deltas[0]
    for d in deltas[1:]:
        mean.add_(d)
    shape = (*base.shape[:-1], 1) if filter_wise and base.dim() >= 2 else (1,) * base.dim()
    return mean.mul_((t / n).reshape(shape)).add_(base)

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

SINGULAR = 1e-6
NORM_FLOOR = 1e-6


@register(
    "model_stock",
    specs={"filter_wise": ParamSpec(bool)},
    needs_base=True,
    min_models=2,
    max_models=None,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does (its recipes often set it)
    global_params={"filter_wise": False},
    row_weights=False,
    reference="https://arxiv.org/abs/2403.19522",
)
def model_stock(tensors, base, weight=None, filter_wise=False):
    """t * mean_i theta_i + (1 - t) * base, t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors."""
    import torch

    from ..io import pool

    n = len(tensors)
    rowwise = filter_wise and base.dim() >= 2
    view = (lambda x: x) if rowwise else (lambda x: x.reshape(-1))
    # the offsets beside the inputs: the result is formed from theta_i and base as mergekit forms it, so
    # that it rounds the same way (base + t * mean(tau) is the same number, a few fp32 ulps apart)
    raw = [torch.sub(t, base, out=pool.empty_like(t)) for t in tensors]
    offsets = [view(o) for o in raw]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cos = torch.zeros_like(norms[0])
    prod = pool.empty_like(raw[0])
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.mul(offsets[i], offsets[j], out=view(prod)).sum(dim=-1)
            cos.add_(dot.div_((norms[i] * norms[j]).clamp_(min=NORM_FLOOR)).clamp_(-1.0, 1.0))
    for o in (*raw, prod):
        pool.release(o)
    cos = cos.div_(n * (n - 1) // 2).unsqueeze(-1)
    denom = cos * (n - 1) + 1
    singular = denom.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos), cos * n / torch.where(singular, torch.ones_like(denom), denom))
    avg = tensors[0]
    for x in tensors[1:]:
        avg.add_(x)
    avg.div_(n)
    if not rowwise:
        t = t.reshape((1,) * base.dim())
    return avg.mul_(t).add_(base.mul_(1 - t))

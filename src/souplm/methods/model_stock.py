"""Model Stock: move from the base toward the models' average by a ratio set by the angle between their
task vectors (Jang et al. 2024), as mergekit 0.1.5 states it.

With N >= 2 task vectors tau_i = theta_i - base, cos = the mean over pairs i < j of
<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6) (each clamped to [-1, 1]), t = N cos / (1 + (N - 1) cos)
(t = 0, the base, where |1 + (N - 1) cos| < 1e-6), and the result is t * mean_i theta_i + (1 - t) * base.
The cosine is taken over the whole tensor, or per row (the last dimension) with `filter_wise: true`
(a 1-D tensor is one row either way).

Computed in the tensors' dtype (the recipe's, engine/precision.py) with mergekit's operations in its order,
so a bf16 recipe rounds where mergekit's does: each offset, each norm, each product of a dot product
before its (float32-accumulated) sum, the cosines and t, the running sum of the models (one rounding per
model, as Python's sum of tensors), the average, t * average and (1 - t) * base before their sum.
Passes over the tensor: N offsets, N norms, 2 per pair (product, sum), then N - 1 adds, the division,
two products and the sum: 11 for two models, each an elementwise op on memory; no full-size temporary
beyond the N offsets and one product.
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
    native_dtype=True,  # mergekit computes it in the recipe's dtype (engine/precision.py)
    reference="https://arxiv.org/abs/2403.19522",
)
def model_stock(tensors, base, weight=None, filter_wise=False):
    """t * mean_i theta_i + (1 - t) * base, t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors."""
    import torch

    from ..io import pool

    n = len(tensors)
    shape = base.shape
    rowwise = filter_wise
    cols = shape[-1] if rowwise and base.dim() >= 1 else base.numel()
    view = (lambda x: x.reshape(-1, cols)) if rowwise else (lambda x: x.reshape(-1))
    w0 = view(base)
    ws = [view(t) for t in tensors]
    # the offsets beside the inputs (the result is formed from theta_i and base, as mergekit forms it)
    offsets = [torch.sub(w, w0, out=pool.empty_like(w)) for w in ws]
    norms = [torch.linalg.vector_norm(o, 2, dim=-1) for o in offsets]
    prod = pool.empty_like(offsets[0])
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.mul(offsets[i], offsets[j], out=prod).sum(dim=-1)  # the product rounds before the sum
            cos.append((dot / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1, 1))
    for o in (*offsets, prod):
        pool.release(o)
    cos_t = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos_t
    singular = denom.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos_t), (n * cos_t) / torch.where(singular, torch.ones_like(denom), denom))
    avg = ws[0]  # the models' running sum, in place, each step rounded (Python's sum over tensors)
    for x in ws[1:]:
        avg.add_(x)
    avg.div_(n).mul_(t)
    return avg.add_(w0.mul_(1 - t)).reshape(shape)

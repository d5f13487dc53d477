"""Arcee Fusion: keep the model's changes where they matter most, the base elsewhere (mergekit 0.1.5).

With a the base, b the one model, and softmaxes over the last axis (each row; a 1-D tensor is one row):

    p = softmax(b) + 1e-8,  q = softmax(a) + 1e-8
    kl_r = sum_j p_rj log(p_rj / q_rj)                 one divergence per row
    s = |b - a| * kl_r                                 importance of each entry
    thr = Q2 + 1.5 (Q3 - Q1)                           quartiles of s: Q = sorted(s)[floor(q (n - 1))]
    out = a + (b - a) [s >= thr]

Quartiles: mergekit sorts the whole tensor up to 1e6 entries and, above that, a random sample of 1e6
entries drawn with replacement from torch's unseeded generator. souplm takes the exact order statistics
of every tensor (the same values up to 1e6 entries; deterministic above, where mergekit's threshold
varies from run to run). Not a linear combination (the mask is per entry).

Computed in the tensors' dtype (the recipe's, engine/precision.py) with mergekit's operations, so a bf16
recipe rounds where mergekit's does: both softmaxes, the + 1e-8, p / q, its log, the products and each
row's sum, b - a, the importance and the threshold's arithmetic. mergekit then forms a + (b - a) mask in
float32 (its mask is float32); the sum of two bf16 values in float32, once rounded to bf16, is the bf16
sum souplm forms. Passes: per row block (in cache) two softmaxes, two additions, the quotient, its log,
the product and the row sums; then b - a, |b - a|, the importance, the three quartiles by one radix select
(steps.order_statistics: one sweep in bf16, three in fp16 and fp32), the comparison, the masked update and
the sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..io import pool
from .registry import register
from .steps import order_statistics

if TYPE_CHECKING:
    import torch

PROB_EPS = 1e-8  # added to both distributions before the logarithm
QUARTILES = (0.25, 0.5, 0.75)
BLOCK = 1 << 19  # entries per row block: bounds the softmax temporaries (row_kl of a 2816 x 1024 bf16 pair: 8.9 ms, against 9.8 at 2^20 and 9.5 at 2^17)


def row_kl(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """KL(softmax(b) + eps || softmax(a) + eps) of every row of the last axis, shape [rows, 1]."""
    import torch

    cols = b.shape[-1] if b.dim() else 1
    b2, a2 = b.reshape(-1, cols), a.reshape(-1, cols)
    out = torch.empty((b2.shape[0], 1), dtype=b.dtype, device=b.device)
    step = max(1, BLOCK // cols)
    for r in range(0, b2.shape[0], step):
        p = torch.softmax(b2[r : r + step], dim=-1).add_(PROB_EPS)
        q = torch.softmax(a2[r : r + step], dim=-1).add_(PROB_EPS)
        q = torch.div(p, q, out=q).log_().mul_(p)
        out[r : r + step] = q.sum(dim=-1, keepdim=True)
    return out


def fusion_threshold(s: torch.Tensor) -> torch.Tensor:
    """Q2 + 1.5 (Q3 - Q1) of the importance `s` (in its dtype, as mergekit), quartiles sorted(s)[floor(q (n - 1))]."""
    n = s.numel()
    q1, q2, q3 = order_statistics(s, [int(q * (n - 1)) for q in QUARTILES])
    return q2 + 1.5 * (q3 - q1)


@register(
    "arcee_fusion",
    needs_base=True,
    min_models=1,
    max_models=1,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does (its recipes often set it)
    native_dtype=True,  # mergekit computes it in the recipe's dtype (engine/precision.py)
    reference="https://arcee.ai (mergekit 0.1.5 merge_methods/arcee_fusion.py)",
)
def arcee_fusion(tensors, base, **_):
    """base + (theta - base) where |theta - base| * KL(row) >= median + 1.5 IQR of that importance."""
    import torch

    b = tensors[0]
    kl = row_kl(b, base)
    d = b.sub_(base)  # b - a, in place: the model's tensor is not needed again
    s = torch.abs(d, out=pool.empty_like(d))
    s.view(kl.shape[0], -1).mul_(kl)
    d.mul_(s.ge_(fusion_threshold(s)))
    pool.release(s)
    return d.add_(base)

"""NearSwap: take the model's value where it is near the base's, keep the base's where they are far apart
(mergekit 0.1.5's `nearswap`).

Entry by entry, with a the base, b the one model and t the distance scale (required):

    w   = clamp(t / max(|a - b|, 1e-6), 0, 1)
    out = w b + (1 - w) a

Entries closer than t are the model's (w = 1); farther ones move towards the base in proportion to
t / |a - b|. Not a linear combination with per-tensor coefficients: the weight is per entry.

Computed in the tensors' dtype (the recipe's, engine/precision.py) with mergekit's operations: |a - b|,
the clamp, t / x as torch's reciprocal times t, the clamp, then w b and (1 - w) a each rounded before
their sum. Passes: 10 elementwise ops over the tensor, each in place (one pooled temporary).
"""

from __future__ import annotations

from ..io import pool
from .registry import ParamSpec, register

MIN_DISTANCE = 1e-6  # |a - b| is clamped to this before dividing


@register(
    "nearswap",
    specs={"t": ParamSpec(float, 0.0, None)},
    needs_base=True,
    min_models=1,
    max_models=1,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does (its recipes often set it)
    global_params={"t": None},
    required=("t",),
    native_dtype=True,  # mergekit computes it in the recipe's dtype (engine/precision.py)
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (mergekit 0.1.5)",
)
def nearswap(tensors, base, t, weight=None):
    """w b + (1 - w) a with w = clamp(t / |a - b|, 0, 1) per entry (a the base, b the model)."""
    import torch

    b = tensors[0]
    w = torch.sub(base, b, out=pool.empty_like(b)).abs_().clamp_(min=MIN_DISTANCE)
    w.reciprocal_().mul_(float(t)).clamp_(0.0, 1.0)  # t / x: torch's scalar division is reciprocal() * t
    b.mul_(w)  # w b
    w.neg_().add_(1.0).mul_(base)  # (1 - w) a
    b.add_(w)
    pool.release(w)
    return b

"""NearSwap: take the model's value where it is near the base's, keep the base's where they are far apart
(mergekit 0.1.5's `nearswap`).

Entry by entry, with a the base, b the one model and t the distance scale (required):

    w   = clamp(t / max(|a - b|, 1e-6), 0, 1)
    out = w b + (1 - w) a

Entries closer than t are the model's (w = 1); farther ones move towards the base in proportion to
t / |a - b|. Not a linear combination with per-tensor coefficients: the weight is per entry.

Stated as a Program (methods/program.py), one pass, in the tensors' dtype (the recipe's,
engine/precision.py) with mergekit's operations: |a - b|, the clamp, t / x as torch's reciprocal times t,
the clamp, then w b and (1 - w) a each rounded before their sum.
"""

from __future__ import annotations

from .program import Ops, Program, scalar
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
def nearswap(t, weight=None) -> Program:
    """w b + (1 - w) a with w = clamp(t / |a - b|, 0, 1) per entry (a the base, b the model)."""

    def body(sweep, compute):
        ops = Ops(2)  # the model, then the base
        b, a = ops.input(0), ops.input(1)
        w = ops.max(ops.abs(ops.sub(a, b)), ops.const(scalar(compute)(MIN_DISTANCE)))  # a clamp bound: the dtype's
        w = ops.mul(ops.recip(w), ops.const(float(t)))  # t / x: torch's scalar division is reciprocal() * t
        w = ops.min(ops.max(w, ops.const(0.0)), ops.const(1.0))
        one_minus = ops.add(ops.neg(w), ops.const(1.0))
        ops.store(ops.add(ops.mul(b, w), ops.mul(one_minus, a)))
        sweep(ops)

    return Program(body)

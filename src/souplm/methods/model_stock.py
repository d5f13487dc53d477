"""Model Stock: move from the base toward the models' average by a ratio set by the angle between their
task vectors (Jang et al. 2024), as mergekit 0.1.5 states it.

With N >= 2 task vectors tau_i = theta_i - base, cos = the mean over pairs i < j of
<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6) (each clamped to [-1, 1]), t = N cos / (1 + (N - 1) cos)
(t = 0, the base, where |1 + (N - 1) cos| < 1e-6), and the result is t * mean_i theta_i + (1 - t) * base.
The cosine is taken over the whole tensor, or per row (the last dimension) with `filter_wise: true`
(a 1-D tensor is one row either way).

Stated as a Program (methods/program.py) in the tensors' dtype (the recipe's, engine/precision.py) with
mergekit's operations in its order, so a bf16 recipe rounds where mergekit's does: each offset, each norm
(a float32 sum of float32 squares, rounded), each product of a dot product before its (float32-accumulated)
sum, the cosines and t, the running sum of the models (one rounding per model, as Python's sum of tensors),
the average, t * average and (1 - t) * base before their sum. In float32 (where mergekit's steps are not
reproducible anyway: torch's float32 sums have their own order) t is computed in float64 and the result as
base + t mean_i tau_i, the same value without the cancellation of t avg against (1 - t) base that puts
mergekit's float32 result several steps off where t is large (t is ill-conditioned where 1 + (N - 1) cos
nears 0). Two passes: the first sums the squares and the pairwise products, the second forms the result.
"""

from __future__ import annotations

import itertools

import numpy as np

from .program import Ops, Program, scalar
from .registry import ParamSpec, register

SINGULAR = 1e-6
NORM_FLOOR = 1e-6


def ratio(squares: np.ndarray, dots: np.ndarray, n: int, compute: str) -> np.ndarray:
    """t per row from the sums of squares [N, rows] and of pairwise products [pairs, rows]: in bf16 / fp16,
    torch's scalar arithmetic on tensors of that dtype (each operation rounded, as mergekit's); in float32,
    in float64 and rounded once (t is ill-conditioned where 1 + (N - 1) cos nears 0, and float32 steps
    there put mergekit's own t several steps off; docs/MERGING.md)."""
    if compute == "F32":
        f, rnd = np.float64, (lambda v: np.asarray(v, dtype=np.float64))
    else:
        f, rnd = np.float32, scalar(compute)
    norms = rnd(np.sqrt(squares.astype(f)))
    dots = rnd(dots.astype(f))
    cos = []
    for k, (i, j) in enumerate(itertools.combinations(range(n), 2)):
        scale = np.maximum(rnd(norms[i] * norms[j]), rnd(NORM_FLOOR))
        cos.append(np.clip(rnd(dots[k] / scale), f(-1.0), f(1.0)))
    mean = rnd(np.sum(np.stack(cos), axis=0, dtype=f) / f(len(cos)))  # a float32 (or float64) sum, one rounding
    denom = rnd(f(1.0) + rnd(f(n - 1) * mean))
    singular = np.abs(denom) < rnd(SINGULAR)
    t = rnd(rnd(f(n) * mean) / np.where(singular, f(1.0), denom))
    return np.where(singular, f(0.0), t).astype(np.float32)  # (float64: rounded to float32 once)


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
def model_stock(n_models, filter_wise=False) -> Program:
    """t * mean_i theta_i + (1 - t) * base, t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors."""
    n = n_models

    def body(sweep, compute):
        ops = Ops(n + 1)  # the models, then the base
        offsets = [ops.sub(ops.input(i), ops.input(n)) for i in range(n)]
        for o in offsets:
            ops.sum(ops.mul(o, o, exact=True))  # the norm's float32 squares
        for i, j in itertools.combinations(range(n), 2):
            ops.sum(ops.mul(offsets[i], offsets[j]))  # each product rounds before the sum
        sums = sweep(ops)
        t = ratio(sums[:n], sums[n:], n, compute)
        ops = Ops(n + 1)
        if compute == "F32":  # base + t mean_i tau_i: the same value, without t avg and (1 - t) base cancelling
            tau = ops.sub(ops.input(0), ops.input(n))
            for i in range(1, n):
                tau = ops.add(tau, ops.sub(ops.input(i), ops.input(n)))
            step = ops.mul(ops.div(tau, ops.const(n)), ops.vector_const(t) if filter_wise else ops.const(t[0]))
            ops.store(ops.add(ops.input(n), step))
            sweep(ops)
            return
        one_minus = scalar(compute)(np.float32(1.0) - t)
        avg = ops.input(0)
        for i in range(1, n):  # the models' running sum, each step rounded (Python's sum over tensors)
            avg = ops.add(avg, ops.input(i))
        avg = ops.mul(ops.div(avg, ops.const(n)), ops.vector_const(t) if filter_wise else ops.const(t[0]))
        ops.store(ops.add(avg, ops.mul(ops.input(n), ops.vector_const(one_minus) if filter_wise
                                       else ops.const(one_minus[0]))))
        sweep(ops)

    return Program(body, axis=-1 if filter_wise else None)

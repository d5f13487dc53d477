"""RAM (Reinforced Agent Merging) and RAM+ tensor-local (mergekit 0.1.5's `ram`, `ramplus_tl`).

Task vectors d_i = theta_i - base; an entry of model i counts when |d_ij| > epsilon (default 1e-5);
c_j is how many models' entries count at j. An entry only one model changed is kept whole, an entry
several changed is their mean, an entry none changed stays the base's:

    ram:         out_j = base_j + sum_i [counts_ij] d_ij / max(c_j, 1)

RAM+ (tensor-local) rescales each model's unique entries by how much of its change it shares: with
shared_i = #{j: counts_ij, c_j > 1} and unique_i = #{j: counts_ij, c_j = 1} over this tensor,

    rho_i    = shared_i / max(unique_i, epsilon)
    lambda_i = 1 + r clamp(rho_i, 0, alpha)                      (r = 0.1, alpha = 0.2 by default)
    out_j    = base_j + sum_i [counts_ij] d_ij (lambda_i if c_j = 1 else 1 / c_j)

No weights: every model counts the same. Not a linear combination (the masks are per entry).

Stated as a Program (methods/program.py) in the tensors' dtype (the recipe's, engine/precision.py) with
mergekit's operations: each task vector and each share d_ij / c_j rounded to it, the sum over models
accumulated in float32 and rounded once (a torch reduction over stacked models; with two models that is
one rounded sum), then the base added. RAM+ follows mergekit's type promotion: lambda_i is float32, so the
unique entries' products, the sum over models and the sum with the base are float32 (rounded to the output
dtype when written). Passes: ram one; RAM+ two (the first counts shared_i and unique_i).
"""

from __future__ import annotations

import numpy as np

from .program import Ops, Program, scalar
from .registry import ParamSpec, register


def _counts(ops: Ops, n: int, epsilon) -> tuple[list[int], list[int], int]:
    """(task vectors, their count masks, c): |d| > epsilon is torch's comparison in d's dtype (epsilon
    rounded to it), as mergekit's."""
    base = ops.input(n)
    deltas = [ops.sub(ops.input(i), base) for i in range(n)]
    eps = ops.const(epsilon)
    counted = [ops.gt(ops.abs(d), eps) for d in deltas]
    count = counted[0]
    for m in counted[1:]:
        count = ops.add(count, m, exact=True)  # small whole numbers: exact in any dtype
    return deltas, counted, count


def ram_program(n: int, epsilon: float, r: float | None = None, alpha: float | None = None) -> Program:
    """base + sum_i [|d_i| > eps] d_i / max(c, 1); RAM+'s unique entries times lambda_i when r is given."""

    def body(sweep, compute):
        eps = scalar(compute)(epsilon)
        lam = None
        if r is not None:  # RAM+: each model's counted and unique entries, for lambda_i
            ops = Ops(n + 1)
            _, counted, count = _counts(ops, n, eps)
            unique = ops.eq(count, ops.const(1.0))
            for m in counted:
                ops.sum(m)
                ops.sum(ops.mul(m, unique, exact=True))
            sums = sweep(ops)[:, 0]
            lam = [ramplus_lambda(sums[2 * i], sums[2 * i + 1], epsilon, r, alpha) for i in range(n)]
        ops = Ops(n + 1)
        deltas, counted, count = _counts(ops, n, eps)
        divisor = ops.max(count, ops.const(1.0))  # max(c, 1): entries of one contributor divide by 1, exactly
        shares = [ops.div(ops.mul(d, m), divisor) for d, m in zip(deltas, counted)]
        if lam is not None:  # float32 from here on: unique entries float(d) lambda_i, the others their share
            unique = ops.eq(count, ops.const(1.0))
            shares = [ops.where(unique, ops.mul(ops.mul(d, m), ops.const(lam_i), exact=True), s)
                      for d, m, s, lam_i in zip(deltas, counted, shares, lam)]
        total = shares[0]
        for s in shares[1:]:  # float32 accumulation, rounded once (RAM+: not rounded)
            total = ops.add(total, s, exact=True)
        if lam is None:
            total = ops.round(total)
        ops.store(ops.add(total, ops.input(n), exact=lam is not None), wide=lam is not None)
        sweep(ops)

    return Program(body)


def ramplus_lambda(n_counted: float, n_unique: float, epsilon: float, r: float, alpha: float) -> float:
    """lambda_i = 1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha) (float32 arithmetic, as mergekit)."""
    f = np.float32
    shared = f(float(n_counted) - float(n_unique))
    rho = shared / f(max(float(n_unique), epsilon))
    return float(f(1.0) + f(r) * np.clip(rho, f(0.0), f(alpha)))


@register(
    "ram",
    specs={"epsilon": ParamSpec(float, 0.0, None)},
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does (its recipes often set it)
    global_params={"epsilon": 1e-5},
    native_dtype=True,  # mergekit computes it in the recipe's dtype: every step of a bf16 recipe rounds to bf16
    reference="https://arxiv.org/abs/2601.13572 (mergekit 0.1.5)",
)
def ram(n_models, epsilon=1e-5) -> Program:
    """base + per entry: the one model's change where only one changed it, their mean where several did."""
    return ram_program(n_models, float(epsilon))


@register(
    "ramplus_tl",
    specs={
        "r": ParamSpec(float, 0.0, None),
        "alpha": ParamSpec(float, 0.0, None),
        "epsilon": ParamSpec(float, 0.0, None, lo_open=True),
    },
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does
    global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    native_dtype=True,  # mergekit computes it in the recipe's dtype (engine/precision.py)
    reference="https://arxiv.org/abs/2601.13572 (mergekit 0.1.5)",
)
def ramplus_tl(n_models, r=0.1, alpha=0.2, epsilon=1e-5) -> Program:
    """RAM with each model's unique entries scaled by 1 + r min(shared/unique, alpha) (tensor-local)."""
    return ram_program(n_models, float(epsilon), float(r), float(alpha))

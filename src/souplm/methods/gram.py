"""Gram matrices of the inputs, for methods whose result is a linear combination with coefficients that
depend only on the inputs' dot products (nuslerp, multislerp, karcher).

Such a method is stated as (1) a NumPy float64 `coefficients_from_gram(gram, ...)` and (2) a torch
function that measures the Gram matrix here and applies the coefficients with `linear.weighted_sum`. A
one-pass executor can reuse (1): it needs the N x N dot products of a tensor's inputs (one read) and then
one weighted sum (a second read), whatever the method does on the sphere in between.

The whole-tensor Gram matrix is `steps.gram` (the one both executors use for SLERP); this module adds the
per-vector Gram matrices of NuSLERP's row-wise modes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .steps import gram

if TYPE_CHECKING:
    import torch

__all__ = ["coefficient_weights", "gram", "gram_along"]


def gram_along(xs: list[torch.Tensor], dim: int) -> np.ndarray:
    """One Gram matrix per vector along `dim` (dim=-1: each row of the last axis), float64 [*rest, N, N]
    where `rest` is the shape without `dim`. Each entry sums at most shape[dim] fp32 products."""
    import torch

    n = len(xs)
    rest = tuple(s for d, s in enumerate(xs[0].shape) if d != dim % xs[0].dim())
    g = np.empty((*rest, n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i, n):
            v = torch.linalg.vecdot(xs[i], xs[j], dim=dim).to(torch.float64).numpy()
            g[..., i, j] = v
            g[..., j, i] = v
    return g


def coefficient_weights(coef: np.ndarray, dim: int, ndim: int) -> torch.Tensor:
    """Per-vector coefficients [*rest, N] (from `gram_along`) as weights [N, ...] that broadcast against
    one input (axis `dim` kept, of size 1), for `linear.weighted_sum`."""
    import torch

    w = torch.from_numpy(np.ascontiguousarray(np.moveaxis(coef, -1, 0)))
    return w.unsqueeze(1 + dim % ndim)

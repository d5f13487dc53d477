"""Karcher mean: the Riemannian (geodesic) centre of mass of the models on the unit hypersphere, scaled
back to their mean norm (mergekit 0.1.5's `karcher`).

Every input counts equally, the base model included when the recipe names one (mergekit treats it as
one more input; souplm's recipe reader lists it among the models): alpha_i = 1/N. With x_i the flattened tensors, n_i = |x_i| and u_i = x_i / n_i, the
inputs with n_i > tol take part, their alphas renormalized to a_i (none: the result is zero):

    m = sum_i a_i u_i / |m|   (or the first such u_i when |m| < tol)
    repeat max_iter times:
        d_i = clamp(<m, u_i>, -1, 1),  O_i = arccos d_i
        T   = sum_{i: O_i >= tol} a_i O_i / sin O_i (u_i - d_i m)      (the mean of the log maps at m)
        stop when |T| < tol
        m   = cos|T| m + sin|T| T / |T|, then m / |m| when |m| > tol   (the exponential map)
    out = (sum_i alpha_i n_i) m

Every step is a linear combination of the u_i, and every dot product and norm in it is one of the
unit vectors' Gram matrix, so the result is sum_i c_i x_i with c from the Gram matrix alone
(`coefficients_from_gram`): the renormalization of m too is |m|^2 = c^T G c. The iterations run on an
N x N matrix. Stated as a Form whose weights come from the Gram matrix (as SLERP's): both executors read
the inputs twice (Gram matrix, then the weighted sum), whatever max_iter is; mergekit instead updates
full-size tensors in each iteration (in the recipe's dtype).
"""

from __future__ import annotations

import math

import numpy as np

from .form import Form
from .registry import ParamSpec, register


def coefficients_from_gram(gram: np.ndarray, max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """Coefficients [N] of the x_i from their Gram matrix [N, N] (float64), equal weights 1/N."""
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    alpha = np.full(n, 1.0 / n)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    gu = g * inv[:, None] * inv[None, :]  # Gram matrix of the unit vectors (0 rows for zero tensors)
    valid = norms > tol
    if not valid.any():
        return np.zeros(n)
    a = np.where(valid, alpha, 0.0)
    a = a / a.sum()

    def norm(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ gu @ c), 0.0))

    mean = a.copy()  # coefficients of the mean on the u_i
    m_norm = norm(mean)
    if m_norm < tol:
        mean = np.zeros(n)
        mean[int(np.argmax(valid))] = 1.0
    else:
        mean = mean / m_norm
    for _ in range(max_iter):
        dots = np.clip(gu @ mean, -1.0, 1.0)
        tangent = np.zeros(n)
        for i in np.flatnonzero(valid):
            theta = math.acos(dots[i])
            if theta < tol:
                continue
            k = a[i] * theta / math.sin(theta)
            tangent[i] += k
            tangent -= k * dots[i] * mean
        t_norm = norm(tangent)
        if t_norm < tol:
            break
        mean = math.cos(t_norm) * mean + math.sin(t_norm) / t_norm * tangent
        u_norm = norm(mean)
        if u_norm > tol:
            mean = mean / u_norm
    scale = float(alpha @ norms)
    return scale * mean * inv


@register(
    "karcher",
    specs={"max_iter": ParamSpec(int, 0.0, None), "tol": ParamSpec(float, 0.0, None, lo_open=True)},
    needs_base=False,
    forbids_base=True,  # a recipe's base_model is one more input (engine/recipe.py lists it among the models)
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},  # accepted and ignored, as mergekit does (its recipes often set it)
    global_params={"max_iter": 10, "tol": 1e-5},
    row_weights=False,
    reference="https://arxiv.org/abs/2603.04972 (mergekit 0.1.5); Karcher 1977, Riemannian center of mass",
)
def karcher(n_models, max_iter=10, tol=1e-5, weight=None) -> Form:
    """Equal-weight Karcher mean of the inputs on the hypersphere, scaled to their mean norm."""
    if n_models == 1:
        return Form(np.ones(1, np.float32))
    it, tl = int(max_iter), float(tol)
    return Form(np.full(n_models, 1.0 / n_models, np.float32), reweigh=lambda g: coefficients_from_gram(g, it, tl).astype(np.float32))

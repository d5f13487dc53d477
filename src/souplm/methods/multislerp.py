"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere (mergekit 0.1.5).

With x_i the flattened tensors (or, given a base model, the task vectors theta_i - base), weights w
(divided by their sum when `normalize_weights`, the default) and eps (default 1e-8):

    u_i = x_i / (|x_i| + eps)              points on the unit sphere
    m   = sum_i w_i u_i,  mh = m / |m|     their weighted mean, projected back to the sphere
    T   = sum_i w_i (u_i - <u_i, mh> mh)   the weighted mean of their tangents at mh
    out = (sum_i w_i |x_i|) (cos(|T| + eps) mh + sin(|T| + eps) / (|T| + eps) T)     (then + base)

(T vanishes in exact arithmetic, as sum_i w_i <u_i, mh> = |m|: the result is the weighted mean
direction scaled to the weighted mean norm.) One model: its tensor unchanged. When |m| < eps the
points cancel: two models are interpolated linearly, w_1 x_1 + w_2 x_2 (+ base); more are an error.

The result is a linear combination of the x_i whose coefficients depend only on their Gram matrix:
`coefficients_from_gram`. A Form (weights from the Gram matrix of the models, or of their task vectors with
a base: both executors): two reads of the inputs, one for the Gram matrix (N(N+1)/2 dot products), one for
the weighted sum.
"""

from __future__ import annotations

import numpy as np

from ..errors import SoupError
from .form import Form
from .registry import ParamSpec, register


def coefficients_from_gram(gram: np.ndarray, weight: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Coefficients [N] of the x_i from their Gram matrix [N, N] and the (already normalized) weights."""
    g = np.asarray(gram, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    c = w / (norms + eps)  # m = sum_i c_i x_i
    m_norm = float(np.sqrt(max(c @ g @ c, 0.0)))
    if m_norm < eps:
        if len(w) == 2:
            return w.copy()
        raise SoupError(
            "multislerp: the weighted unit vectors of a tensor sum to zero (antipodal models whose weights "
            "balance out); change the weights"
        )
    mh = c / m_norm
    dots = (g @ mh) / (norms + eps)  # <u_i, mh>
    tangent = c - float(w @ dots) * mh
    t_norm = float(np.sqrt(max(tangent @ g @ tangent, 0.0))) + eps
    return float(norms @ w) * (np.cos(t_norm) * mh + np.sin(t_norm) / t_norm * tangent)


@register(
    "multislerp",
    specs={
        "weight": ParamSpec(float),
        "normalize_weights": ParamSpec(bool),
        "eps": ParamSpec(float, 0.0, None, lo_open=True),
    },
    needs_base=False,
    optional_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},
    global_params={"normalize_weights": True, "eps": 1e-8},
    required=("weight",),
    row_weights=False,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (mergekit 0.1.5)",
)
def multislerp(weight, n_models, normalize_weights=True, eps=1e-8, has_base=False) -> Form | None:
    """Weighted mean on the hypersphere of N models (or task vectors), scaled to their weighted mean norm."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 1:
        raise SoupError("multislerp takes one weight per model, not per row")
    if n_models == 1:
        return Form(np.ones(1, np.float32))  # the one model, unchanged
    if normalize_weights:
        total = float(w.sum())
        if abs(total) < 1e-12:
            raise SoupError("multislerp weights sum to zero and cannot be normalized (set normalize_weights: false)")
        w = w / total
    e = float(eps)
    return Form(w.astype(np.float32), use_base=has_base,
                reweigh=lambda g: coefficients_from_gram(g, w, e).astype(np.float32))

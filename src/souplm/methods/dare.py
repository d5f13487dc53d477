"""DARE: drop each task-vector entry with probability p = 1 - density and rescale survivors by 1/(1-p).

`dare_linear` then adds the weighted sum of the sparsified task vectors; `dare_ties` runs TIES sign
election and disjoint mean on them instead (no magnitude trim). The random stream and the keep levels
are in `steps.py` (one stream for both executors).
"""

from __future__ import annotations

from .form import Form, as_weights
from .registry import register
from .steps import draw_key, draw_keys, draws, drop_and_rescale, keep_level, survivor_scale

__all__ = ["dare_linear", "dare_ties", "draw_key", "draw_keys", "draws", "drop_and_rescale", "keep_level",
           "survivor_scale"]


@register(
    "dare_linear",
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"lambda": 1.0, "normalize": False},
    random=True,
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_linear(weight, density, normalize=False, lam=1.0) -> Form:
    """base + lambda * sum_i w_i * dare(theta_i - base)."""
    return Form(as_weights(weight, normalize), use_base=True, lam=lam, drop=[float(p) for p in density])


@register(
    "dare_ties",
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"lambda": 1.0, "normalize": True},
    random=True,
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_ties(weight, density, normalize=True, lam=1.0) -> Form:
    """base + lambda * disjoint_mean(elect_sign(dare(theta_i - base)))."""
    return Form(as_weights(weight), use_base=True, elect=True, normalize=normalize, lam=lam,
                drop=[float(p) for p in density])

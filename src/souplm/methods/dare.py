"""DARE: drop each task-vector entry with probability p = 1 - density, and rescale the survivors.

`dare_linear` then adds the weighted sum of the sparsified task vectors; `dare_ties` runs TIES sign
election and disjoint mean on them instead (no magnitude trim). The random stream and the keep levels
are in `steps.py` (one stream for both executors).

The rescale, as mergekit 0.1.5 does it by default (`rescale: true`): each dropped task vector is scaled
back to its own L1 norm. `exact_rescale: true` scales every survivor by 1/(1-p) instead, the DARE paper's
rule, unbiased entry by entry; `rescale: false` leaves the survivors as they are.
"""

from __future__ import annotations

from .form import Form, as_weights
from .registry import ParamSpec, register
from .steps import draw_key, draw_keys, draws, drop_and_rescale, keep_level, survivor_scale

RESCALE = {"rescale": ParamSpec(bool), "exact_rescale": ParamSpec(bool)}
__all__ = ["dare_linear", "dare_ties", "draw_key", "draw_keys", "draws", "drop_and_rescale", "keep_level",
           "survivor_scale"]


def rescale_rule(rescale: bool, exact_rescale: bool) -> str | None:
    """The Form's rescale of the survivors from the two switches."""
    return ("inverse" if exact_rescale else "l1") if rescale else None


@register(
    "dare_linear",
    specs=RESCALE,
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"lambda": 1.0, "normalize": False, "rescale": True, "exact_rescale": False},
    random=True,
    required=("weight",),
    native_dtype=True,
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_linear(weight, density, normalize=False, lam=1.0, rescale=True, exact_rescale=False) -> Form:
    """base + lambda * sum_i w_i * dare(theta_i - base)."""
    return Form(as_weights(weight), use_base=True, normalize=normalize, lam=lam, drop=[float(p) for p in density],
                rescale=rescale_rule(rescale, exact_rescale))


@register(
    "dare_ties",
    specs=RESCALE,
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"lambda": 1.0, "normalize": False, "rescale": True, "exact_rescale": False},
    random=True,
    required=("weight",),
    native_dtype=True,
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_ties(weight, density, normalize=False, lam=1.0, rescale=True, exact_rescale=False) -> Form:
    """base + lambda * elect_sign(dare(theta_i - base)) (divided by the agreeing weight when normalize)."""
    return Form(as_weights(weight), use_base=True, elect=True, normalize=normalize, lam=lam,
                drop=[float(p) for p in density], rescale=rescale_rule(rescale, exact_rescale))

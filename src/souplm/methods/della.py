"""DELLA (MAGPRUNE): drop task-vector entries at random, the small ones more often, then TIES election
(`della`) or a weighted sum (`della_linear`).

As in mergekit 0.1.5: entries are ranked by magnitude within each row (dim 1; a 1-D tensor is one row);
rank r of m (0 = smallest) is kept with probability p = (density - epsilon) + 2 epsilon r / (m - 1), a
ramp from density - epsilon to density + epsilon whose mean is density (`steps.ramp_levels`, computed in
mergekit's dtype: bfloat16 for bfloat16 tensors, else float32). With `rescale` (the default) the pruned
tensor is scaled to keep its L1 norm (mergekit's choice; the paper's per-entry 1/p is not used).
density >= 1 keeps the task vector whole. density +/- epsilon must lie inside (0, 1).

The draws are souplm's counter-based stream (`dare.draws`), keyed by (seed, tensor, model): each entry's
16-bit draw is compared with round(p * 2**16), so results are reproducible and order-independent and
match mergekit in distribution (not bit for bit; mergekit uses torch.bernoulli). Ties in magnitude rank in
index order. Stated as a Form (a drop with a `ramp`), so both executors run it: the fused one ranks each
row with a radix sort in C and draws the mask in one pass, then combines in a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .breadcrumbs import decimals
from .form import Form, as_weights
from .registry import ParamSpec, register

if TYPE_CHECKING:
    import numpy as np

SPECS = {
    "epsilon": ParamSpec(float, 0.0, 0.5, hi_open=True),
    "rescale": ParamSpec(bool),
}


def check_window(params: dict[str, np.ndarray], where: str) -> str | None:
    """Why density +/- epsilon leaves (0, 1) for some model (None when it does not): mergekit refuses it
    the same way, except for density >= 1 (no pruning, epsilon unused)."""
    from .steps import recipe_decimal as exact

    for i, (d, e) in enumerate(zip(params["density"].reshape(-1), params["epsilon"].reshape(-1))):
        d, e = exact(float(d)), exact(float(e))
        if d < 1.0 and (d + e >= 1.0 or d - e <= 0.0):
            return (f"models[{i}]: density {d:g} +/- epsilon {e:g} must lie inside (0, 1) "
                    f"(lower epsilon below {min(d, 1.0 - d):g}){where}")
    return None


CONTRACT = {
    "specs": SPECS,
    "needs_base": True,
    "min_models": 1,
    "max_models": None,
    "model_params": {"weight": 1.0, "density": 1.0, "epsilon": 0.15},
    "required": ("weight",),
    "random": True,
    "check_params": check_window,
    "native_dtype": True,
    "reference": "https://arxiv.org/abs/2406.11617",
}


def _form(weight, density, epsilon, normalize, lam, rescale, elect) -> Form:
    return Form(as_weights(weight), use_base=True, elect=elect, normalize=normalize, lam=lam,
                drop=decimals(density), ramp=decimals(epsilon), rescale="l1" if rescale else None)


@register("della", global_params={"lambda": 1.0, "normalize": True, "rescale": True}, **CONTRACT)
def della(weight, density, epsilon, normalize=True, lam=1.0, rescale=True) -> Form:
    """base + lambda * disjoint_mean(elect_sign(w_i magprune(theta_i - base; density_i, epsilon_i)))."""
    return _form(weight, density, epsilon, normalize, lam, rescale, elect=True)


@register("della_linear", global_params={"lambda": 1.0, "normalize": False, "rescale": True}, **CONTRACT)
def della_linear(weight, density, epsilon, normalize=False, lam=1.0, rescale=True) -> Form:
    """base + lambda * sum_i w_i magprune(theta_i - base; density_i, epsilon_i)."""
    return _form(weight, density, epsilon, normalize, lam, rescale, elect=False)

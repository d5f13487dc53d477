"""Model Breadcrumbs: drop the largest `gamma` fraction of each task vector (outliers) and the smallest
entries, keeping a `density` fraction; then task arithmetic (`breadcrumbs`) or TIES election
(`breadcrumbs_ties`).

Per tensor (flattened, mergekit 0.1.5's ranking): with n entries, keep = int(density * n), top =
int(gamma * n), the entries of ascending-magnitude rank [n - keep - top, n - top) survive (the outlier
cut shrinks when keep + top > n); of entries tied at a cut, a lower index ranks as the larger. density >= 1
leaves the task vector whole (gamma is then not applied). `rescale` scales the survivors back to the task
vector's L1 norm. Stated as a Form (methods/form.py: a trim with `outliers`), so both executors run it; the
fused one finds both cuts by one radix select (two passes over the inputs) before its combining pass.
"""

from __future__ import annotations

from .form import Form, as_weights
from .registry import ParamSpec, register
from .steps import recipe_decimal

SPECS = {
    "gamma": ParamSpec(float, 0.0, 1.0),
    "rescale": ParamSpec(bool),
}

CONTRACT = {
    "specs": SPECS,
    "needs_base": True,
    "min_models": 1,
    "max_models": None,
    "model_params": {"weight": 1.0, "density": 1.0, "gamma": 0.01},
    "global_params": {"lambda": 1.0, "normalize": False, "rescale": False},
    "required": ("weight",),
    "native_dtype": True,
    "reference": "https://arxiv.org/abs/2312.06795",
}


def decimals(values) -> list[float]:
    """Per-model values as the recipe's decimals (counts such as int(density * n) see mergekit's numbers)."""
    return [recipe_decimal(float(v)) for v in values]


def _form(weight, density, gamma, normalize, lam, rescale, elect) -> Form:
    return Form(as_weights(weight), use_base=True, elect=elect, normalize=normalize, lam=lam,
                trim=decimals(density), outliers=decimals(gamma), rescale="l1" if rescale else None)


@register("breadcrumbs", **CONTRACT)
def breadcrumbs(weight, density, gamma, normalize=False, lam=1.0, rescale=False) -> Form:
    """base + lambda * sum_i w_i breadcrumb(theta_i - base; density_i, gamma_i)."""
    return _form(weight, density, gamma, normalize, lam, rescale, elect=False)


@register("breadcrumbs_ties", **CONTRACT)
def breadcrumbs_ties(weight, density, gamma, normalize=False, lam=1.0, rescale=False) -> Form:
    """base + lambda * disjoint_sum(elect_sign(w_i breadcrumb(theta_i - base; density_i, gamma_i)))."""
    return _form(weight, density, gamma, normalize, lam, rescale, elect=True)

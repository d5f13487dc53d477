"""WiSE-FT: interpolate from the base (zero-shot) model towards one fine-tuned model."""

from __future__ import annotations

from .form import Form, as_weights
from .registry import register


@register(
    "wise_ft",
    needs_base=True,
    min_models=1,
    max_models=1,
    model_params={"weight": 0.5},
    reference="https://arxiv.org/abs/2109.01903",
)
def wise_ft(weight) -> Form:
    """(1 - alpha) theta_base + alpha theta_ft, where alpha is the fine-tuned model's weight:
    theta_base + alpha (theta_ft - theta_base)."""
    return Form(as_weights(weight), use_base=True)

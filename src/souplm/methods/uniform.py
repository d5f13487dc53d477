"""Uniform soup: the plain mean of N models (Wortsman et al. 2022)."""

from __future__ import annotations

import numpy as np

from .form import Form
from .registry import register


@register(
    "uniform",
    needs_base=False,
    min_models=1,
    max_models=None,
    reference="https://arxiv.org/abs/2203.05482",
)
def uniform(n_models: int) -> Form:
    """Plain mean (1/N) sum_i theta_i."""
    return Form(np.full(n_models, 1.0 / n_models, dtype=np.float32))

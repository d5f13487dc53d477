"""Uniform soup: the plain mean of N models (Wortsman et al. 2022)."""

from __future__ import annotations

from .linear import weighted_sum
from .registry import register


@register(
    "uniform",
    needs_base=False,
    min_models=1,
    max_models=None,
    reference="https://arxiv.org/abs/2203.05482",
)
def uniform(tensors, base):
    """Plain mean (1/N) sum_i theta_i."""
    import torch

    return weighted_sum(tensors, torch.full((len(tensors),), 1.0 / len(tensors)))

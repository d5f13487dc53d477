"""Linear soup: a weighted average, the SoupLM paper's vanilla soup alpha*theta1 + (1-alpha)*theta2."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .form import Form, as_weights
from .registry import register
from .steps import weighted_sum

if TYPE_CHECKING:
    import torch

__all__ = ["linear", "normalized", "weighted_sum"]


def normalized(weight: torch.Tensor, name: str = "weights") -> torch.Tensor:
    """Torch weights [N] (or [N, rows]) divided by their sum (for methods stated directly in torch)."""
    total = weight.sum(dim=0)
    if bool((total.abs() < 1e-12).any()):
        from ..errors import SoupError

        raise SoupError(f"{name} sum to zero and cannot be normalized (set normalize: false)")
    return weight / total


@register(
    "linear",
    needs_base=False,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0},
    global_params={"normalize": True},
    reference="https://arxiv.org/abs/2203.05482 (model soups); https://arxiv.org/abs/2407.08196 Eq. 2",
)
def linear(weight, normalize=True) -> Form:
    """Weighted average sum_i w_i theta_i (weights normalized to sum 1 unless normalize: false)."""
    return Form(as_weights(weight, nonzero_sum=normalize), normalize=normalize)

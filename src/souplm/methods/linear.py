"""Linear soup: a weighted average, the SoupLM paper's vanilla soup alpha*theta1 + (1-alpha)*theta2."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import broadcast, register

if TYPE_CHECKING:
    import torch


def weighted_sum(tensors: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """sum_i weight_i * tensors_i, with weight [N] or [N, rows]; accumulates in place, into tensors[0]
    (the engine hands methods fresh copies they may overwrite): no new buffer of the tensor's size."""
    if weight.dim() == 1:  # the common case: scalars, no stacked copy of the inputs
        out = tensors[0].mul_(float(weight[0]))
        for t, w in zip(tensors[1:], weight[1:].tolist()):
            out.add_(t, alpha=w)
        return out
    w = broadcast(weight, tensors[0])
    out = tensors[0].mul_(w[0])
    for t, wi in zip(tensors[1:], w[1:]):
        out.addcmul_(t, wi)
    return out


def normalized(weight: torch.Tensor, name: str = "weights") -> torch.Tensor:
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
def linear(tensors, base, weight, normalize=True):
    """Weighted average sum_i w_i theta_i (weights normalized to sum 1 unless normalize: false)."""
    return weighted_sum(tensors, normalized(weight) if normalize else weight)

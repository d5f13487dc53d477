"""Regularized soup (SoupLM paper, Eq. 4): loss + lambda * sum over units of ||raw_u - raw_init_u||.

How souplm reads Eq. 4. The paper writes the penalty as a norm of alpha; but on the simplex the L1
norm of alpha is constant (the weights of a unit always sum to 1), so the literal term has zero
gradient. What the paper's regularizer can mean, and what souplm penalizes, is how far each unit's
*raw* learnable parameter has moved from its initialization: lambda controls how far alpha may
move from where it started (with the sigmoid activation, raw init 0, it is exactly |raw|).

Normalized per unit, so one lambda means one strength whatever the activation or granularity:

- softmax is invariant to adding a constant to a unit's raw values, so only the centred raw
  (raw minus its mean over the models) is penalized, and for two models the term is made equal to
  the sigmoid's on the logit difference r1 - r2 (the sigmoid's raw): L1 sums |d c_i| (= |d(r1-r2)|
  for two models), L2 sums 2 (d c_i)^2 (= d(r1-r2)^2 for two models);
- `row` granularity: a unit's term is the mean over its rows, not the sum, so a tensor with 4096
  rows weighs as much as one with a single alpha.

Without `units` (a bare raw vector) the penalty is the plain sum over raw values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

REGULARIZERS: tuple[str, ...] = ("none", "l1", "l2")

# (offset into the flat raw vector, raw shape, softmax-style: one raw value per model on dim 0)
UnitSlot = tuple[int, tuple[int, ...], bool]


def l1(raw: torch.Tensor, raw_init: torch.Tensor) -> torch.Tensor:
    return (raw - raw_init).abs().sum()


def l2(raw: torch.Tensor, raw_init: torch.Tensor) -> torch.Tensor:
    # Squared L2, the usual weight-decay form: its gradient 2 * (raw - raw_init) is smooth at init.
    return (raw - raw_init).pow(2).sum()


def _unit_term(kind: str, d: torch.Tensor, centred: bool) -> torch.Tensor:
    if centred:
        d = d - d.mean(0, keepdim=True)
    rows = d.shape[1:].numel() if centred else d.numel()
    term = d.abs().sum() if kind == "l1" else d.pow(2).sum() * (2.0 if centred else 1.0)
    return term / max(rows, 1)


def penalty(kind: str, lam: float, raw: torch.Tensor, raw_init: torch.Tensor,
            units: Sequence[UnitSlot] | None = None) -> torch.Tensor:
    """lambda times the chosen norm (per unit when `units` is given); zero for `none` or lambda 0."""
    if kind == "none" or lam == 0.0:
        return raw.new_zeros(())
    if kind not in ("l1", "l2"):
        raise ValueError(f"unknown regularizer {kind!r}")
    if units is None:
        return lam * (l1(raw, raw_init) if kind == "l1" else l2(raw, raw_init))
    d = raw - raw_init
    total = raw.new_zeros(())
    for offset, shape, centred in units:
        n = shape.numel() if isinstance(shape, torch.Size) else int(torch.Size(shape).numel())
        total = total + _unit_term(kind, d[offset:offset + n].view(shape), centred)
    return lam * total

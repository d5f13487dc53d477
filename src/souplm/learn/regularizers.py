"""Regularized soup (SoupLM paper, Eq. 4): loss + lambda * ||raw - raw_init||.

The penalty is on the raw parameter's distance from its initialization, so lambda controls how far
alpha may move from where it started. With the sigmoid activation (raw init 0) the L1 term is exactly
the paper's ||alpha||_1 on the raw parameter. Sums, not means: lambda is per raw value, as in Eq. 4.
"""

from __future__ import annotations

import torch

REGULARIZERS: tuple[str, ...] = ("none", "l1", "l2")


def l1(raw: torch.Tensor, raw_init: torch.Tensor) -> torch.Tensor:
    return (raw - raw_init).abs().sum()


def l2(raw: torch.Tensor, raw_init: torch.Tensor) -> torch.Tensor:
    # Squared L2, the usual weight-decay form: its gradient 2 * (raw - raw_init) is smooth at init.
    return (raw - raw_init).pow(2).sum()


def penalty(kind: str, lam: float, raw: torch.Tensor, raw_init: torch.Tensor) -> torch.Tensor:
    """lambda times the chosen norm; a zero tensor for `none` or lambda 0."""
    if kind == "none" or lam == 0.0:
        return raw.new_zeros(())
    if kind == "l1":
        return lam * l1(raw, raw_init)
    if kind == "l2":
        return lam * l2(raw, raw_init)
    raise ValueError(f"unknown regularizer {kind!r}")

"""The method registry: a merge method is a pure function on tensors plus a declared contract.

A method function receives the models' tensors (fp32, same shape), the base tensor when the method
needs one, its per-model parameters as tensors of shape [N] (the `weight` may be [N, rows] when a
coefficient table sets one weight per output row) and its global parameters. It returns the merged
tensor. Inputs are fresh copies the method may overwrite in place. The contract (needs a base model? how many models? which parameters, with which defaults)
is checked when the recipe is read, before any tensor is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import SoupError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]
    needs_base: bool
    min_models: int
    max_models: int | None
    model_params: dict[str, float] = field(default_factory=dict)  # per-model, with defaults
    global_params: dict[str, object] = field(default_factory=dict)
    random: bool = False  # takes `keys`, one 64-bit draw key per model (DARE)
    row_weights: bool = True  # accepts [N, rows] weights from a row-granularity table
    reference: str = ""
    summary: str = ""

    def check(self, n_models: int, has_base: bool) -> None:
        if self.needs_base and not has_base:
            raise SoupError(f"method {self.name} needs a base_model")
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            want = str(self.min_models) if self.max_models == self.min_models else (
                f"at least {self.min_models}" if self.max_models is None else f"{self.min_models}-{self.max_models}"
            )
            raise SoupError(f"method {self.name} takes {want} models (besides the base), got {n_models}")


METHODS: dict[str, Method] = {}


def register(name: str, **contract) -> Callable:
    def deco(fn: Callable) -> Callable:
        METHODS[name] = Method(name=name, fn=fn, summary=(fn.__doc__ or "").strip().split("\n")[0], **contract)
        return fn

    return deco


def get_method(name: str) -> Method:
    from . import builtin  # noqa: F401  (registers the methods)

    try:
        return METHODS[name]
    except KeyError:
        raise SoupError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def broadcast(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape per-model weights [N] or [N, rows] to broadcast against a stacked [N, *like.shape]."""
    return w.reshape(*w.shape, *([1] * (like.dim() + 1 - w.dim())))

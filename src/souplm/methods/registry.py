"""The method registry: a merge method is a pure function on tensors plus a declared contract.

A method function receives the models' tensors (fp32, same shape), the base tensor when the method
needs one, its per-model parameters as tensors of shape [N] (the `weight` may be [N, rows] when a
coefficient table sets one weight per output row) and its global parameters. It returns the merged
tensor. Inputs are fresh copies the method may overwrite in place. The contract (needs a base model? how many models? which parameters, with which defaults)
is checked when the recipe is read, before any tensor is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import SoupError, short_repr

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter's type and documented range, checked before any tensor is read.

    `lo`/`hi` bound the value (`lo_open`/`hi_open`: the bound itself excluded); an `extrapolable` range
    may be left only when the recipe says `allow_extrapolation: true`. `optional`: None is allowed
    (slerp's `t`, taken from the weights when unset)."""

    kind: type  # float or bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    extrapolable: bool = False
    optional: bool = False

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.lo is None and self.hi is None:
            return "a finite number"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"in {'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"

    def check(self, value: object, where: str, extrapolate: bool = False) -> None:
        """Raise a one-line SoupError naming `where` (parameter and model) and the value when it does not fit."""
        if value is None and self.optional:
            return
        if self.kind is bool:
            if not isinstance(value, bool):
                raise SoupError(f"{where} must be true or false (a YAML boolean), got {short_repr(value)}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SoupError(f"{where} must be a number, got {short_repr(value)}")
        v = float(value)
        if not math.isfinite(v):
            raise SoupError(f"{where} must be finite, got {short_repr(value)}")
        if self.extrapolable and extrapolate:
            return
        below = self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo))
        above = self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi))
        if below or above:
            hint = " (set allow_extrapolation: true in the recipe to extrapolate)" if self.extrapolable else ""
            raise SoupError(f"{where} = {short_repr(value)} is out of range: must be {self.describe()}{hint}")


# The declarative spec of every method parameter: one entry per name, overridden per method where the
# method gives the name a narrower meaning. A parameter without an entry is refused at registration.
PARAM_SPECS: dict[str, ParamSpec] = {
    "weight": ParamSpec(float),  # task-vector methods: any finite scale (negative = task negation)
    "density": ParamSpec(float, 0.0, 1.0, lo_open=True),
    "lambda": ParamSpec(float),
    "t": ParamSpec(float, 0.0, 1.0, extrapolable=True, optional=True),
    "epsilon": ParamSpec(float, 0.0, None, lo_open=True),
    "normalize": ParamSpec(bool),
}
METHOD_PARAM_SPECS: dict[tuple[str, str], ParamSpec] = {
    # interpolations: a negative weight leaves the segment between the models
    ("linear", "weight"): ParamSpec(float, 0.0, None, extrapolable=True),
    ("slerp", "weight"): ParamSpec(float, 0.0, None, extrapolable=True),
    ("wise_ft", "weight"): ParamSpec(float, 0.0, 1.0, extrapolable=True),
}


def param_spec(method: str, name: str) -> ParamSpec:
    spec = METHOD_PARAM_SPECS.get((method, name), PARAM_SPECS.get(name))
    if spec is None:
        raise SoupError(f"method {method}: parameter {name!r} has no declared type and range")
    return spec


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

    def spec(self, name: str) -> ParamSpec:
        return param_spec(self.name, name)


METHODS: dict[str, Method] = {}


def register(name: str, specs: dict[str, ParamSpec] | None = None, **contract) -> Callable:
    """Register `fn` as method `name`. `specs`: the type and range of parameters this method names (or
    gives a narrower meaning than PARAM_SPECS), declared beside the method itself."""
    def deco(fn: Callable) -> Callable:
        for key, spec in (specs or {}).items():
            METHOD_PARAM_SPECS[(name, key)] = spec
        for key in (*contract.get("model_params", {}), *contract.get("global_params", {})):
            param_spec(name, key)  # every parameter declares its type and range
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

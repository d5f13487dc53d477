"""The method registry: a merge method is one statement plus a declared contract.

The statement is one of two kinds:

- a *form builder* (`methods/form.py`): a function of the method's parameters that returns the `Form`
  every executor runs (the fused C kernels in one pass, or torch), or a `Program` (`methods/program.py`:
  passes of entrywise operations, for methods such as nearswap whose weight is per entry). Its per-model parameters arrive as
  float32 NumPy arrays [N] (the `weight` may be [N, rows] when a coefficient table sets one weight per
  output row), its global parameters by name (`lambda` as `lam`), and `n_models` if it asks for it;
- a *tensor function* `fn(tensors, base, **params)`, recognised by its first parameter `tensors`: the
  models' tensors (fresh fp32 copies it may overwrite in place), the base tensor when the method needs
  one, per-model parameters as torch tensors [N]; it returns the merged tensor. Only the torch executor
  runs these: for methods that are not one pass of the Form pipeline.

The contract (needs a base model? how many models? which parameters, with which defaults) is checked
when the recipe is read, before any tensor is loaded.
"""

from __future__ import annotations

import inspect
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

    kind: type  # float, int (a whole number, e.g. an iteration count) or bool
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
        whole = "a whole number " if self.kind is int else ""
        return f"{whole}in {'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"

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
        if self.kind is int and not v.is_integer():
            raise SoupError(f"{where} must be a whole number, got {short_repr(value)}")
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
    # a check across one tensor's per-model values (name -> [N] array, where-suffix) -> why not, or None
    check_params: Callable[[dict, str], str | None] | None = None
    optional_base: bool = False  # uses base_model when the recipe names one (needs_base: must name one)
    forbids_base: bool = False  # refuses a base_model (passthrough: one model, nothing else)
    required: tuple[str, ...] = ()  # parameters without a default: the recipe must set them (as mergekit's)
    # required parameters a coefficient table states instead for the tensors it lists (slerp's t: the second
    # model's share of the table's weights), as it overrides per-model weights there
    table_states: tuple[str, ...] = ()
    native_dtype: bool = False  # mergekit computes it in the tensors' dtype (engine/precision.py), not float32
    reference: str = ""
    summary: str = ""
    form: Callable | None = None  # the form builder (a Form or a Program), when it is the statement (fn derives from it)

    def form_for(self, n_models: int, params: dict, has_base: bool = False) -> object:
        """The method's Form (or Program) for one tensor: `params` holds its per-model (NumPy [N]) and global
        values."""
        accepted = inspect.signature(self.form).parameters
        kwargs = {("lam" if k == "lambda" else k): v for k, v in params.items() if v is not None}
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if "n_models" in accepted:
            kwargs["n_models"] = n_models
        if "has_base" in accepted:
            kwargs["has_base"] = has_base
        return self.form(**kwargs)

    def check(self, n_models: int, has_base: bool) -> None:
        if self.needs_base and not has_base:
            raise SoupError(f"method {self.name} needs a base_model")
        if self.forbids_base and has_base:
            raise SoupError(f"method {self.name} takes no base_model (only its model(s))")
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            want = str(self.min_models) if self.max_models == self.min_models else (
                f"at least {self.min_models}" if self.max_models is None else f"{self.min_models}-{self.max_models}"
            )
            noun = "model" if want == "1" else "models"
            raise SoupError(f"method {self.name} takes {want} {noun} (besides the base), got {n_models}")

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
        summary = (fn.__doc__ or "").strip().split("\n")[0]
        if next(iter(inspect.signature(fn).parameters), None) == "tensors":
            METHODS[name] = Method(name=name, fn=fn, summary=summary, **contract)
        else:
            METHODS[name] = Method(name=name, fn=_torch_statement(name), summary=summary, form=fn, **contract)
        return fn

    return deco


def _torch_statement(name: str) -> Callable:
    """A form method as a tensor function: its Form, run by torch (`form.run`)."""
    def fn(tensors, base, keys=None, **params):
        from .form import as_numpy, run
        from .program import Program, compute_of

        method = METHODS[name]
        form = method.form_for(len(tensors), {k: as_numpy(v) for k, v in params.items()}, has_base=base is not None)
        if isinstance(form, Program):  # in the tensors' dtype where mergekit computes in it (engine/precision.py)
            codes = {str(t.dtype) for t in tensors} | ({str(base.dtype)} if base is not None else set())
            one = compute_of(codes.pop()) if len(codes) == 1 else "F32"
            return run(form, tensors, base, compute=one if method.native_dtype else "F32")
        return run(form, tensors, base, keys)

    fn.__name__ = f"{name}_in_torch"
    return fn


def get_method(name: str) -> Method:
    from . import builtin  # noqa: F401  (registers the methods)

    try:
        return METHODS[name]
    except KeyError:
        raise SoupError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def broadcast(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape per-model weights [N] or [N, rows] to broadcast against a stacked [N, *like.shape]."""
    return w.reshape(*w.shape, *([1] * (like.dim() + 1 - w.dim())))

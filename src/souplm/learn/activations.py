"""Activations: how a unit's raw learnable parameter becomes its mixing weights alpha.

The four options of the SoupLM paper (its footnote 2), with the paper's initializations:

    name      alpha                                  raw init    alpha range     models
    sigmoid   a1 = sigmoid(raw),       a2 = 1 - a1   0           (0, 1)          exactly 2
    linear    a1 = raw,                a2 = 1 - a1   0.5         unbounded       exactly 2
    clamp     a1 = clamp(raw, 0, 1),   a2 = 1 - a1   0.5         [0, 1]          exactly 2
    softmax   a = softmax(raw over the models)       0.5 each    (0, 1), sum 1   any N >= 2

A unit's raw parameter has shape `raw_shape(n_models, rows)`: the three two-model activations learn
only alpha_1 (shape `rows`), softmax learns one raw value per model (shape `(n_models, *rows)`).
`rows` is `()` for one alpha per unit and `(R,)` for row granularity. The result always has shape
`(n_models, *rows)` and sums to 1 over models.
"""

from __future__ import annotations

import torch

from ..errors import SoupError


class Activation:
    """Base class: subclasses set `name`, `init_value`, `bounds` and implement `__call__`."""

    name: str = ""
    init_value: float = 0.0
    # Range of every alpha it can produce (None: unbounded on that side); tests check it.
    bounds: tuple[float | None, float | None] = (None, None)
    two_models_only: bool = True

    def check_models(self, n_models: int) -> None:
        if n_models < 2:
            raise SoupError(f"a soup needs at least 2 models, got {n_models}")
        if self.two_models_only and n_models != 2:
            raise SoupError(
                f"activation {self.name!r} mixes exactly 2 models (it learns alpha_1 and sets "
                f"alpha_2 = 1 - alpha_1), but {n_models} models are given; use activation: softmax"
            )

    def raw_shape(self, n_models: int, rows: tuple[int, ...] = ()) -> tuple[int, ...]:
        return tuple(rows) if self.two_models_only else (n_models, *rows)

    def init(self, n_models: int, rows: tuple[int, ...] = ()) -> torch.Tensor:
        """The paper's starting raw value, float32."""
        return torch.full(self.raw_shape(n_models, rows), float(self.init_value))

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _pair(a1: torch.Tensor) -> torch.Tensor:
        return torch.stack([a1, 1.0 - a1])


class Sigmoid(Activation):
    name, init_value, bounds = "sigmoid", 0.0, (0.0, 1.0)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return self._pair(torch.sigmoid(raw))


class Linear(Activation):
    # Unbounded on purpose: the paper's "keep it the same"; it can extrapolate past either model.
    name, init_value, bounds = "linear", 0.5, (None, None)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return self._pair(raw)


class Clamp(Activation):
    # Outside [0, 1] the clamp has zero gradient, so only a regularizer can pull raw back: that is
    # the paper's definition, kept as is.
    name, init_value, bounds = "clamp", 0.5, (0.0, 1.0)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return self._pair(raw.clamp(0.0, 1.0))


class Softmax(Activation):
    name, init_value, bounds, two_models_only = "softmax", 0.5, (0.0, 1.0), False

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.softmax(raw, dim=0)


ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name: cls for cls in (Sigmoid, Linear, Clamp, Softmax)
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise SoupError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None

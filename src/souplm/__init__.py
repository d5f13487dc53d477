"""souplm: model soups for language and multimodal models.

    import souplm
    recipe = souplm.Recipe.vanilla("path/to/A", "path/to/B", alpha=0.3)   # 0.3*A + 0.7*B
    souplm.merge(recipe, "out/soup")

    souplm.learn("learn.yaml")                      # learnable soup -> coefficient table + model
    souplm.evaluate("out/soup", ["shakespeare-ppl"])  # scores per task

The library is the product; the `souplm` command is a thin layer over it. `souplm.learn` and
`souplm.evaluate` are subpackages that can be called like functions; they import torch-heavy code, so
they load on first use.
"""

__version__ = "0.1.0"

from .errors import SoupError

# Imported on first touch (PEP 562): the `souplm` command reads its arguments, and sets its process-wide
# defaults (cli.main), before numpy and the engine load; subpackages that import torch load on first use.
_LAZY = {
    "merge": ("engine", "merge"),
    "open_sources": ("engine", "open_sources"),
    "soup_into": ("engine", "soup_into"),
    "CoefficientTable": ("engine.coefficients", "CoefficientTable"),
    "Recipe": ("engine.recipe", "Recipe"),
    "learn": ("learn", None),
    "evaluate": ("evaluate", None),
}

__all__ = [
    "CoefficientTable",
    "Recipe",
    "SoupError",
    "__version__",
    "evaluate",
    "learn",
    "merge",
    "open_sources",
    "soup_into",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'souplm' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(f".{module}", __name__)
    return value if attr is None else getattr(value, attr)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

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

from .engine import merge, open_sources, soup_into
from .engine.coefficients import CoefficientTable
from .engine.recipe import Recipe
from .errors import SoupError

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
    # Lazy: `import souplm` stays light for `souplm merge`; the first touch imports the subpackage.
    if name in ("learn", "evaluate"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'souplm' has no attribute {name!r}")

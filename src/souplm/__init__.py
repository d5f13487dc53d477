"""souplm: model soups for language and multimodal models.

    import souplm
    recipe = souplm.Recipe.vanilla("path/to/A", "path/to/B", alpha=0.3)   # 0.3*A + 0.7*B
    souplm.merge(recipe, "out/soup")

The library is the product; the `souplm` command is a thin layer over it.
"""

__version__ = "0.1.0"

from .coefficients import CoefficientTable  # noqa: E402
from .engine import merge, open_sources, soup_into  # noqa: E402
from .errors import SoupError  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = ["CoefficientTable", "Recipe", "SoupError", "merge", "open_sources", "soup_into", "__version__"]

"""Importing this module registers every built-in method (one file per method)."""

from . import dare, linear, slerp, task_arithmetic, ties, uniform, wise_ft  # noqa: F401
from . import breadcrumbs, della, model_stock, sce  # noqa: F401  (sparsified task vectors, model stock)

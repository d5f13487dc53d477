"""The merge engine, in the order a merge runs:

1. `recipe`: what to merge, how, with which parameters (souplm's YAML, a superset of mergekit's);
   `coefficients`: per-unit weights (learned, searched or hand-written) that override the recipe's;
2. `plan`: one `Item` per output tensor (its inputs, method parameters, shape, dtype, shard), every check
   done from the headers before a byte is read (`sources` opens the checkpoints and builds it);
3. execute: `execute_fused` (one-pass C kernels, no torch) or `execute_torch` (any method, host or GPU),
   both running each method's one statement (`souplm.methods`);
4. `write`: the sinks, a checkpoint directory put in place atomically, or an in-memory model.

Every soup in souplm ends here: hand-written recipes, learned coefficient tables and searched alphas all
become a `Recipe` (+ optional `CoefficientTable`).
"""

from .coefficients import CoefficientTable
from .execute_torch import merged_tensors, resolve_device
from .plan import Item, Plan, build_plan
from .recipe import Recipe
from .sources import Sources, open_sources, prepare
from .write import MergeReport, executor_for, merge, soup_into

__all__ = [
    "CoefficientTable", "Item", "MergeReport", "Plan", "Recipe", "Sources", "build_plan", "executor_for", "merge",
    "merged_tensors", "open_sources", "prepare", "resolve_device", "soup_into",
]

"""Shared pieces of the sparsified task-vector methods (breadcrumbs, DELLA, SCE).

mergekit 0.1.5 runs these methods as "generalized task arithmetic": sparsify each task vector
tau_i = theta_i - base on its own, multiply by its weight, then either sum (no consensus) or keep, per
entry, the models whose weighted entry has the elected sign (TIES's election) and divide by their weight
mass; normalize by the weight sum, scale by lambda, add the base. breadcrumbs and DELLA are stated as Forms
(methods/form.py, steps in methods/steps.py); what remains here is what the recipe's numbers need.
"""

from __future__ import annotations

from .steps import recipe_decimal as exact
from .steps import window_mask as keep_positions

__all__ = ["exact", "keep_positions"]

"""Which dtype a plan item is computed in: one rule for both executors.

mergekit 0.1.5 reads each input as the recipe's `dtype` (when set) and runs its task-vector methods (task
arithmetic, TIES, DARE, ...) in that dtype, so a bf16 recipe's deltas, products, sums and quotients are
each rounded to bf16; linear and SLERP upcast to float32. souplm follows that rule by default, so a
mergekit recipe gives mergekit's bytes; `compute_dtype: float32` in a recipe computes every method in
float32 instead (more accurate: the result is rounded once, at the end).

A method opts in with `native_dtype=True` (methods/registry.py). How the rule is carried out depends on how
the method is stated, but the rule is this one function:

- a Form or a Program (both executors): its steps' results are rounded to the compute dtype
  (methods/steps.py and methods/program.py, the C kernels), the inputs staying float32 in between;
- a tensor function (torch executor only: sce, arcee_fusion): the
  executor hands it its inputs *in* the compute dtype (`input_dtype`), and the function's torch ops run in
  it, in mergekit's order, so each op rounds as mergekit's does (torch computes a bf16 op in float32 and
  rounds its result once). Where mergekit's own ops leave that dtype (arcee_fusion's float32 mask), the
  function follows them.
"""

from __future__ import annotations

from .plan import Item, Plan

CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def compute_dtype(plan: Plan, item: Item) -> str:
    """The dtype code ("F32", "BF16" or "F16") the item's arithmetic rounds to."""
    recipe, method = plan.recipe, plan.method
    if recipe.compute_dtype is not None:
        return CODES[recipe.compute_dtype]
    if not method.native_dtype:
        return "F32"
    if recipe.dtype is not None:
        return CODES[recipe.dtype]
    read = [(k, n) for k, n in zip(item.sources or range(len(item.inputs)), item.inputs)]
    if item.base is not None:
        read.append((item.base_from if item.base_from is not None else plan.base_index, item.base))
    codes = {plan.checkpoints[k].dtype(n).code for k, n in read}
    return codes.pop() if len(codes) == 1 and codes <= {"BF16", "F16"} else "F32"


def input_dtype(plan: Plan, item: Item, runs_form: bool) -> str:
    """The dtype code the torch executor reads an item's inputs in: float32 for a Form (its steps round
    themselves) and for methods mergekit runs in float32; the compute dtype for a `native_dtype` tensor
    function, whose ops then round as mergekit's do."""
    if runs_form or not plan.method.native_dtype:
        return "F32"
    return compute_dtype(plan, item)

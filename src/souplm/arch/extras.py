"""What a merge does with the tensors that are not plain language-model tensors, said in the plan.

- Outside the LM (vision tower, projector, a LLaVA-OneVision `image_newline`): merged with the recipe's
  method when every model feeding the merge has the tensor (under the key its layout lines it up by)
  with one shape and a floating-point dtype (`vision_policy: merge`, the default), else copied from the
  output model; `vision_policy: copy` copies them all from the output model (`output_model` names it).
- Dropped buffers (GPT-2's `attn.bias` masks, rotary `inv_freq`): not written, and said so.
- Inferred layouts: how each was inferred.
- Weights with no soup unit of their own (`other`): listed (`souplm.arch.units.unnamed_note`).

Every input tensor is thus merged, copied or reported as dropped; none disappears without a note.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .units import unit_of, unnamed_note

FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


def plan_extras(recipe: Any, checkpoints: list[Any], feeding: list[int], output_index: int,
                lm_names: set[str]) -> tuple[dict[str, str], list[str]]:
    """The non-LM tensors of the output model to merge (key -> the output's stored name), and notes
    saying exactly what happens to every non-LM tensor of every input."""
    out = checkpoints[output_index]
    out_names = out.extra_names()
    others = [k for k in dict.fromkeys(feeding) if k != output_index]
    keys = {k: _keys(checkpoints[k]) for k in [output_index, *others]}
    notes: list[str] = []
    for k in others:  # parts the output has no counterpart for: never written
        missing = [n for key, n in keys[k].items() if key not in keys[output_index]]
        if missing:
            notes.append(f"{len(missing)} non-LM tensors of {checkpoints[k].path} (e.g. {missing[0]}) have no "
                         f"counterpart in the output model {out.path} and are not written; name it as "
                         "output_model to write its parts instead")
    if not out_names:
        return {}, notes
    why_all = None
    if recipe.mapping is not None:
        why_all = "a mapped merge keeps the target's vision parts"
    elif getattr(recipe, "slices", None):
        why_all = "a slices: recipe merges layer ranges only"
    elif getattr(recipe, "vision_policy", "merge") == "copy":
        why_all = "vision_policy: copy"
    elif not others:
        why_all = "no other model has them"
    merged: dict[str, str] = {}
    copied: dict[str, list[str]] = {}
    for name in out_names:
        key = out.extra_key(name) if why_all is None else name
        why = why_all or _why_not_merged(key, name, checkpoints, keys, others, output_index, lm_names)
        if why is None:
            merged[key] = name
        else:
            copied.setdefault(why, []).append(name)
    if merged:
        units = Counter(unit_of(k).mapping for k in merged)
        models = ", ".join(str(checkpoints[k].path) for k in [output_index, *others])
        notes.append(f"{len(merged)} non-LM tensors (vision tower, projector, ...) merged with {recipe.merge_method} "
                     f"like the language model, from {models} (units: "
                     + ", ".join(f"{u} {n}" for u, n in sorted(units.items())) + "; vision_policy: copy copies "
                     "them from output_model instead)")
    for why, names in copied.items():
        unused = f"; those of {', '.join(str(checkpoints[k].path) for k in others)} are not used" if others else ""
        notes.append(f"{len(names)} non-LM tensors (e.g. {names[0]}) copied unchanged from {out.path} ({why}){unused}")
    return merged, notes


def _keys(ck: Any) -> dict[str, str]:
    return ck.extra_keys() if hasattr(ck, "extra_keys") else {n: n for n in ck.extra_names()}


def _why_not_merged(key: str, name: str, checkpoints: list[Any], keys: dict[int, dict[str, str]],
                    others: list[int], output_index: int, lm_names: set[str]) -> str | None:
    if key in lm_names:
        return f"its key {key} is also a language-model tensor's name"
    out = checkpoints[output_index]
    shape, code = out.shape(name), out.dtype(name).code
    if code not in FLOAT_CODES:
        return "not floating point"
    for k in others:
        theirs = keys[k].get(key)
        if theirs is None:
            return f"missing from {checkpoints[k].path}"
        if checkpoints[k].shape(theirs) != shape:
            return f"shapes differ: {list(shape)} here, {list(checkpoints[k].shape(theirs))} in {checkpoints[k].path}"
        if checkpoints[k].dtype(theirs).code not in FLOAT_CODES:
            return f"not floating point in {checkpoints[k].path}"
    return None


def accounting_notes(checkpoints: list[Any], items: list[Any]) -> list[str]:
    """Inferred layouts, dropped buffers and weights without a unit of their own, one line each."""
    notes = []
    for ck in checkpoints:
        layout = ck.layout
        if layout.name == "inferred":
            notes.append(f"layout of {ck.path} {layout.description}")
        dropped = getattr(ck, "dropped", {})
        if dropped:
            first = next(iter(dropped))
            notes.append(f"{len(dropped)} stored tensors of {ck.path} are not written (e.g. {first}: "
                         f"{dropped[first]})")
    note = unnamed_note({i.canonical: i.shape for i in items if i.canonical})
    if note:
        notes.append(note)
    return notes

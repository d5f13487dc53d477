"""Step 1b of a merge: the recipe's input checkpoints opened (headers only), and the plan built over them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import SoupError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.pool import BufferPool
from .coefficients import CoefficientTable
from .plan import Plan, build_plan
from .recipe import Recipe
from .tokenizer import align_vocabularies, wants_tokenizer
from .tokenizer import bind as bind_vocab

if TYPE_CHECKING:
    import torch


class Sources:
    """The recipe's input checkpoints (models in order, then the base); optionally held in memory."""

    def __init__(self, recipe: Recipe, in_memory: bool = False):
        self.paths = recipe.all_paths()
        self.mapping = recipe.mapping
        self.notes: list[str] = []
        # A mapping names every tensor of a custom architecture, so an unknown layout is allowed there.
        mapped = recipe.mapping is not None
        self.checkpoints: list[Checkpoint] = [
            open_checkpoint(p, allow_pickle=recipe.allow_pickle, generic_layout=mapped) for p in self.paths
        ]
        if mapped:
            from ..arch.mapping import apply_mapping

            # The source (and base) are presented under the target's names, joined or cut on read.
            self.checkpoints, self.notes = apply_mapping(recipe.mapping, self.checkpoints)
        if wants_tokenizer(recipe):
            # Embedding and lm_head presented in the output tokenizer's row order (engine/tokenizer.py).
            self.checkpoints, notes = align_vocabularies(recipe, self.checkpoints)
            self.notes += notes
        self._memory: dict[tuple[int, str], torch.Tensor] | None = None
        if in_memory:
            self._memory = {(k, n): c.get(n) for k, c in enumerate(self.checkpoints) for n in c.names}

    def get(self, k: int, name: str, pool: BufferPool | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh copy in `dtype` (default float32; methods may work in place on it), on a pooled buffer
        when `pool` is given."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        ck = self.checkpoints[k]
        if pool is not None and (self._memory is not None or isinstance(ck, Checkpoint)):
            out = pool.empty(ck.shape(name), dtype)
            if self._memory is not None:
                return out.copy_(self._memory[(k, name)])
            return ck.read_into(name, out)
        if self._memory is not None:
            return self._memory[(k, name)].to(dtype, copy=True)
        return ck.get(name, dtype)

    def index_for(self, recipe: Recipe) -> list[Checkpoint]:
        paths = recipe.all_paths()
        if paths != self.paths or recipe.mapping != self.mapping:
            raise SoupError("the sources were opened for other models (or another mapping) than this recipe's")
        return self.checkpoints


def open_sources(recipe: Recipe, in_memory: bool = False) -> Sources:
    return Sources(recipe, in_memory=in_memory)


def _load_coefficients(recipe: Recipe, coefficients) -> CoefficientTable | None:
    if coefficients is None and recipe.coefficients:
        coefficients = recipe.coefficients
    if coefficients is None or isinstance(coefficients, CoefficientTable):
        return coefficients
    return CoefficientTable.load(coefficients)


def prepare(recipe: Recipe | str | os.PathLike | dict, coefficients=None, sources: Sources | None = None) -> tuple[Plan, Sources]:
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    table = _load_coefficients(recipe, coefficients)
    if table is not None and "weight" not in recipe.method.model_params:
        raise SoupError(f"a coefficient table sets per-model weights, which method {recipe.merge_method} does not take "
                        "(use linear, task_arithmetic, ties, dare_* or another method with a per-model weight)")
    sources = sources or open_sources(recipe)
    plan = build_plan(recipe, sources.index_for(recipe), table)
    plan.notes.extend(sources.notes)
    bind_vocab(plan)  # each vocabulary tensor's default rows over the models its item reads (engine/tokenizer.py)
    return plan, sources

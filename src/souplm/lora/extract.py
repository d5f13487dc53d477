"""LoRA extraction: the difference of a fine-tuned model M and its base B, factored per module.

For each stored tensor, decided from the headers before any SVD runs (shapes, names, dtypes):

- a 2-D weight other than an embedding: extracted, delta = M - B ~ B_r A_r by truncated SVD, the rank
  fixed (`rank`) or the smallest that keeps `energy` of the squared singular values (capped by
  `max_rank`); saved with scale 1 (lora_alpha = r, alpha_pattern for modules of another rank);
- an embedding (`embed_tokens`, `wte`, ...) or a 1-D tensor (norm) that changed: saved whole
  (`modules_to_save`);
- unchanged tensors, and biases of extracted modules (LoRA has no place for them): skipped, with the reason.

A fixed rank r well below the matrix size uses a randomized SVD (r + 10 columns, 4 power iterations),
an energy threshold the exact one. Tensors are read two at a time (B's and M's), so memory is one module's pair plus the small factors;
the whole tensors kept for `modules_to_save` stay in memory until the write.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SoupError
from ..io.checkpoint import Checkpoint
from .adapter import PREFIX
from .merge import write_adapter

OVERSAMPLE, POWER_ITERS = 10, 4  # randomized SVD: extra columns and subspace iterations (error within ~1% of exact)
EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_positions|embeddings)\.weight$")


@dataclass
class ModuleResult:
    name: str  # stored tensor name
    action: str  # extracted | saved | skipped
    rank: int = 0
    error: float = 0.0  # relative Frobenius error of the factored delta
    reason: str = ""


@dataclass
class ExtractReport:
    out_dir: Path | None
    results: list[ModuleResult] = field(default_factory=list)
    seconds: float = 0.0

    def by(self, action: str) -> list[ModuleResult]:
        return [r for r in self.results if r.action == action]

    def table(self) -> str:
        lines = []
        for r in self.results:
            if r.action == "extracted":
                lines.append(f"extracted  {r.name}  rank {r.rank}  rel. error {r.error:.4g}")
            else:
                lines.append(f"{r.action:<10} {r.name}  ({r.reason})")
        return "\n".join(lines)

    def __str__(self) -> str:
        ex = self.by("extracted")
        err = max((r.error for r in ex), default=0.0)
        mean = sum(r.error for r in ex) / len(ex) if ex else 0.0
        return (f"extracted {len(ex)} modules (rel. error mean {mean:.4g}, max {err:.4g}), saved {len(self.by('saved'))} "
                f"whole, skipped {len(self.by('skipped'))} in {self.seconds:.1f}s -> {self.out_dir}")


def _plan(base: Checkpoint, model: Checkpoint) -> list[tuple[str, str]]:
    """(name, kind) for every tensor of the model, kind in lora | save | bias; refuses mismatches up front."""
    bn, mn = set(base.names), set(model.names)
    if bn != mn:
        only_m, only_b = sorted(mn - bn), sorted(bn - mn)
        raise SoupError(f"{model.path} and {base.path} hold different tensors (only in the model: "
                        f"{', '.join(only_m[:3]) or 'none'}; only in the base: {', '.join(only_b[:3]) or 'none'})")
    bad = [n for n in model.names if tuple(model.shape(n)) != tuple(base.shape(n))]
    if bad:
        n = bad[0]
        what = " (a vocabulary mismatch?)" if EMBEDDING.search(n) or n.endswith("lm_head.weight") else ""
        raise SoupError(f"tensor {n}: {list(model.shape(n))} in {model.path} but {list(base.shape(n))} in "
                        f"{base.path}{what}; {len(bad)} tensor(s) differ in shape, nothing was extracted")
    plan = []
    lora_modules = set()
    for n in model.names:
        if not model.dtype(n).torch.is_floating_point:
            raise SoupError(f"tensor {n} of {model.path} is not floating point ({model.dtype(n)})")
        shape = model.shape(n)
        if len(shape) == 2 and n.endswith(".weight") and not EMBEDDING.search(n):
            plan.append((n, "lora"))
            lora_modules.add(n[: -len(".weight")])
        elif len(shape) > 2:
            plan.append((n, "skip-shape"))
        else:
            plan.append((n, "save"))
    return [(n, "bias" if k == "save" and n.endswith(".bias") and n[: -len(".bias")] in lora_modules else k)
            for n, k in plan]


def _rank_for(s, rank: int | None, energy: float | None, max_rank: int | None) -> int:
    import torch

    if rank is not None:
        k = rank
    else:
        e = torch.cumsum(s.double() ** 2, 0)
        k = int(torch.searchsorted(e, energy * e[-1]).item()) + 1
    if max_rank is not None:
        k = min(k, max_rank)
    return max(1, min(k, s.numel()))


def extract_lora(
    base: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *, rank: int | None = None,
    energy: float | None = None, max_rank: int | None = None, dtype: str | None = None, force: bool = False,
    allow_pickle: bool = False, progress=None,
) -> ExtractReport:
    import torch

    t0 = time.perf_counter()
    if (rank is None) == (energy is None):
        raise SoupError("give exactly one of rank and energy")
    if rank is not None and rank < 1:
        raise SoupError(f"rank {rank}: must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise SoupError(f"energy {energy}: must be in (0, 1]")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SoupError(f"output {out} exists and is not empty (pass --force to replace it)")
    b = Checkpoint(base, allow_pickle=allow_pickle, generic_layout=True)
    m = Checkpoint(model, allow_pickle=allow_pickle, generic_layout=True)
    try:
        plan = _plan(b, m)  # every check before the first SVD
        tensors: dict[str, torch.Tensor] = {}
        results: list[ModuleResult] = []
        ranks: dict[str, int] = {}
        saved: list[str] = []
        for i, (n, kind) in enumerate(plan):
            if progress:
                progress(i, len(plan), n)
            if kind == "skip-shape":
                results.append(ModuleResult(n, "skipped", reason=f"{len(m.shape(n))}-D tensors (convolutions) are not extracted"))
                continue
            wm, wb = m.get(n), b.get(n)
            if not (torch.isfinite(wm).all() and torch.isfinite(wb).all()):
                raise SoupError(f"tensor {n} contains NaN or Inf; nothing was written")
            if torch.equal(wm, wb):
                results.append(ModuleResult(n, "skipped", reason="unchanged"))
                continue
            out_dtype = torch.float32 if dtype == "float32" else (m.dtype(n).torch if dtype is None else getattr(torch, dtype))
            if kind == "bias":
                results.append(ModuleResult(n, "skipped", reason="bias of an extracted module changed; LoRA cannot carry it"))
                continue
            if kind == "save":
                tensors[PREFIX + n] = m.get(n, None)
                saved.append(n.rsplit(".", 1)[0])
                why = "embedding" if EMBEDDING.search(n) else f"{len(m.shape(n))}-D"
                results.append(ModuleResult(n, "saved", reason=f"{why}, saved whole (modules_to_save)"))
                continue
            d = wm.sub_(wb)
            del wb
            q = None if rank is None else min(rank + OVERSAMPLE, *d.shape)
            if q is not None and 2 * q < min(d.shape):  # a fixed small rank: randomized SVD (Halko et al.)
                u, s, v = torch.svd_lowrank(d, q=q, niter=POWER_ITERS)
                vh = v.T
            else:
                u, s, vh = torch.linalg.svd(d, full_matrices=False)
            k = _rank_for(s, rank, energy, max_rank)
            bf = (u[:, :k] * s[:k]).to(out_dtype).contiguous()
            af = vh[:k].to(out_dtype).contiguous()
            del u, vh
            norm = float(torch.linalg.vector_norm(d))
            err = float(torch.linalg.matrix_norm(d - bf.float() @ af.float())) / norm
            module = n[: -len(".weight")]
            tensors[f"{PREFIX}{module}.lora_A.weight"] = af
            tensors[f"{PREFIX}{module}.lora_B.weight"] = bf
            ranks[module] = k
            results.append(ModuleResult(n, "extracted", rank=k, error=err))
        # names a saved module's other tensors must also be kept whole (PEFT replaces the whole module)
        partial = [r for r in results if r.action != "saved" and r.name.rsplit(".", 1)[0] in saved]
        for r in partial:
            tensors[PREFIX + r.name] = m.get(r.name, None)
            r.action, r.reason = "saved", "part of a module saved whole"
        if not ranks and not tensors:
            raise SoupError(f"{model} does not differ from {base}: nothing to extract, no adapter written")
        top = max(ranks.values(), default=rank or 1)
        config = {
            "peft_type": "LORA", "base_model_name_or_path": str(base), "r": top, "lora_alpha": top,
            "target_modules": sorted(ranks), "modules_to_save": sorted(set(saved)) or None,
            "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != top},
            "alpha_pattern": {re.escape(k): v for k, v in ranks.items() if v != top},
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "task_type": None, "layers_to_transform": None,
            "layers_pattern": None, "revision": None,
        }
        if not ranks:  # modules_to_save only: PEFT still needs a target; none matches the full names
            config["target_modules"] = []
        write_adapter(out, tensors, config, force=force)
    finally:
        b.close()
        m.close()
    return ExtractReport(out, results, time.perf_counter() - t0)

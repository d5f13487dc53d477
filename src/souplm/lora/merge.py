"""Merging LoRA adapters of one base into one adapter, with PEFT's `add_weighted_adapter` semantics.

Methods (per module, over the adapters that have the module; w_i the weight, s_i the scale):

- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the method runs on the A factors
  (weighted by sign(w_i s_i) sqrt|w_i s_i|) and on the B factors (weighted by sqrt|w_i s_i|) separately,
  as PEFT does; all ranks must be equal. For `linear` this is (sum_i c_i B_i)(sum_i c_i A_i), which
  has cross terms: it is not the sum of the deltas (use `cat` for that).
- `cat`: A = [w_i s_i A_i] stacked, B = [B_i] side by side; rank sum_i r_i; exactly sum_i w_i s_i B_i A_i.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the method runs on
  the full deltas s_i B_i A_i, and the result is re-factored by truncated SVD to `rank` (default the
  largest input rank): B = U S, A = V^T. The relative reconstruction error ||D - BA|| / ||D|| of each
  module is reported.

TIES (PEFT's form): each tensor keeps its `density` largest magnitudes; the majority sign per entry
is the sign of the sum of the kept (unweighted) values (`total`) or of their signs (`frequency`); the
weighted values agreeing with it are summed and divided by how many agreed. DARE keeps each entry
with probability `density` and rescales by 1/density (drawn from a generator seeded by `seed` and the
module's name, so a merge is reproducible).

The output adapter has r = lora_alpha = its rank (scale 1), PEFT's convention for merged adapters;
souplm also writes use_rslora: false, so the merged delta is exactly the factors' product.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SoupError
from .adapter import CONFIG, PREFIX, WEIGHTS, LoraAdapter

if TYPE_CHECKING:
    import torch

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*FACTOR_METHODS, "cat", *SVD_METHODS)


@dataclass
class AdapterMergeReport:
    out_dir: Path
    method: str
    rank: int
    modules: int
    errors: dict[str, float] = field(default_factory=dict)  # svd methods: module -> relative error

    def __str__(self) -> str:
        s = f"merged {self.modules} modules ({self.method}, rank {self.rank}) -> {self.out_dir}"
        if self.errors:
            worst = max(self.errors, key=self.errors.get)
            mean = sum(self.errors.values()) / len(self.errors)
            s += f"; SVD relative error mean {mean:.3g}, max {self.errors[worst]:.3g} ({worst})"
        return s


# -- the element-wise methods (PEFT's merge_utils semantics, written from their description) ------
def _keep_top(t: torch.Tensor, density: float) -> torch.Tensor:
    import torch

    k = int(density * t.numel())
    flat = t.reshape(-1)
    mask = torch.zeros_like(flat)
    if k > 0:
        mask[flat.abs().topk(k).indices] = 1
    return (flat * mask).reshape(t.shape)


def _keep_random(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    import torch

    if density <= 0:
        return torch.zeros_like(t)
    keep = torch.rand(t.shape, generator=gen) < density
    return t * keep / density


def combine(method: str, tensors: list[torch.Tensor], weights: list[float], density: float = 1.0,
            majority: str = "total", gen: torch.Generator | None = None) -> torch.Tensor:
    import torch

    base = method.removesuffix("_svd")
    if base in ("ties", "magnitude_prune") and density < 1:
        tensors = [_keep_top(t, density) for t in tensors]
    elif base in ("dare_linear", "dare_ties") and density < 1:
        tensors = [_keep_random(t, density, gen) for t in tensors]
    stack = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stack.dtype).view(-1, *([1] * (stack.dim() - 1)))
    if base in ("ties", "dare_ties"):
        signs = stack.sign()
        votes = stack.sum(0) if majority == "total" else signs.sum(0)
        agree = signs == torch.where(votes >= 0, 1.0, -1.0)
        return (stack * w * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (stack * w).sum(0)


# -- the merge ------------------------------------------------------------------------------------
def _check(adapters: list[LoraAdapter], weights: list[float], method: str) -> None:
    if method not in METHODS:
        raise SoupError(f"unknown adapter merge method {method!r} (known: {', '.join(METHODS)})")
    if len(weights) != len(adapters):
        raise SoupError(f"{len(adapters)} adapters but {len(weights)} weights")
    for ad in adapters:
        if ad.use_dora:
            raise SoupError(f"{ad.path}: DoRA adapters cannot be merged as adapters (merge them into the base instead)")
        saved = sorted(n for n, k in ad.replaced.items() if k not in ad.base_layer_keys)
        if saved:
            raise SoupError(f"{ad.path}: saves whole modules ({', '.join(saved)}); an adapter-space "
                            "merge cannot combine modules_to_save (merge into the base instead)")
        if any(m.bias_key for m in ad.modules.values()):
            raise SoupError(f"{ad.path}: lora_bias adapters are not supported in adapter-space merges")
    if len({ad.fan_in_fan_out for ad in adapters}) > 1:
        raise SoupError("the adapters disagree on fan_in_fan_out (are they for the same base?)")
    tm = [ad.config.get("target_modules") for ad in adapters]
    if len({isinstance(t, str) for t in tm}) > 1:
        raise SoupError("the adapters' target_modules mix a regex string with name lists")


def _target_modules(adapters: list[LoraAdapter]):
    tm = [ad.config.get("target_modules") for ad in adapters]
    if all(isinstance(t, str) for t in tm):
        return "|".join(f"({t})" for t in tm)
    return sorted({x for t in tm for x in (t or [])})


def merge_adapters(
    paths: list[str | os.PathLike], weights: list[float], out: str | os.PathLike, method: str = "linear", *,
    rank: int | None = None, density: float = 1.0, majority_sign_method: str = "total", svd_clamp: float | None = None,
    seed: int = 0, force: bool = False,
) -> AdapterMergeReport:
    import torch

    if not paths:
        raise SoupError("no adapters to merge")
    if not 0.0 <= density <= 1.0:
        raise SoupError(f"density {density} is outside [0, 1]")
    if majority_sign_method not in ("total", "frequency"):
        raise SoupError(f"majority_sign_method {majority_sign_method!r}: expected total or frequency")
    if rank is not None and rank < 1:
        raise SoupError(f"rank {rank}: must be at least 1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SoupError(f"output {out} exists and is not empty (pass --force to replace it)")
    adapters = [LoraAdapter(p) for p in paths]
    method = "linear" if len(adapters) == 1 and method in FACTOR_METHODS else method  # PEFT: one adapter is linear
    _check(adapters, weights, method)
    names = sorted({n for ad in adapters for n in ad.modules})
    if not names:
        raise SoupError("the adapters hold no LoRA modules")
    # the output rank, and every shape, known before any factor is read
    ranks = {n: [ad.modules[n].rank for ad in adapters if n in ad.modules] for n in names}
    if method in FACTOR_METHODS:
        bad = [n for n, r in ranks.items() if len(set(r)) > 1]
        all_r = {r for rs in ranks.values() for r in rs}
        if bad or len(all_r) > 1:
            raise SoupError(f"method {method} needs adapters of one rank (got ranks {sorted(all_r)}); use cat or svd")
        new_rank = all_r.pop()
    elif method == "cat":
        # PEFT's rank: the sum of every adapter's largest rank; a module fewer adapters have is zero-padded
        new_rank = sum(max(ad.modules[n].rank for n in ad.modules) for ad in adapters)
    else:
        new_rank = rank or max(r for rs in ranks.values() for r in rs)
        for n in names:
            ad = next(a for a in adapters if n in a.modules)
            m = ad.modules[n]
            dims = (ad.file.tensors[m.b_key].shape[0], ad.file.tensors[m.a_key].shape[1])
            if new_rank > min(dims):
                raise SoupError(f"rank {new_rank} exceeds module {m.module}'s dimensions {list(dims)}")
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for n in names:
        group = [(ad, w) for ad, w in zip(adapters, weights) if n in ad.modules]
        mod = group[0][0].modules[n]
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{n}".encode()).digest()[:8], "little") >> 1)
        As = [ad.file.get(ad.modules[n].a_key, "float32") for ad, _ in group]
        Bs = [ad.file.get(ad.modules[n].b_key, "float32") for ad, _ in group]
        ss = [ad.modules[n].scale for ad, _ in group]
        ws = [w for _, w in group]
        if method in FACTOR_METHODS:
            cw = [w * s for w, s in zip(ws, ss)]
            a = combine(method, As, [math.copysign(math.sqrt(abs(c)), c) for c in cw], density, majority_sign_method, gen)
            b = combine(method, Bs, [math.sqrt(abs(c)) for c in cw], density, majority_sign_method, gen)
        elif method == "cat":
            a = torch.zeros(new_rank, As[0].shape[1])
            b = torch.zeros(Bs[0].shape[0], new_rank)
            at = 0
            for A, B, w, s in zip(As, Bs, ws, ss):
                r = A.shape[0]
                a[at:at + r] = A * (w * s)
                b[:, at:at + r] = B
                at += r
        else:
            deltas = [(B @ A) * s for A, B, s in zip(As, Bs, ss)]
            d = combine(method, deltas, ws, density, majority_sign_method, gen)
            u, sv, vh = torch.linalg.svd(d, full_matrices=False)
            b = u[:, :new_rank] * sv[:new_rank]
            a = vh[:new_rank].clone()
            if svd_clamp is not None:
                hi = torch.quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), svd_clamp)
                b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
            norm = float(torch.linalg.matrix_norm(d))
            errors[mod.module] = float(torch.linalg.matrix_norm(d - b @ a)) / norm if norm > 0 else 0.0
        dtype = group[0][0].file.tensors[mod.a_key].dtype.torch
        if mod.kind == "embedding":
            tensors[f"{PREFIX}{mod.module}.lora_embedding_A"] = a.to(dtype).contiguous()
            tensors[f"{PREFIX}{mod.module}.lora_embedding_B"] = b.to(dtype).contiguous()
        else:
            tensors[f"{PREFIX}{mod.module}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{PREFIX}{mod.module}.lora_B.weight"] = b.to(dtype).contiguous()
    for ad in adapters:  # PEFT saves a targeted embedding's base weight beside its factors: pass it through, once
        for key in sorted(ad.base_layer_keys):
            t = ad.file.get(key)
            if key in tensors and not torch.equal(tensors[key], t):
                raise SoupError(f"{ad.path}: its saved base weight {key} differs from another adapter's (not one base?)")
            tensors[key] = t
    config = dict(adapters[0].config, r=new_rank, lora_alpha=new_rank, target_modules=_target_modules(adapters),
                  alpha_pattern={}, rank_pattern={}, use_rslora=False, modules_to_save=None)
    write_adapter(out, tensors, config, force=force)
    for ad in adapters:
        ad.close()
    return AdapterMergeReport(out, method, new_rank, len(names), errors)


def write_adapter(out: Path, tensors: dict, config: dict, force: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into a temporary sibling, then rename it into place."""
    from safetensors.torch import save_file

    if not tensors:
        raise SoupError(f"refusing to write an empty adapter to {out}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if out.exists():
            if not force and (not out.is_dir() or any(out.iterdir())):
                raise SoupError(f"output {out} exists and is not empty (pass --force to replace it)")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        raise SoupError(f"cannot write {out}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

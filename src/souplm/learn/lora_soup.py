"""Learned soups of LoRA adapters over one base, with the adapters' low-rank factors kept as they are.

The models of the soup are `BASE+ADAPTER_i` (or the bare base). Their weights are W0 + D_i with
D_i = sum_k s_k B_k A_k (model i's adapters that touch the tensor), so the dense soup's weight is

    W = sum_i alpha_i (W0 + D_i) = (sum_i alpha_i) W0 + sum_i alpha_i s_i B_i A_i

and a Linear of the soup computes, without ever forming W (LoraHub's setting, per soup unit):

    y = c0 * W0 x + (alpha-scaled B_cat) (A_cat x),   c0 = sum_i alpha_i (1 for learned alphas)

where A_cat stacks every A_i (R x in) and the alphas are folded into the small B_cat (out x R), so
autograd keeps only `A_cat x` (tokens x R) and B_cat: a soup of many adapters costs about one
forward of the base plus the adapters' ranks. The result equals the dense learnable soup of the
merged models `BASE+ADAPTER_i` (same loss, same gradients, same table); its coefficient table is
keyed and ordered the same way, so `souplm merge --coefficients` over the same `BASE+ADAPTER_i`
models gives the learned model.

A tensor is handled on the dense path (the soup module of `soup_module.py`, with the merged
tensors of each model) when an adapter changes it in a way that is not a plain low-rank product
(modules_to_save, DoRA, lora_bias, an embedding LoRA), when its module is not a plain Linear, or
when the stacked factors are no smaller than the weight (R (in + out) >= in out). Tensors no
adapter touches keep their module as it is (their groups' alphas sum to 1), unless a `fixed`
weight that does not sum to 1 scales them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.layouts import Layout, detect_layout
from ..arch.units import layer_count, unit_of
from ..errors import SoupError
from .activations import Activation, get_activation
from .granularity import GRANULARITIES, group_of, rows_of
from .soup_module import (
    FIXED_PREFIX,
    AlphaBank,
    AlphaRef,
    SoupEmbedding,
    SoupLinear,
    SoupModel,
    SoupTensor,
    _check_fixed,
    _soup_param_in_place,
    lean_kind,
)

__all__ = ["AdapterSoupPlan", "LoraSoupLinear", "adapter_soup_plan", "build_lora_soup", "check_finite_adapters",
           "load_adapted"]


# ----------------------------------------------------------------------------------------------
# which models are adapters over one base


class AdapterSoupPlan:
    """Models that are all one base (with or without adapters): the base's path and each model's adapters."""

    def __init__(self, base_path: str, sources: list[Any]):
        self.base_path = base_path
        self.sources = sources  # per model: a LoraCheckpoint or the plain base checkpoint

    def adapters(self, i: int) -> list:
        return list(getattr(self.sources[i], "adapters", []))


def _same_path(a: Any, b: Any) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def adapter_soup_plan(cks: Sequence[Any]) -> AdapterSoupPlan | None:
    """An AdapterSoupPlan when every model is one base plus adapters (at least one adapter), else None."""
    from ..lora.checkpoint import LoraCheckpoint

    if not any(isinstance(ck, LoraCheckpoint) for ck in cks):
        return None
    bases = [ck.base if isinstance(ck, LoraCheckpoint) else ck for ck in cks]
    first = bases[0].path
    if not all(_same_path(b.path, first) for b in bases):
        return None
    return AdapterSoupPlan(str(first), list(cks))


def load_adapted(model: nn.Module, ck: Any, layout: Layout | None = None) -> None:
    """Write `ck`'s adapted tensors (a LoraCheckpoint over the model's base) into `model` in place."""
    touched = set(getattr(ck, "touched", []))
    if not touched:
        return
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    layout = layout or detect_layout(names, where="soup model")
    with torch.no_grad():
        for name, p in model.named_parameters():
            canonical = layout.to_canonical(name)
            if canonical is None:
                continue
            stored = ck.stored_name(canonical)
            if stored in touched:
                p.copy_(ck.get(stored).to(p.dtype))


def check_finite_adapters(models: Sequence[str], plan: AdapterSoupPlan) -> None:
    """The base's tensors and every adapter's tensors are finite (the dense check reads N whole models)."""
    from . import check_finite_models  # learn/__init__ imports this module lazily

    base = next((s.base if hasattr(s, "base") else s) for s in plan.sources)
    check_finite_models([plan.base_path], [base])
    seen: set[str] = set()
    for path, src in zip(models, plan.sources):
        for ad in getattr(src, "adapters", []):
            if str(ad.path) in seen:
                continue
            seen.add(str(ad.path))
            for key in ad.file.tensors:
                t = ad.file.get(key, "float32")
                if not bool(torch.isfinite(t).all()):
                    raise SoupError(f"learn: tensor {key} of adapter {ad.path} (model {path}) contains NaN or Inf; "
                                    "a soup with it would be NaN (nothing was trained)")


# ----------------------------------------------------------------------------------------------
# the low-rank soup Linear


class LoraSoupLinear(nn.Module):
    """y = c0 * (x W0^T + b0) + (x A_cat^T) (B_cat * alpha[model of each rank column])^T.

    `b_cat` has each adapter's scale folded in; `owner[j]` is the model whose adapter gave rank
    column j. With `scale_base` (a fixed weight whose entries do not sum to 1) the base term is
    scaled by sum_i alpha_i; learned alphas always sum to 1, so W0 x is used as it is. Half
    precision models get the low-rank branch in float32, rounded once where it joins W0 x.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, a_cat: torch.Tensor, b_cat: torch.Tensor,
                 owner: torch.Tensor, weight_alpha: AlphaRef, bias_alpha: AlphaRef | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.register_buffer("a_cat", a_cat.to(device=weight.device, dtype=acc), persistent=False)
        self.register_buffer("b_cat", b_cat.to(device=weight.device, dtype=acc), persistent=False)
        self.register_buffer("owner", owner.to(weight.device), persistent=False)
        self.weight_alpha = weight_alpha
        self.bias_alpha = bias_alpha

    @property
    def rank(self) -> int:
        return int(self.a_cat.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.weight_alpha()
        y = F.linear(x, self.weight)
        if not self.weight_alpha.affine:
            c0 = c.sum(0)
            y = y * c0.to(y.dtype)
        if self.bias is not None:
            cb = self.bias_alpha() if self.bias_alpha is not None else None
            b = self.bias if cb is None or self.bias_alpha.affine else self.bias * cb.sum(0).to(self.bias.dtype)
            y = y + b
        acc = self.a_cat.dtype
        co = c.to(acc)[self.owner]  # (R,) or (R, out) for row granularity
        b_eff = self.b_cat * (co.unsqueeze(0) if co.dim() == 1 else co.t())
        low = F.linear(F.linear(x.to(acc), self.a_cat), b_eff)
        return y + low.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.weight_alpha.group!r}")


# ----------------------------------------------------------------------------------------------
# building


def _low_rank_terms(src: Any, stored: str, dtype: str) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
    """Model `src`'s change to tensor `stored` as [(B, A, scale)], [] when untouched, None when not low-rank."""
    terms = []
    for ad in getattr(src, "adapters", []):
        if stored not in ad.touches():
            continue
        mod = ad.modules.get(stored)
        if stored in ad.replaced or mod is None or mod.kind != "linear" or mod.magnitude_key is not None:
            return None
        b, a, s = ad.factors(stored, dtype)
        terms.append((b, a, s))
    return terms


def _touched(src: Any, stored: str) -> bool:
    return any(stored in ad.touches() for ad in getattr(src, "adapters", []))


def build_lora_soup(
    model: nn.Module,
    sources: Sequence[Any],
    *,
    granularity: str = "layer_mapping",
    activation: str | Activation = "softmax",
    fixed: Mapping[str, Sequence[float]] | None = None,
    layout: Layout | None = None,
    low_rank: bool = True,
) -> SoupModel:
    """Rewire `model` (holding the bare base's weights) into the soup of `sources`, in place.

    `sources` are the models in order, each a LoraCheckpoint over that base or the base itself.
    `low_rank=False` puts every touched tensor on the dense path (for comparisons).
    """
    if granularity not in GRANULARITIES:
        raise SoupError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    act = get_activation(activation) if isinstance(activation, str) else activation
    n_models = len(sources)
    act.check_models(n_models)
    fixed = dict(fixed or {})
    model.requires_grad_(False)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    layout = layout or detect_layout(names, where="soup model")
    n_layers = layer_count(c for n in names if (c := layout.to_canonical(n)))
    base_ck = next((s.base if hasattr(s, "base") else s) for s in sources)

    # 1) every LM parameter: canonical name, group, and which models change it
    info: dict[int, dict] = {}  # id(param) -> {canonical, stored, group, ref, touched}
    owners: list[tuple[str, str, nn.Module, int]] = []
    groups: dict[str, tuple[int, ...]] = {}
    tensors: list[SoupTensor] = []
    unit_keys: set[str] = set()
    for mpath, module in list(model.named_modules()):
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            canonical = layout.to_canonical(f"{mpath}.{pname}" if mpath else pname)
            if canonical is None:
                continue
            owners.append((mpath, pname, module, id(param)))
            if id(param) in info:  # tied lm_head
                tensors.append(SoupTensor(canonical, info[id(param)]["group"], tuple(param.shape)))
                continue
            unit = unit_of(canonical)
            unit_keys.add(unit.key)
            stored = base_ck.stored_name(canonical)
            if unit.key in fixed:
                group, rows = FIXED_PREFIX + unit.key, ()
            else:
                group, rows = group_of(canonical, granularity), rows_of(tuple(param.shape), granularity)
            groups.setdefault(group, rows)
            info[id(param)] = {"canonical": canonical, "stored": stored, "group": group, "param": param,
                               "ref": AlphaRef(None, group), "touched": [_touched(s, stored) for s in sources]}
            tensors.append(SoupTensor(canonical, group, tuple(param.shape)))
    if not info:
        raise SoupError("the model has no language-model tensors to soup")
    _check_fixed(fixed, n_models, unit_keys, n_layers)
    bank = AlphaBank(n_models, act, groups, fixed)
    for e in info.values():
        e["ref"].bank = bank
    first = next(iter(info.values()))["param"]
    bank.to(device=first.device, dtype=torch.float64 if first.dtype == torch.float64 else torch.float32)

    dense_cache: dict[int, list[nn.Parameter]] = {}

    def dense_bases(e: dict) -> list[nn.Parameter]:
        p = e["param"]
        if id(p) in dense_cache:  # a tied lm_head shares the embedding's bases
            return dense_cache[id(p)]
        frozen = nn.Parameter(p.detach(), requires_grad=False)
        out = []
        for src, touched in zip(sources, e["touched"]):
            if not touched:
                out.append(frozen)  # the base's own tensor, shared, not copied
                continue
            t = src.get_canonical(e["canonical"], torch.float64 if p.dtype == torch.float64 else torch.float32)
            if tuple(t.shape) != tuple(p.shape):
                raise SoupError(f"tensor {e['canonical']}: shape {tuple(t.shape)} in one model but "
                                f"{tuple(p.shape)} in the base")
            out.append(nn.Parameter(t.detach().to(device=p.device, dtype=p.dtype), requires_grad=False))
        dense_cache[id(p)] = out
        return out

    def needs_soup(e: dict) -> bool:
        return any(e["touched"]) or not bank.is_affine(e["group"])

    # 2) swap modules
    handled: set[tuple[str, str]] = set()
    low_rank_modules: list[str] = []
    dense_modules: list[str] = []
    for mpath, pname, module, pid in owners:
        if (mpath, pname) in handled:
            continue
        params = module._parameters
        kind = lean_kind(module)
        new: nn.Module | None = None
        if kind == "linear":
            w = info[id(params["weight"])]
            b = info[id(params["bias"])] if params.get("bias") is not None else None
            handled.update({(mpath, "weight"), (mpath, "bias")})
            if not needs_soup(w) and (b is None or not needs_soup(b)):
                continue  # untouched, weights summing to 1: the module stays as it is
            acc = "float64" if w["param"].dtype == torch.float64 else "float32"
            terms = [_low_rank_terms(s, w["stored"], acc) for s in sources] if low_rank else None
            out_f, in_f = w["param"].shape
            total_rank = sum(t[1].shape[0] for ts in terms or [] if ts for t in ts)
            bias_ok = b is None or not any(b["touched"])
            if (terms is not None and all(ts is not None for ts in terms) and bias_ok and total_rank > 0
                    and total_rank * (in_f + out_f) < in_f * out_f):
                a_parts, b_parts, owner = [], [], []
                for i, ts in enumerate(terms):
                    for bb, aa, s in ts or []:
                        if tuple(bb.shape) != (out_f, aa.shape[0]) or aa.shape[1] != in_f:
                            raise SoupError(f"{mpath}: an adapter's factors {list(bb.shape)} x {list(aa.shape)} do "
                                            f"not fit the base weight {[out_f, in_f]}")
                        a_parts.append(aa)
                        b_parts.append(bb * s)
                        owner += [i] * aa.shape[0]
                new = LoraSoupLinear(w["param"], b["param"] if b else None, torch.cat(a_parts),
                                     torch.cat(b_parts, dim=1), torch.tensor(owner), w["ref"],
                                     b["ref"] if b else None)
                low_rank_modules.append(mpath)
            else:
                new = SoupLinear(dense_bases(w), w["ref"], dense_bases(b) if b else None, b["ref"] if b else None)
                dense_modules.append(mpath)
        elif kind in ("embedding", "scaled_embedding"):
            e = info[pid]
            handled.add((mpath, "weight"))
            if not needs_soup(e):
                continue
            new = SoupEmbedding(dense_bases(e), e["ref"], module.embed_scale if kind == "scaled_embedding" else None)
            dense_modules.append(mpath)
        else:
            e = info[pid]
            handled.add((mpath, pname))
            if needs_soup(e):
                _soup_param_in_place(module, pname, dense_bases(e), e["ref"])
                dense_modules.append(f"{mpath}.{pname}")
            continue
        parent_path, _, child = mpath.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
    soup = SoupModel(model, bank, tensors, granularity, layout, n_layers)
    soup.low_rank_modules = low_rank_modules  # type: ignore[attr-defined]
    soup.dense_modules = dense_modules  # type: ignore[attr-defined]
    soup.other_matrices = sorted(t.canonical for t in tensors
                                 if len(t.shape) >= 2 and unit_of(t.canonical).mapping == "other")
    return soup

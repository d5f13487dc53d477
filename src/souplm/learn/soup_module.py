"""The on-the-fly soup: a model whose soupable weights are `sum_i alpha_i * theta_i`, computed when used.

`build_soup(model, others, ...)` takes a transformers model (it holds one base model's weights and
gives the structure) and the other bases' tensors, and rewires the language model in place:

- every `nn.Linear` of the LM becomes a `SoupLinear`: its merged weight is built inside an autograd
  Function's forward, used, and dropped; the backward builds it again for `dL/dx` and computes
  `dL/dalpha_i = <dL/dW, W_i>` from a transient `dL/dW`. Autograd keeps only the input and the
  alphas, so the peak stays at the bases plus activations, with at most two weight-sized temporaries;
- `nn.Embedding` becomes a `SoupEmbedding` that gathers rows from each base (no merged table at all);
- any other LM parameter (norm weights, biases, unusual modules) is merged by plain autograd in a
  forward pre-hook; these are small, so keeping them is cheap;
- a tied lm_head uses the embedding's bases and alpha: one unit, as the checkpoint stores one tensor;
- everything outside the LM (a LLaVA vision tower and projector) stays frozen and is not souped.

The alphas live in one `AlphaBank` (a flat raw vector plus the activation), registered on the
`SoupModel` and *not* inside the decoder layers: the layers hold only frozen base parameters, so they
can be sharded per decoder layer (FSDP2) while the few alphas stay replicated and their one gradient
tensor is all-reduced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.layouts import Layout, detect_layout
from ..arch.units import layer_count, parse_unit_key, unit_of
from ..engine.coefficients import CoefficientTable
from ..errors import SoupError
from .activations import Activation, get_activation
from .granularity import GRANULARITIES, group_of, rows_of, table_key

FIXED_PREFIX = "fixed:"


# ----------------------------------------------------------------------------------------------
# alphas


class AlphaBank(nn.Module):
    """Every learnable alpha of a soup as one flat raw vector, plus fixed (not learned) groups.

    One flat parameter keeps the optimizer, the regularizer, checkpoints and a distributed
    all-reduce to a single tensor.
    """

    def __init__(
        self,
        n_models: int,
        activation: Activation,
        groups: Mapping[str, tuple[int, ...]],
        fixed: Mapping[str, Sequence[float]] | None = None,
    ):
        super().__init__()
        activation.check_models(n_models)
        self.n_models = n_models
        self.activation = activation
        fixed = dict(fixed or {})
        self.slots: dict[str, tuple[int, tuple[int, ...]]] = {}  # group -> (offset, raw shape)
        self.fixed_slots: dict[str, int] = {}  # group -> index into `fixed_values`
        chunks, fixed_rows = [], []
        offset = 0
        for group, rows in groups.items():
            if group.startswith(FIXED_PREFIX):
                self.fixed_slots[group] = len(fixed_rows)
                fixed_rows.append(torch.tensor(fixed[group[len(FIXED_PREFIX):]], dtype=torch.float32))
                continue
            init = activation.init(n_models, tuple(rows))
            self.slots[group] = (offset, tuple(init.shape))
            offset += init.numel()
            chunks.append(init.flatten())
        raw = torch.cat(chunks) if chunks else torch.zeros(0)
        self.raw = nn.Parameter(raw)
        self.register_buffer("raw_init", raw.detach().clone())
        self._fixed_affine = {g: abs(sum(fixed[g[len(FIXED_PREFIX):]]) - 1.0) < 1e-9 for g in self.fixed_slots}
        self.register_buffer(
            "fixed_values",
            torch.stack(fixed_rows) if fixed_rows else torch.zeros(0, n_models),
        )

    @property
    def groups(self) -> list[str]:
        return list(self.slots) + list(self.fixed_slots)

    def unit_slots(self) -> list[tuple[int, tuple[int, ...], bool]]:
        """(offset, raw shape, softmax-style) of every learned group: the regularizer's units."""
        centred = not self.activation.two_models_only
        return [(offset, shape, centred) for offset, shape in self.slots.values()]

    def raw_of(self, group: str) -> torch.Tensor:
        offset, shape = self.slots[group]
        n = 1
        for s in shape:
            n *= s
        return self.raw[offset : offset + n].view(shape)

    def is_affine(self, group: str) -> bool:
        """Weights that sum to 1: every activation's output, and fixed weights that do."""
        if group in self.fixed_slots:  # decided once at build time: no host sync in the forward
            return self._fixed_affine[group]
        return True

    def coefficients(self, group: str) -> torch.Tensor:
        """alpha of one group, shape (n_models, *rows); differentiable w.r.t. `raw`."""
        if group in self.fixed_slots:
            return self.fixed_values[self.fixed_slots[group]]
        return self.activation(self.raw_of(group))

    def extra_repr(self) -> str:
        return (
            f"n_models={self.n_models}, activation={self.activation.name}, "
            f"learned_groups={len(self.slots)}, raw={self.raw.numel()}, fixed={len(self.fixed_slots)}"
        )


class AlphaRef:
    """A soup module's handle on its group's alpha.

    A plain object on purpose: an `nn.Module` attribute holding the bank would register the
    alphas inside every decoder layer, and a per-layer sharder would then shard them too.
    """

    __slots__ = ("bank", "group")

    def __init__(self, bank: AlphaBank | None, group: str):
        self.bank = bank
        self.group = group

    @property
    def affine(self) -> bool:
        """The group's weights sum to 1 (always, for learned ones)."""
        return self.bank is not None and self.bank.is_affine(self.group)

    def __call__(self) -> torch.Tensor:
        assert self.bank is not None, "AlphaRef used before build_soup attached the bank"
        return self.bank.coefficients(self.group)


# ----------------------------------------------------------------------------------------------
# merged weights, computed where they are used


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums of products are formed: float64 for a float64 model, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(coef: torch.Tensor, bases: Sequence[torch.Tensor], affine: bool = False) -> torch.Tensor:
    """sum_i coef[i] * bases[i] without autograd; coef is (N,) or (N, rows).

    Full precision bases: `affine` (the weights sum to 1) lets two bases merge in one fused pass,
    lerp(W_2, W_1, c_1). Half precision bases (bf16, fp16): the sum is formed in float32 row block by
    row block and rounded once to the base dtype, and the alphas are never rounded to it (bf16
    cannot tell 0.5 from 0.501). No host sync: the alphas stay tensors on their device.
    """
    dtype = bases[0].dtype
    if dtype in (torch.float16, torch.bfloat16) and bases[0].dim() >= 1:
        out = torch.empty_like(bases[0])
        rows = bases[0].shape[0]
        cols = bases[0].numel() // max(rows, 1)
        c32 = coef.to(torch.float32)
        for block in _row_blocks(rows, cols):
            cb = c32 if c32.dim() == 1 else c32[:, block].reshape(c32.shape[0], -1, *([1] * (bases[0].dim() - 1)))
            acc = bases[0][block].to(torch.float32) * cb[0]
            for b, ci in zip(bases[1:], cb[1:]):
                acc.addcmul_(b[block].to(torch.float32), ci)
            out[block] = acc
        return out
    c = coef.to(dtype) if dtype.is_floating_point else coef
    if c.dim() > 1:  # one alpha per row: broadcast over the remaining dims
        c = c.reshape(*c.shape, *([1] * (bases[0].dim() - 1)))
    if affine and len(bases) == 2:
        return torch.lerp(bases[1], bases[0], c[0])
    out = bases[0] * c[0]
    for b, ci in zip(bases[1:], c[1:]):
        out.addcmul_(b, ci)
    return out


def _coef_grad(grad_w: torch.Tensor, bases: Sequence[torch.Tensor], coef: torch.Tensor) -> torch.Tensor:
    """dL/dcoef_i = <dL/dW, W_i>: over the whole tensor, or per row for row granularity.

    Always accumulated in float32 (float64 for a float64 model): for two fine-tunes of one base the
    signal is the small difference of two large dot products, which half precision loses.
    """
    acc = _acc_dtype(coef.dtype)
    g = grad_w.to(acc)
    if coef.dim() == 1:
        parts = [torch.dot(g.reshape(-1), b.reshape(-1).to(acc)) for b in bases]
    else:
        parts = [(g * b.to(acc)).reshape(b.shape[0], -1).sum(1) for b in bases]
    return torch.stack(parts).to(coef.dtype)


# The backward works on row blocks of at most this many elements (or 1/8 of the weight, if larger),
# so its weight-sized temporaries (the merged W for dL/dx, dL/dW for the alphas) stay small.
BACKWARD_BLOCK = 1 << 20


def _row_blocks(rows: int, cols: int) -> list[slice]:
    numel = rows * cols
    block_rows = max(1, max(BACKWARD_BLOCK, -(-numel // 8)) // max(cols, 1))
    return [slice(r, min(r + block_rows, rows)) for r in range(0, rows, block_rows)]


class _SoupLinearFn(torch.autograd.Function):
    """y = x @ (sum_i c_i W_i)^T, saving x and c only; the merged W is rebuilt in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coef: torch.Tensor, affine: bool, *bases: torch.Tensor) -> torch.Tensor:
        w = _merge(coef, bases, affine)
        ctx.save_for_backward(x, coef, *bases)
        ctx.affine = affine
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, coef, *bases = ctx.saved_tensors
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows, cols = bases[0].shape
        g2 = grad_y.reshape(-1, rows)
        # dL/dW's row blocks in float32 (or float64): a half-precision dW would round the alpha signal away
        acc = _acc_dtype(coef.dtype)
        x2 = x.reshape(-1, cols).to(acc) if need_c else None
        grad_x = None
        parts = []
        for block in _row_blocks(rows, cols):
            bs = [b[block] for b in bases]
            c = coef if coef.dim() == 1 else coef[:, block]
            g = g2[:, block]  # a column block: BLAS reads it in place through its leading dimension
            if need_x:
                w = _merge(c, bs, ctx.affine)
                grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
                del w  # free before dL/dW's block is allocated
            if need_c:
                parts.append(_coef_grad(g.t().to(acc) @ x2, bs, c))
        grad_c = None
        if need_c:
            grad_c = torch.stack(parts).sum(0) if coef.dim() == 1 else torch.cat(parts, dim=1)
        if need_x:
            grad_x = grad_x.reshape(*grad_y.shape[:-1], cols)
        return (grad_x, grad_c, None) + (None,) * len(bases)


class _SoupEmbeddingFn(torch.autograd.Function):
    """out = scale * sum_i c_i[ids] * E_i[ids]: gathers rows from each base; no merged table is ever built.

    The rows are mixed in float32 (or float64) and rounded once to the base dtype; the alpha
    gradient is accumulated in float32 too. `scale` is a subclass's embedding scale (Gemma 3's
    sqrt(hidden)), applied as its forward does: rounded to the table's dtype, after the lookup.
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor | None,
                *bases: torch.Tensor) -> torch.Tensor:
        dtype = bases[0].dtype
        acc = _acc_dtype(dtype)
        c = coef.to(acc)
        out = None
        for i, b in enumerate(bases):
            rows = F.embedding(ids, b).to(acc)
            w = c[i] if c.dim() == 1 else c[i][ids].unsqueeze(-1)
            out = rows * w if out is None else out.addcmul_(rows, w)
        out = out.to(dtype)
        if scale is not None:
            out = out * scale.to(dtype)
        ctx.save_for_backward(ids, coef, scale, *bases)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ids, coef, scale, *bases = ctx.saved_tensors
        grad_c = None
        if ctx.needs_input_grad[1]:
            acc = _acc_dtype(coef.dtype)
            g = grad_out.to(acc)
            if scale is not None:
                g = g * scale.to(bases[0].dtype).to(acc)
            parts = []
            for b in bases:
                per_pos = (g * F.embedding(ids, b).to(acc)).sum(-1)
                if coef.dim() == 1:
                    parts.append(per_pos.sum())
                else:
                    parts.append(
                        torch.zeros(coef.shape[1], dtype=acc, device=per_pos.device)
                        .index_add_(0, ids.reshape(-1), per_pos.reshape(-1))
                    )
            grad_c = torch.stack(parts).to(coef.dtype)
        return (None, grad_c, None) + (None,) * len(bases)


def _merge_autograd(coef: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Differentiable merge for small tensors (norms, biases): autograd keeps the result.

    Formed in float32 (float64 for float64 bases) and rounded once to the base dtype, so neither
    the alphas nor their gradients pass through half precision.
    """
    dtype = bases[0].dtype
    acc = _acc_dtype(dtype)
    c = coef.to(acc)
    if c.dim() > 1:
        c = c.reshape(*c.shape, *([1] * (bases[0].dim() - 1)))
    out = c[0] * bases[0].to(acc)
    for b, ci in zip(bases[1:], c[1:]):
        out = out + ci * b.to(acc)
    return out.to(dtype)


class SoupLinear(nn.Module):
    """A Linear whose weight (and bias) is the soup of frozen base tensors."""

    def __init__(
        self,
        weight_bases: Sequence[nn.Parameter],
        weight_alpha: AlphaRef,
        bias_bases: Sequence[nn.Parameter] | None = None,
        bias_alpha: AlphaRef | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = weight_bases[0].shape
        self.weight_bases = nn.ParameterList(weight_bases)
        self.bias_bases = nn.ParameterList(bias_bases) if bias_bases else None
        self.weight_alpha = weight_alpha
        self.bias_alpha = bias_alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _SoupLinearFn.apply(x, self.weight_alpha(), self.weight_alpha.affine, *self.weight_bases)
        if self.bias_bases is not None:
            y = y + _merge_autograd(self.bias_alpha(), list(self.bias_bases))
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bases={len(self.weight_bases)}, alpha={self.weight_alpha.group!r}"
        )


class SoupEmbedding(nn.Module):
    """An Embedding whose table is the soup of frozen base tables (padding_idx only affects
    training the table itself, so it does not matter here)."""

    def __init__(self, bases: Sequence[nn.Parameter], alpha: AlphaRef, embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = bases[0].shape
        self.bases = nn.ParameterList(bases)
        self.alpha = alpha
        if embed_scale is not None:  # a scaled word embedding (Gemma 3): its scale, kept as its forward uses it
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _SoupEmbeddingFn.apply(ids, self.alpha(), self.embed_scale, *self.bases)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bases={len(self.bases)}, alpha={self.alpha.group!r}"


def _soup_param_in_place(module: nn.Module, pname: str, bases: Sequence[nn.Parameter], alpha: AlphaRef) -> None:
    """Generic path: replace `module.<pname>` by a tensor merged (with autograd) before each forward."""
    del module._parameters[pname]
    for i, b in enumerate(bases):
        module.register_parameter(f"{pname}_soup_base{i}", b)
    slots = module.__dict__.setdefault("_soup_slots", [])
    if not slots:
        module.register_forward_pre_hook(_merge_slots_hook)
    slots.append((pname, alpha, len(bases)))
    with torch.no_grad():  # so code that reads `module.weight` before a forward finds a tensor
        setattr(module, pname, _merge(alpha().to(bases[0].device), list(bases)))


def _merge_slots_hook(module: nn.Module, args) -> None:
    for pname, alpha, n in module._soup_slots:
        bases = [getattr(module, f"{pname}_soup_base{i}") for i in range(n)]
        setattr(module, pname, _merge_autograd(alpha(), bases))


# ----------------------------------------------------------------------------------------------
# building a soup


TensorSource = Mapping[str, torch.Tensor] | object  # a Mapping, or anything with get_canonical()


def _getter(source: TensorSource) -> Callable[[str], torch.Tensor]:
    if isinstance(source, Mapping):
        def get(name: str) -> torch.Tensor:
            try:
                return source[name]
            except KeyError:
                raise SoupError(f"model has no tensor {name}") from None
        return get
    if hasattr(source, "get_canonical"):
        return source.get_canonical  # type: ignore[union-attr]
    raise TypeError(f"cannot read tensors from {type(source).__name__}")


@dataclass(frozen=True)
class SoupTensor:
    """One soupable LM tensor: its canonical name, alpha group and shape."""

    canonical: str
    group: str
    shape: tuple[int, ...]


class SoupModel(nn.Module):
    """A transformers model rewired into an on-the-fly soup, plus its alphas."""

    def __init__(self, model: nn.Module, alphas: AlphaBank, tensors: list[SoupTensor], granularity: str,
                 layout: Layout, n_layers: int):
        super().__init__()
        self.model = model
        self.alphas = alphas
        self.tensors = tensors
        self.granularity = granularity
        self.layout = layout
        self.n_layers = n_layers
        self.fallback_modules: list[str] = []  # Linear/Embedding subclasses without the lean path
        self.other_matrices: list[str] = []  # 2-D tensors no unit rule named (they share `other`)

    def forward(self, **batch) -> torch.Tensor:
        """Logits of the souped model."""
        batch.setdefault("use_cache", False)
        return self.model(**batch).logits

    def base_bytes(self) -> int:
        """Bytes held by the frozen base tensors of the LM (every base, counted once)."""
        seen, total = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    @torch.no_grad()
    def coefficient_values(self) -> dict[str, torch.Tensor]:
        """Current alpha of every group: (n_models,) or (n_models, rows)."""
        return {g: self.alphas.coefficients(g).detach().cpu() for g in self.alphas.groups}

    def coefficient_table(self, models: Sequence[str], meta: dict | None = None) -> CoefficientTable:
        """The learned alphas as a coefficient table (unit keys; tensor names for tensor/row)."""
        values = self.coefficient_values()
        coefficients: dict[str, list] = {}
        for t in self.tensors:
            fixed = t.group.startswith(FIXED_PREFIX)
            key = unit_of(t.canonical).key if fixed and self.granularity not in ("tensor", "row") \
                else table_key(t.canonical, self.granularity)
            coefficients[key] = values[t.group].tolist()
        return CoefficientTable(list(models), dict(sorted(coefficients.items(), key=_unit_order)), meta or {})


def _unit_order(item: tuple[str, list]) -> tuple:
    """Tables read in model order: embed, layers by index, final_norm, lm_head."""
    unit = unit_of(item[0]) if item[0].startswith(("model.", "lm_head.")) else parse_unit_key(item[0])
    head = {"embed": 0, "final_norm": 2, "lm_head": 3}.get(unit.mapping, 4) if unit.layer is None else 1
    return (head, unit.layer or 0, item[0])


def _check_fixed(fixed: Mapping[str, Sequence[float]], n_models: int, unit_keys: set[str], n_layers: int) -> None:
    for key, value in fixed.items():
        try:
            parse_unit_key(key)
        except ValueError as e:
            raise SoupError(f"config: fixed: {e}") from None
        if key not in unit_keys:
            raise SoupError(
                f"config: fixed: unit {key!r} is not in the model ({n_layers} layers; units look like "
                "layers.0.q, embed, lm_head)"
            )
        if len(value) != n_models:
            raise SoupError(f"config: fixed: {key!r} must give one weight per model ({n_models})")


def build_soup(
    model: nn.Module,
    others: Sequence[TensorSource],
    *,
    base_index: int = 0,
    granularity: str = "layer_mapping",
    activation: str | Activation = "softmax",
    fixed: Mapping[str, Sequence[float]] | None = None,
    layout: Layout | None = None,
) -> SoupModel:
    """Rewire `model` (whose weights are base `base_index`) into a soup with `others`, in place.

    `others` are the remaining bases in model order, each a mapping or a checkpoint with
    `get_canonical(name)`, keyed by canonical LM tensor name. Their tensors are read one at a time
    and cast to the dtype and device of the matching parameter of `model`.
    """
    if granularity not in GRANULARITIES:
        raise SoupError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    act = get_activation(activation) if isinstance(activation, str) else activation
    n_models = len(others) + 1
    act.check_models(n_models)
    fixed = dict(fixed or {})
    model.requires_grad_(False)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None
    layout = layout or detect_layout(names, where="soup model", shape=shapes.__getitem__, config=config)
    n_layers = layer_count(c for n in names if (c := layout.to_canonical(n)))
    getters = [_getter(s) for s in others]

    # 1) every LM parameter: its canonical name, bases and alpha group (tied ones share an entry)
    entries: dict[int, tuple[str, list[nn.Parameter], AlphaRef]] = {}
    owners: list[tuple[str, str, nn.Module, str, int]] = []  # (module path, pname, module, canonical, id)
    groups: dict[str, tuple[int, ...]] = {}
    tensors: list[SoupTensor] = []
    unit_keys: set[str] = set()
    for mpath, module in list(model.named_modules()):
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            canonical = layout.to_canonical(f"{mpath}.{pname}" if mpath else pname)
            if canonical is None:
                continue  # vision tower, projector: frozen, not souped
            owners.append((mpath, pname, module, canonical, id(param)))
            if id(param) in entries:  # tied lm_head: same tensor, same unit as the embedding
                tensors.append(SoupTensor(canonical, entries[id(param)][2].group, tuple(param.shape)))
                continue
            unit = unit_of(canonical)
            unit_keys.add(unit.key)
            frozen = nn.Parameter(param.detach(), requires_grad=False)
            bases: list[nn.Parameter] = []
            for get in getters:
                t = get(canonical)
                if tuple(t.shape) != tuple(param.shape):
                    raise SoupError(
                        f"tensor {canonical}: shape {tuple(t.shape)} in one model but {tuple(param.shape)} "
                        "in the structure model; a soup needs models of one architecture"
                    )
                bases.append(nn.Parameter(t.detach().to(device=param.device, dtype=param.dtype),
                                          requires_grad=False))
            bases.insert(base_index, frozen)
            if unit.key in fixed:
                group, rows = FIXED_PREFIX + unit.key, ()
            else:
                group, rows = group_of(canonical, granularity), rows_of(tuple(param.shape), granularity)
            groups.setdefault(group, rows)
            entries[id(param)] = (canonical, bases, AlphaRef(None, group))
            tensors.append(SoupTensor(canonical, group, tuple(param.shape)))
    if not entries:
        raise SoupError("the model has no language-model tensors to soup")
    _check_fixed(fixed, n_models, unit_keys, n_layers)

    # 2) the alphas, then attach them to every handle
    bank = AlphaBank(n_models, act, groups, fixed)
    for _, _, ref in entries.values():
        ref.bank = bank
    first = next(iter(entries.values()))[1][0]
    # float32 alphas, or float64 for a float64 model (exact gradient checks). A model built on the
    # meta device (to be sharded and filled later, learn/sharding.py) still gets real alphas.
    device = torch.device("cpu") if first.is_meta else first.device
    bank.to(device=device, dtype=torch.float64 if first.dtype == torch.float64 else torch.float32)

    # 3) swap modules: Linear/Embedding get the memory-lean Functions, the rest the generic hook
    handled: set[tuple[str, str]] = set()
    fallback: list[str] = []
    for mpath, pname, module, _canonical, pid in owners:
        if (mpath, pname) in handled:
            continue
        params = module._parameters
        kind = lean_kind(module)
        if kind == "linear":
            w = entries[id(params["weight"])]
            b = entries[id(params["bias"])] if params.get("bias") is not None else None
            new: nn.Module = SoupLinear(w[1], w[2], b[1] if b else None, b[2] if b else None)
            handled.update({(mpath, "weight"), (mpath, "bias")})
        elif kind in ("embedding", "scaled_embedding"):
            e = entries[pid]
            new = SoupEmbedding(e[1], e[2], module.embed_scale if kind == "scaled_embedding" else None)
            handled.add((mpath, "weight"))
        else:
            if isinstance(module, (nn.Linear, nn.Embedding)) and pname == "weight":
                fallback.append(f"{mpath} ({type(module).__name__})")
            e = entries[pid]
            _soup_param_in_place(module, pname, e[1], e[2])
            handled.add((mpath, pname))
            continue
        parent_path, _, child = mpath.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
    soup = SoupModel(model, bank, tensors, granularity, layout, n_layers)
    soup.fallback_modules = fallback
    soup.other_matrices = sorted(t.canonical for t in tensors
                                 if len(t.shape) >= 2 and unit_of(t.canonical).mapping == "other")
    if fallback:
        warnings.warn(f"souplm: learn: {len(fallback)} Linear/Embedding subclass(es) keep their merged weight in "
                      f"the autograd graph (no memory-lean path): {', '.join(fallback[:5])}", stacklevel=2)
    if soup.other_matrices:
        warnings.warn(f"souplm: learn: {len(soup.other_matrices)} matrix tensor(s) matched no unit rule and share "
                      f"their layer's `other` alpha: {', '.join(soup.other_matrices[:5])}", stacklevel=2)
    return soup


def lean_kind(module: nn.Module) -> str | None:
    """Which memory-lean soup module replaces `module`: "linear", "embedding", "scaled_embedding" or None.

    Subclasses qualify when their forward is the base class's (nothing to preserve), and scaled word
    embeddings (transformers' `*ScaledWordEmbedding`: `embedding(ids) * embed_scale`) with their scale.
    Anything else falls back to the generic pre-hook, which keeps the merged weight in the graph.
    """
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        if type(module).forward is nn.Embedding.forward:
            return "embedding"
        if type(module).__name__.endswith("ScaledWordEmbedding") and isinstance(
                getattr(module, "embed_scale", None), torch.Tensor):
            return "scaled_embedding"
    return None

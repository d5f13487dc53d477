"""A learnable soup sharded over ranks with FSDP2, so no rank holds a full copy of the bases.

The soup module keeps the frozen bases inside the decoder layers and the alphas outside them (one
flat `AlphaBank` on the `SoupModel`), which is what makes this short:

1. the structure model is built on the meta device (parameters only; buffers such as RoPE
   frequencies stay real) and `build_soup` wires meta bases into it, so nothing is read yet;
2. `fully_shard` (FSDP2) per decoder layer, then the embedding and an untied lm_head on their own,
   then the root: every base becomes a DTensor sharded on dim 0;
3. `materialize` allocates the local shards only and fills each from the checkpoints, reading just
   its rows (`Checkpoint.get_rows`), one tensor at a time;
4. the alphas stay a replicated plain parameter; the trainer all-reduces their one gradient.

Why the custom autograd Functions need nothing special: FSDP2 all-gathers a layer's parameters in
its pre-forward hook and registers the *unsharded* tensors on the modules, so `SoupLinear.forward`
passes ordinary local tensors to `_SoupLinearFn`, which saves them for backward. After the forward
FSDP2 frees their storage (reshard); its pre-backward hook all-gathers into the same storage again
before the layer's backward runs, so the Function rebuilds the merged weight from whole tensors.
tests/test_distributed.py checks the result against a single process.

Hybrid sharding (`shard_size` < world size) shards inside groups of `shard_size` ranks (a node) and
replicates across groups: the bases are frozen, so replication costs no gradient traffic, and the
all-gathers stay on the fast intra-node links.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed as D
from ..errors import SoupError
from .soup_module import SoupEmbedding, SoupLinear, SoupModel

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ---------------------------------------------------------------------------------------------
# building on meta


def meta_model(path: str, multimodal: bool, dtype: torch.dtype) -> nn.Module:
    """The transformers model of `path` with every parameter on the meta device (no weights read)."""
    import transformers
    from accelerate import init_empty_weights

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise SoupError(f"{path}: transformers cannot read the config: {str(e).splitlines()[0]}") from None
    cls = transformers.AutoModelForImageTextToText if multimodal else transformers.AutoModelForCausalLM
    # Buffers stay real: RoPE frequencies are computed here, not stored in the checkpoint.
    with init_empty_weights(include_buffers=False):
        return cls.from_config(config, dtype=dtype)


class ShapeOnly:
    """A tensor source for `build_soup` that answers with meta tensors of the stored shapes.

    Wraps a Checkpoint, or the vocab-extending adapter of `souplm.learn` (whose `ck` and `rows`
    give the shape its embedding takes once the output model's extra rows are appended).
    """

    def __init__(self, source: Any):
        self.source = source

    def get_canonical(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        ck = getattr(self.source, "ck", self.source)
        shape = list(ck.shape(ck.stored_name(name)))
        rows = getattr(self.source, "rows", None)
        if rows is not None and name in (EMBED, LM_HEAD):
            shape[0] = max(shape[0], rows)
        return torch.empty(shape, dtype=dtype or torch.float32, device="meta")


# ---------------------------------------------------------------------------------------------
# which parameter is which base


def base_sources(soup: SoupModel) -> dict[str, tuple[int, str]]:
    """Parameter name (under `soup.model`) -> (model index, canonical tensor) for every base.

    `build_soup` keeps each tensor's bases in model order; the canonical name comes from the module
    path the soup module replaced (`<path>.weight`) or the generic slot (`<path>.<pname>`).
    """
    out: dict[str, tuple[int, str]] = {}

    def canonical(name: str) -> str:
        c = soup.layout.to_canonical(name)
        if c is None:
            raise SoupError(f"soup parameter {name} has no canonical name in layout {soup.layout.name}")
        return c

    for mpath, module in soup.model.named_modules():
        prefix = f"{mpath}." if mpath else ""
        if isinstance(module, SoupLinear):
            groups = [("weight_bases", "weight")] + ([("bias_bases", "bias")] if module.bias_bases is not None else [])
        elif isinstance(module, SoupEmbedding):
            groups = [("bases", "weight")]
        else:
            groups = []
        for attr, pname in groups:
            c = canonical(prefix + pname)
            for i in range(len(getattr(module, attr))):
                out.setdefault(f"{prefix}{attr}.{i}", (i, c))
        for pname, _alpha, n in module.__dict__.get("_soup_slots", []):
            c = canonical(prefix + pname)
            for i in range(n):
                out.setdefault(f"{prefix}{pname}_soup_base{i}", (i, c))
    return out


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Children of every ModuleList that holds soup modules: the LM's decoder layers."""
    layers = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if any(isinstance(m, (SoupLinear, SoupEmbedding)) for m in child.modules()):
                    layers.append(child)
    return layers


def _outside_layers(model: nn.Module, layers: Sequence[nn.Module]) -> list[nn.Module]:
    """Soup modules outside the decoder layers (embedding, lm_head) that share no parameter."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    mods = [m for m in model.modules() if isinstance(m, (SoupLinear, SoupEmbedding)) and id(m) not in inside]
    owners: dict[int, int] = {}
    for m in mods:
        for p in m.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    # A tied lm_head shares the embedding's bases; FSDP2 needs shared tensors in one group (the root).
    return [m for m in mods if all(owners[id(p)] == 1 for p in m.parameters())]


# ---------------------------------------------------------------------------------------------
# sharding


@dataclass
class ShardReport:
    """What this rank holds after sharding (bytes of its local shards) against the whole model."""

    rank: int
    world: int
    shard_size: int
    groups: int
    local_base_bytes: int
    full_base_bytes: int
    local_other_bytes: int  # frozen, unsouped parameters (a vision tower), sharded too
    largest_local_fraction: float  # max over base tensors of local rows / all rows

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_mesh(device_type: str, shard_size: int | None = None):
    """A 1-D mesh over all ranks (FSDP), or (replicate, shard) of `shard_size` ranks (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = D.world_size()
    size = shard_size or world
    if size < 1 or world % size:
        raise SoupError(f"shard size {size} must divide the number of processes ({world})")
    if size == world:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world // size, size), mesh_dim_names=("replicate", "shard"))


def shard_soup(soup: SoupModel, device: torch.device, shard_size: int | None = None) -> int:
    """Apply FSDP2 to `soup.model` in place: decoder layers, embedding, untied lm_head, root.

    The alphas (`soup.alphas`, outside `soup.model`) are left alone: replicated. Returns the
    number of FSDP groups (one all-gather each per forward, and one per backward).
    """
    from torch.distributed.fsdp import fully_shard

    mesh = make_mesh(device.type, shard_size)
    layers = _decoder_layers(soup.model)
    if not layers:
        raise SoupError("no decoder layers with souped weights found to shard")
    groups = 0
    for module in [*layers, *_outside_layers(soup.model, layers)]:
        fully_shard(module, mesh=mesh)
        groups += 1
    fully_shard(soup.model, mesh=mesh)
    return groups + 1


def _local_rows(p: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of dim 0 that this rank's shard of DTensor `p` covers."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if any(offset[1:]) or tuple(shape[1:]) != tuple(p.shape[1:]):
        raise SoupError(f"expected a shard along dim 0 only, got placements {p.placements}")
    return (offset[0], offset[0] + shape[0]) if len(shape) else (0, 1)


def _read_rows(source: Any, canonical: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    if hasattr(source, "get_rows"):  # a Checkpoint: only these rows' bytes are read
        return source.get_rows(source.stored_name(canonical), start, stop, dtype)
    # An adapter (vocab extend): the whole tensor, then the rows.
    return source.get_canonical(canonical, dtype=dtype)[start:stop]


def _stored_name(fqn: str, names: Sequence[str]) -> str:
    """The stored name of an unsouped parameter: in-memory and file names may differ by a prefix
    (transformers' LLaVA has `model.vision_tower...` in memory, `vision_tower...` in older files)."""
    hits = [n for n in names if n == fqn or fqn.endswith("." + n) or n.endswith("." + fqn)]
    if len(hits) != 1:
        raise SoupError(f"cannot tell which stored tensor fills {fqn} ({len(hits)} candidates); "
                        "run this model on one process")
    return hits[0]


@torch.no_grad()
def materialize(soup: SoupModel, sources: Sequence[Any], structure_index: int, device: torch.device) -> None:
    """Allocate this rank's shards of a soup sharded on meta and fill them from the checkpoints.

    `sources[i]` reads model i's canonical tensors (a Checkpoint, or an adapter with
    `get_canonical`); `sources[structure_index]` must be the structure model's Checkpoint, which
    also fills the unsouped parameters (vision tower, projector).
    """
    bases = base_sources(soup)
    buffers = {n: b.detach().clone() for n, b in soup.model.named_buffers() if not b.is_meta}
    soup.model.to_empty(device=device)
    for n, b in buffers.items():
        soup.model.get_buffer(n).copy_(b)
    structure = sources[structure_index]
    extra = structure.extra_names() if hasattr(structure, "extra_names") else []
    for fqn, p in soup.model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        start, stop = _local_rows(p) if hasattr(p, "device_mesh") else (0, p.shape[0] if p.dim() else 1)
        if fqn in bases:
            i, canonical = bases[fqn]
            rows = _read_rows(sources[i], canonical, start, stop, p.dtype)
        else:
            rows = structure.get_rows(_stored_name(fqn, extra), start, stop, p.dtype)
        if tuple(rows.shape) != tuple(local.shape):
            raise SoupError(f"{fqn}: read rows of shape {tuple(rows.shape)} for a shard of {tuple(local.shape)}")
        local.copy_(rows)
    soup.alphas.to(device)


def shard_report(soup: SoupModel, shard_size: int | None = None) -> ShardReport:
    """Bytes of this rank's shards (bases and other parameters) against the whole bases."""
    bases = base_sources(soup)
    local_base = full_base = local_other = 0
    largest = 0.0
    for fqn, p in soup.model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        nbytes = local.numel() * local.element_size()
        if fqn in bases:
            local_base += nbytes
            full_base += p.numel() * p.element_size()
            if p.numel():
                largest = max(largest, local.numel() / p.numel())
        else:
            local_other += nbytes
    groups = sum(1 for m in soup.model.modules() if type(m).__name__.startswith("FSDP"))
    return ShardReport(D.rank(), D.world_size(), shard_size or D.world_size(), groups, local_base, full_base,
                       local_other, round(largest, 6))

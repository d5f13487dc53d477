"""DARE: drop each task-vector entry with probability p = 1 - density and rescale survivors by 1/(1-p).

`dare_linear` then adds the weighted sum of the sparsified task vectors; `dare_ties` runs TIES sign
election and disjoint mean on them instead (no magnitude trim).

The keep/drop draws come from a counter-based stream: entry j of a tensor gets 16 bits of the SplitMix64
output for counter j // 4 (four entries per 64-bit word), under a key hashed from (seed, tensor name,
model index). Any entry's draw can be computed on its own, so the merge is reproducible, independent of
the order in which tensors are processed, and identical between this torch implementation and the
fused kernels (`souplm.engine.execute_fused`), which split a tensor across threads. The keep probability is density
rounded to a multiple of 2**-16, and survivors are rescaled by the inverse of that exact probability,
so the merge stays unbiased.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .linear import normalized, weighted_sum
from .registry import register
from .task_arithmetic import add_to_base, task_vectors
from .ties import elect_and_merge

if TYPE_CHECKING:
    import torch

DRAW_BITS = 16
LEVELS = 1 << DRAW_BITS
# SplitMix64 (Steele, Lea and Flood 2014): the state advances by GAMMA, the output mixes it.
GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U64 = (1 << 64) - 1


def draw_key(seed: int, canonical: str, model_index: int) -> int:
    """The 64-bit key of one model's draws for one tensor."""
    h = hashlib.sha256(f"{seed}|{canonical}|{model_index}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def draw_keys(seed: int, canonical: str, n_models: int) -> list[int]:
    """One key per model, from (seed, tensor, model index): order-independent and reproducible."""
    return [draw_key(seed, canonical, i) for i in range(n_models)]


def keep_level(density: float) -> int:
    """An entry survives when its 16-bit draw is below this level: density rounded to a multiple of
    2**-16, never 0 for density > 0 (0 for density <= 0, all of them from density 1 on)."""
    return 0 if density <= 0.0 else min(LEVELS, max(1, round(density * LEVELS)))


def survivor_scale(level: int) -> float:
    """What a surviving entry is multiplied by: the inverse of its exact keep probability."""
    return LEVELS / level if level else 1.0


def _signed(x: int) -> int:
    """A uint64 as the int64 with the same bits (torch has no full uint64 arithmetic)."""
    x &= _U64
    return x - (1 << 64) if x >> 63 else x


def draws(key: int, n: int, device=None):
    """The 16-bit draws of entries 0..n-1 under `key`, as an int32 tensor of values in [0, 65536) (on `device`)."""
    import torch

    def shr(z, s):  # logical shift right of int64 bits
        return (z >> s) & ((1 << (64 - s)) - 1)

    # int64 products wrap around like uint64 ones: the bits are SplitMix64's.
    z = torch.arange(1, (n + 3) // 4 + 1, dtype=torch.int64, device=device).mul_(_signed(GAMMA)).add_(_signed(key))
    z = (z ^ shr(z, 30)).mul_(_signed(MIX1))
    z = (z ^ shr(z, 27)).mul_(_signed(MIX2))
    z ^= shr(z, 31)
    return z.view(torch.int16)[:n].to(torch.int32).bitwise_and_(0xFFFF)  # little-endian: lane j % 4


def drop_and_rescale(delta: torch.Tensor, density: float, key: int) -> torch.Tensor:
    """Zero each entry whose draw is not below the keep level, and scale the survivors by 1/q, in place."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    level = keep_level(density)
    keep = draws(key, delta.numel(), delta.device).lt_(level).view(delta.shape)
    return delta.mul_(keep).mul_(survivor_scale(level))


def _sparse_deltas(tensors, base, density, keys):
    return [drop_and_rescale(d, float(p), k) for d, p, k in zip(task_vectors(tensors, base), density, keys)]


@register(
    "dare_linear",
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"lambda": 1.0, "normalize": False},
    random=True,
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_linear(tensors, base, weight, density, keys, normalize=False, **g):
    """base + lambda * sum_i w_i * dare(theta_i - base)."""
    w = normalized(weight) if normalize else weight
    return add_to_base(weighted_sum(_sparse_deltas(tensors, base, density, keys), w), base, g.get("lambda", 1.0))


@register(
    "dare_ties",
    needs_base=True,
    min_models=1,
    max_models=None,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"lambda": 1.0, "normalize": True},
    random=True,
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_ties(tensors, base, weight, density, keys, normalize=True, **g):
    """base + lambda * disjoint_mean(elect_sign(dare(theta_i - base)))."""
    deltas = _sparse_deltas(tensors, base, density, keys)
    return add_to_base(elect_and_merge(deltas, weight, normalize), base, g.get("lambda", 1.0))

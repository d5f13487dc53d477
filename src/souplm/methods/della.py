"""DELLA (MAGPRUNE): drop task-vector entries at random, the small ones more often, then TIES election
(`della`) or a weighted sum (`della_linear`).

As in mergekit 0.1.5: entries are ranked by magnitude within each row (dim 1; a 1-D tensor is one row);
rank r of m (0 = smallest) is kept with probability p = (density - epsilon) + 2 epsilon r / (m - 1), a
ramp from density - epsilon to density + epsilon whose mean is density. With `rescale` (the default) the
pruned tensor is scaled to keep its L1 norm (mergekit's choice; the paper's per-entry 1/p is not used).
density >= 1 keeps the task vector whole. density +/- epsilon must lie inside (0, 1).

The draws are souplm's counter-based stream (`dare.draws`), keyed by (seed, tensor, model): each entry's
16-bit draw is compared with round(p * 2**16), so results are reproducible and order-independent and
match mergekit in distribution (not bit for bit; mergekit uses torch.bernoulli).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .dare import draws, keep_level
from .gta import combine, l1_rescaled, lam_of, values
from .registry import ParamSpec, register
from .task_arithmetic import task_vectors

if TYPE_CHECKING:
    import numpy as np
    import torch

SPECS = {
    "epsilon": ParamSpec(float, 0.0, 0.5, hi_open=True),
    "rescale": ParamSpec(bool),
}


def check_window(params: dict[str, np.ndarray], where: str) -> str | None:
    """Why density +/- epsilon leaves (0, 1) for some model (None when it does not): mergekit refuses it
    the same way, except for density >= 1 (no pruning, epsilon unused)."""
    from .gta import exact

    for i, (d, e) in enumerate(zip(params["density"].reshape(-1), params["epsilon"].reshape(-1))):
        d, e = exact(float(d)), exact(float(e))
        if d < 1.0 and (d + e >= 1.0 or d - e <= 0.0):
            return (f"models[{i}]: density {d:g} +/- epsilon {e:g} must lie inside (0, 1) "
                    f"(lower epsilon below {min(d, 1.0 - d):g}){where}")
    return None


def _row_order(mag: torch.Tensor) -> torch.Tensor:
    """Indices that sort each row of `mag` ascending. On the host NumPy's vectorised sort (AVX-512 where
    the CPU has it) is ~3x faster than torch's; ties may come in either order (the ramp's distribution
    does not depend on it)."""
    import numpy as np
    import torch

    if mag.device.type != "cpu":
        return mag.argsort(dim=-1)
    return torch.from_numpy(np.argsort(mag.contiguous().numpy(), axis=-1))


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability: the density +/- epsilon ramp over each row's magnitude ranks."""
    import torch

    rows = delta.view(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
    m = rows.shape[-1]
    order = _row_order(rows.abs())
    if m > 1:
        ramp = torch.arange(m, dtype=torch.float32, device=delta.device).mul_(2.0 * epsilon / (m - 1))
        ramp.add_(density - epsilon)
    else:  # one entry per row: its rank is both smallest and largest; keep it with the mean, density
        ramp = torch.full((1,), density, dtype=torch.float32, device=delta.device)
    prob = torch.empty(rows.shape, dtype=torch.float32, device=delta.device)
    prob.scatter_(-1, order, ramp.expand(rows.shape))
    return prob.view(delta.shape) if delta.dim() < 2 else prob.movedim(-1, 1)


def magprune(delta: torch.Tensor, density: float, epsilon: float, key: int, rescale: bool) -> torch.Tensor:
    """Drop entries of `delta` with the ramp's probabilities, in place (L1-rescaled with `rescale`)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    level = keep_probabilities(delta, density, epsilon).mul_(keep_level(1.0)).round_()  # x 2**16
    keep = draws(key, delta.numel(), delta.device).view(delta.shape).lt_(level)
    return l1_rescaled(delta, keep, rescale)


def _pruned(tensors, base, density, epsilon, keys, rescale):
    return [magprune(d, p, e, k, rescale)
            for d, p, e, k in zip(task_vectors(tensors, base), values(density), values(epsilon), keys)]


CONTRACT = {
    "specs": SPECS,
    "needs_base": True,
    "min_models": 1,
    "max_models": None,
    "model_params": {"weight": 1.0, "density": 1.0, "epsilon": 0.15},
    "required": ("weight",),
    "random": True,
    "check_params": check_window,
    "reference": "https://arxiv.org/abs/2406.11617",
}


@register("della", global_params={"lambda": 1.0, "normalize": True, "rescale": True}, **CONTRACT)
def della(tensors, base, weight, density, epsilon, keys, normalize=True, rescale=True, **g):
    """base + lambda * disjoint_mean(elect_sign(w_i magprune(theta_i - base; density_i, epsilon_i)))."""
    deltas = _pruned(tensors, base, density, epsilon, keys, rescale)
    return combine(deltas, base, weight, True, normalize, lam_of(g))


@register("della_linear", global_params={"lambda": 1.0, "normalize": False, "rescale": True}, **CONTRACT)
def della_linear(tensors, base, weight, density, epsilon, keys, normalize=False, rescale=True, **g):
    """base + lambda * sum_i w_i magprune(theta_i - base; density_i, epsilon_i)."""
    deltas = _pruned(tensors, base, density, epsilon, keys, rescale)
    return combine(deltas, base, weight, False, normalize, lam_of(g))

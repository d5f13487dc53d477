"""The fused executor (C kernels) against the torch executor, on whole merges of the tiny test family.

The torch executor's methods are checked against NumPy statements of each formula (test_methods.py)
and the kernels against their own NumPy statement (test_kernels.py); here the two executors must give
the same checkpoint for every method they share, up to the rounding of the output dtype (torch fuses
some multiply-adds; the kernels never do).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import souplm
from souplm.engine import execute_fused as fused
from souplm.engine.recipe import Recipe
from souplm.errors import SoupError

pytestmark = pytest.mark.skipif(fused._kernels is None, reason="souplm._kernels is not built")


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merge_both(recipe: Recipe, tmp_path: Path, monkeypatch, name: str = "m", **kwargs):
    """The same recipe through each executor; returns both checkpoints' tensors."""
    out = {}
    for executor in ("fused", "torch"):
        monkeypatch.setenv("SOUPLM_EXECUTOR", executor)
        report = souplm.merge(recipe, tmp_path / f"{name}-{executor}", progress=False, hash_inputs=False, **kwargs)
        assert report.executor == executor
        out[executor] = weights(tmp_path / f"{name}-{executor}")
    return out["fused"], out["torch"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, t in a.items():
        assert t.dtype == b[k].dtype, k
        # one unit in the last place of the output dtype (torch's fused multiply-add may round differently)
        eps = torch.finfo(t.dtype).eps if t.is_floating_point() else 0
        torch.testing.assert_close(t, b[k], rtol=2 * eps, atol=1e-6, msg=k)


METHODS = [
    ("linear", {"weight": [0.3, 0.7]}),
    ("dare_linear", {"weight": [0.6, 0.6], "density": [0.5, 0.2], "exact_rescale": True}),
    ("dare_ties", {"weight": [1.0, 0.5], "density": [0.4, 0.9], "rescale": False, "normalize": True}),
    ("linear", {"weight": [1.0, 2.0], "normalize": False}),
    ("uniform", {}),
    ("task_arithmetic", dict(weight=[0.7, 0.4], **{"lambda": 0.8})),
    ("ties", {"weight": [1.0, 0.5], "density": [0.5, 0.3]}),
    ("ties", {"weight": [1.0, -0.5], "density": [0.7, 1.0], "normalize": True}),
    ("ties", dict(weight=[1.0, 1.0], density=[0.5, 0.5], normalize=False, **{"lambda": 0.6})),
    ("dare_linear", {"weight": [0.6, 0.6], "density": [0.5, 0.2]}),
    ("dare_ties", {"weight": [1.0, 1.0], "density": [0.5, 0.9]}),
]


def recipe_for(family, method: str, params: dict, dtype: str | None = None) -> Recipe:
    per_model = {k: v for k, v in params.items() if isinstance(v, list)}
    models = [{"model": str(family[m]), "parameters": {k: v[i] for k, v in per_model.items()}}
              for i, m in enumerate(("a", "b"))]
    data = {"merge_method": method, "models": models, "seed": 3,
            "parameters": {k: v for k, v in params.items() if not isinstance(v, list)}}
    if method not in ("linear", "uniform"):
        data["base_model"] = str(family["base"])
    if dtype:
        data["dtype"] = dtype
    return Recipe.load(data)


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
@pytest.mark.parametrize(("method", "params"), METHODS, ids=[f"{m}{i}" for i, (m, _) in enumerate(METHODS)])
def test_fused_equals_torch_for_every_method(family, tmp_path, monkeypatch, method, params, dtype):
    a, b = merge_both(recipe_for(family, method, params, dtype), tmp_path, monkeypatch)
    assert_same(a, b)


def test_fused_wise_ft_and_bf16_inputs(family, tmp_path, monkeypatch):
    # bf16 inputs: the kernels read the stored bf16 bits directly
    for name in ("a", "base"):
        sd = {k: v.to(torch.bfloat16) for k, v in weights(family[name]).items()}
        (tmp_path / f"{name}16").mkdir()
        save_file(sd, tmp_path / f"{name}16" / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / f"{name}16" / "config.json").write_text((family[name] / "config.json").read_text())
    r = Recipe.load({"merge_method": "wise_ft", "base_model": str(tmp_path / "base16"),
                     "models": [{"model": str(tmp_path / "a16"), "parameters": {"weight": 0.35}}]})
    a, b = merge_both(r, tmp_path, monkeypatch)
    assert_same(a, b)
    assert all(t.dtype == torch.bfloat16 for t in a.values())


def test_fused_row_table_and_vocab_extension(family, tmp_path, monkeypatch):
    # per-row weights on the embedding; LLaVA's extra embedding row copied from the model that has it
    rows = torch.linspace(0, 1, 64).tolist()
    table = souplm.CoefficientTable([str(family["a"]), str(family["llava"])],
                                    {"embed": [rows, [1 - r for r in rows]], "layers.1.up": [0.2, 0.8]})
    r = Recipe.vanilla(family["a"], family["llava"], 0.4).model_copy(update={"vocab_policy": "extend"})
    a, b = merge_both(r, tmp_path, monkeypatch, coefficients=table)
    assert_same(a, b)
    t = Recipe.vanilla(family["a"], family["llava"], 0.4).model_copy(update={"vocab_policy": "truncate"})
    a, b = merge_both(t, tmp_path, monkeypatch, name="t")
    assert_same(a, b)


def test_fused_names_a_nan_and_writes_nothing(family, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = weights(family["b"])
    sd["model.layers.1.self_attn.o_proj.weight"][2, 5] = float("inf")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((family["b"] / "config.json").read_text())
    monkeypatch.setenv("SOUPLM_EXECUTOR", "fused")
    r = Recipe.load({"merge_method": "ties", "base_model": str(family["base"]), "parameters": {"weight": 1.0},
                     "models": [{"model": str(family["a"])}, {"model": str(bad)}]})
    with pytest.raises(SoupError, match=r"tensor model.layers.1.self_attn.o_proj.weight of model .*bad contains NaN or Inf"):
        souplm.merge(r, tmp_path / "out", progress=False, hash_inputs=False)
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_a_fused_merge_never_imports_torch(family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "dare_ties", "base_model": str(family["base"]),
                                  "models": [{"model": str(family["a"]), "parameters": {"density": 0.5, "weight": 1}},
                                             {"model": str(family["b"]), "parameters": {"density": 0.5, "weight": 1}}]}))
    code = ("import sys; from souplm.cli import main; rc = main(['merge', sys.argv[1], '-o', sys.argv[2], '--quiet']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(recipe), str(tmp_path / "out")], check=True,
                   env={"SOUPLM_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("t", [0.0, 0.3, [0.2, 0.9]])
def test_fused_slerp_equals_torch(family, tmp_path, monkeypatch, t):
    # the angle is summed in float64 here and in float32 by torch: coefficients agree to ~1e-7
    r = Recipe.load({"merge_method": "slerp", "parameters": {"t": t},
                     "models": [{"model": str(family["a"])}, {"model": str(family["other"])}]})
    a, b = merge_both(r, tmp_path, monkeypatch)
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fused_blocker_names_why_not(family, tmp_path, monkeypatch):
    from souplm.engine import prepare

    plan, _ = prepare(Recipe.vanilla(family["a"], family["b"], 0.5))
    assert fused.fused_blocker(plan) is None
    monkeypatch.setenv("SOUPLM_EXECUTOR", "torch")
    assert fused.fused_blocker(plan) == "SOUPLM_EXECUTOR=torch"
    monkeypatch.delenv("SOUPLM_EXECUTOR")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(weights(family["b"]), pickled / "pytorch_model.bin")
    plan, _ = prepare(Recipe.vanilla(family["a"], pickled, 0.5).model_copy(update={"allow_pickle": True}))
    assert fused.fused_blocker(plan) == "an input is not a plain safetensors checkpoint (pickled, mapped, or re-indexed to a merged vocabulary)"


def test_fused_ties_splits_tied_magnitudes_across_threads_like_torch(family, tmp_path, monkeypatch):
    """bf16 fine-tunes whose deltas take a few values: the k-th largest |delta| ties with thousands of
    entries, and both executors keep exactly k, the first ties in index order, even when the kernels split
    a tensor across threads (each range gets its share of the ties)."""
    monkeypatch.setattr(fused, "MIN_SPLIT", 256)
    g = torch.Generator().manual_seed(0)
    steps = torch.tensor([-0.5, -0.25, 0.25, 0.5])
    for name in ("base", "a", "b"):
        sd = {k: v.to(torch.bfloat16) for k, v in weights(family["base"]).items()}
        if name != "base":
            sd = {k: (v.float() + steps[torch.randint(0, 4, v.shape, generator=g)]).to(torch.bfloat16)
                  for k, v in sd.items()}
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text((family["base"] / "config.json").read_text())
    r = Recipe.load({"merge_method": "ties", "base_model": str(tmp_path / "base"), "parameters": {"weight": 1.0},
                     "models": [{"model": str(tmp_path / "a"), "parameters": {"density": 0.3}},
                                {"model": str(tmp_path / "b"), "parameters": {"density": 0.55}}]})
    a, b = merge_both(r, tmp_path, monkeypatch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    base = weights(tmp_path / "base")
    name = "model.layers.0.mlp.up_proj.weight"
    one = Recipe.load({"merge_method": "ties", "base_model": str(tmp_path / "base"), "parameters": {"weight": 1.0},
                       "models": [{"model": str(tmp_path / "a"), "parameters": {"density": 0.3}}]})
    solo, _ = merge_both(one, tmp_path, monkeypatch, name="solo")
    assert int((solo[name] != base[name]).sum()) == int(0.3 * base[name].numel())


def mergekit_ties_bf16(base, models, weights, density):
    """TIES as mergekit 0.1.5 computes a bf16 recipe, written from its definition with torch ops in bf16:
    deltas, weights and products in bf16, the sums over models accumulated in float32 and rounded once,
    + elected where the weighted sum is >= 0, the disjoint sum divided by the agreeing weights' sum."""
    deltas = []
    for m in models:
        d = m - base  # bf16
        flat = d.abs().float().reshape(-1)
        k = max(1, int(density * flat.numel()))
        keep = torch.zeros(flat.numel(), dtype=torch.bfloat16)
        keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = 1
        deltas.append(d * keep.reshape(d.shape))
    w = torch.tensor(weights, dtype=torch.bfloat16).reshape(-1, *([1] * base.dim()))
    p = torch.stack(deltas) * w
    majority = torch.where(p.sum(dim=0) >= 0, 1, -1).to(torch.bfloat16)
    mask = (p.sign() == majority).to(torch.bfloat16)
    mixed = (p * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + mixed / divisor


def test_bf16_ties_rounds_every_step_like_mergekit(family, tmp_path, monkeypatch):
    """A bf16 TIES recipe: both executors give the bytes of the bf16 statement above (compute_dtype is
    mergekit's rule), and compute_dtype: float32 gives the fp32 statement rounded once instead."""
    for name in ("base", "a", "b"):
        sd = {k: v.to(torch.bfloat16) for k, v in weights(family[name]).items()}
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text((family[name] / "config.json").read_text())
    data = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "dtype": "bfloat16",
            "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 0.7, "density": 0.4}},
                       {"model": str(tmp_path / "b"), "parameters": {"weight": 0.45, "density": 0.4}}]}
    fused_out, torch_out = merge_both(Recipe.load(data), tmp_path, monkeypatch)
    sd = {n: weights(tmp_path / n) for n in ("base", "a", "b")}
    name = "model.layers.0.self_attn.q_proj.weight"
    expect = mergekit_ties_bf16(sd["base"][name], [sd["a"][name], sd["b"][name]], [0.7, 0.45], 0.4)
    assert torch.equal(fused_out[name], expect) and torch.equal(torch_out[name], expect)
    f32, _ = merge_both(Recipe.load({**data, "compute_dtype": "float32"}), tmp_path, monkeypatch, name="f32")
    assert not torch.equal(f32[name], expect)  # the single rounding differs somewhere

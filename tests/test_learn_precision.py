"""Learnable soups on half-precision bases (issue 15 §3-§5): alpha gradients against a float64
reference from the same rounded bases, no per-layer host sync, the memory-lean path on Llama and
Gemma 3, per-unit regularizer, unit rules for fused/MoE tensors, and learn's final merge table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import souplm.learn.soup_module as sm
from souplm.arch.units import unit_of
from souplm.engine.coefficients import CoefficientTable
from souplm.learn import final_merge_table
from souplm.learn.activations import get_activation
from souplm.learn.regularizers import penalty
from souplm.learn.soup_module import AlphaBank, AlphaRef, SoupEmbedding, SoupLinear, build_soup

TORCH_DIR = str(Path(torch.__file__).parent)
HALF = [torch.bfloat16, torch.float16]
RTOL = 1e-3


def close_pair(shape, dtype, seed=0, delta=0.02):
    """Two fine-tunes of one base (the hard case: the signal is a small difference), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    return [(w + delta * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(2)]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def ref_grad(coef: torch.Tensor, loss_of_merged) -> torch.Tensor:
    """float64 autograd through an explicitly merged tensor: the independent reference."""
    c = coef.detach().double().requires_grad_(True)
    loss_of_merged(c).backward()
    return c.grad


def sigmoid_signal(g: torch.Tensor) -> torch.Tensor:
    """What a two-model activation sees: dL/dc_1 - dL/dc_2 (per row for row granularity)."""
    return g[0] - g[1]


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(sm, "BACKWARD_BLOCK", 512)  # several row blocks in the tests' small weights


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("row", [False, True])
def test_linear_alpha_gradient_matches_float64(dtype, row, small_blocks):
    bases = close_pair((48, 40), dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 40, generator=g).to(dtype)
    gy = torch.randn(3, 7, 48, generator=g).to(dtype)
    coef = torch.tensor([0.6, 0.4]) if not row else torch.rand(2, 48, generator=g)
    c = coef.clone().requires_grad_(True)
    y = sm._SoupLinearFn.apply(x, c, True, *bases)
    (y.float() * gy.float()).sum().backward()

    def loss(c64):
        cc = c64 if c64.dim() == 1 else c64.unsqueeze(-1)
        w = cc[0] * bases[0].double() + cc[1] * bases[1].double()
        return ((x.double() @ w.t()) * gy.double()).sum()

    want = ref_grad(coef, loss)
    assert rel(c.grad, want) <= RTOL
    assert rel(sigmoid_signal(c.grad), sigmoid_signal(want)) <= RTOL


@pytest.mark.parametrize("dtype", HALF)
def test_half_accumulation_would_fail_the_bound(dtype):
    """The bound is tight enough to catch the old code: dW and the dots formed in the base dtype."""
    bases = close_pair((48, 40), dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(21, 40, generator=g).to(dtype)
    gy = torch.randn(21, 48, generator=g).to(dtype)
    dw = gy.t() @ x  # half precision dW
    old = torch.stack([torch.dot(dw.reshape(-1), b.reshape(-1)) for b in bases]).double()
    want = torch.stack([((x.double() @ b.double().t()) * gy.double()).sum() for b in bases])
    assert rel(sigmoid_signal(old), sigmoid_signal(want)) > RTOL


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("row", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_untied_embedding_alpha_gradient_matches_float64(dtype, row, scaled):
    bases = close_pair((30, 16), dtype)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 30, (4, 9), generator=g)
    gout = torch.randn(4, 9, 16, generator=g).to(dtype)
    scale = torch.tensor(16 ** 0.5) if scaled else None
    coef = torch.tensor([0.3, 0.7]) if not row else torch.rand(2, 30, generator=g)
    c = coef.clone().requires_grad_(True)
    out = sm._SoupEmbeddingFn.apply(ids, c, scale, *bases)
    (out.float() * gout.float()).sum().backward()

    def loss(c64):
        cc = c64 if c64.dim() == 1 else c64.unsqueeze(-1)
        table = cc[0] * bases[0].double() + cc[1] * bases[1].double()
        s = 1.0 if scale is None else float(scale.to(dtype))
        return (table[ids] * s * gout.double()).sum()

    want = ref_grad(coef, loss)
    assert rel(c.grad, want) <= RTOL
    assert rel(sigmoid_signal(c.grad), sigmoid_signal(want)) <= RTOL


@pytest.mark.parametrize("dtype", HALF)
def test_tied_embedding_and_lm_head_share_one_alpha(dtype, small_blocks):
    """Both uses of the tied tensor add into one alpha gradient, each accumulated in fp32."""
    bases = close_pair((30, 16), dtype)
    bank = AlphaBank(2, get_activation("sigmoid"), {"embed": ()})
    with torch.no_grad():
        bank.raw.fill_(0.4)
    ref = AlphaRef(bank, "embed")
    params = [nn.Parameter(b, requires_grad=False) for b in bases]
    emb, head = SoupEmbedding(params, ref), SoupLinear(params, ref)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 30, (2, 5), generator=g)
    h = torch.randn(2, 5, 16, generator=g).to(dtype)
    g1 = torch.randn(2, 5, 16, generator=g).to(dtype)
    g2 = torch.randn(2, 5, 30, generator=g).to(dtype)
    ((emb(ids).float() * g1.float()).sum() + (head(h).float() * g2.float()).sum()).backward()

    r = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    a = torch.sigmoid(r)
    table = a * bases[0].double() + (1 - a) * bases[1].double()
    ((table[ids] * g1.double()).sum() + ((h.double() @ table.t()) * g2.double()).sum()).backward()
    assert abs(float(bank.raw.grad[0]) - float(r.grad)) <= RTOL * abs(float(r.grad))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("row", [False, True])
def test_norm_alpha_gradient_matches_float64(dtype, row):
    g = torch.Generator().manual_seed(4)
    w = 1.0 + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    bases = [(w + 0.01 * torch.randn(64, generator=g, dtype=torch.float64)).to(dtype) for _ in range(2)]
    gm = torch.randn(64, generator=g).to(dtype)
    coef = torch.tensor([0.55, 0.45]) if not row else torch.rand(2, 64, generator=g)
    c = coef.clone().requires_grad_(True)
    merged = sm._merge_autograd(c, bases)
    assert merged.dtype == dtype
    (merged.float() * gm.float()).sum().backward()
    want = ref_grad(coef, lambda c64: ((c64[0] * bases[0].double() + c64[1] * bases[1].double()) * gm.double()).sum())
    assert rel(c.grad, want) <= RTOL
    assert rel(sigmoid_signal(c.grad), sigmoid_signal(want)) <= RTOL


@pytest.mark.parametrize("dtype", HALF)
def test_forward_never_rounds_an_alpha_to_the_base_dtype(dtype):
    """bf16 cannot tell 0.5 from 0.5005 (both round to 0.5); the merged weight must still move with alpha.

    Bases +1 and -1: alpha (0.4995, 0.5005) merges to -0.001, representable in bf16/fp16; with the
    alphas rounded to bf16 first it would be exactly 0.
    """
    c = torch.tensor([0.4995, 0.5005])
    assert torch.equal(c.to(torch.bfloat16), torch.tensor([0.5, 0.5], dtype=torch.bfloat16))
    for shape, coef in (((4, 8), c), ((4, 8), c.view(2, 1).expand(2, 4)), ((8,), c)):
        bases = [torch.ones(shape, dtype=dtype), -torch.ones(shape, dtype=dtype)]
        for merged in (sm._merge(coef, bases), sm._merge_autograd(coef, bases)):
            assert merged.dtype == dtype
            assert torch.allclose(merged.double(), torch.full(shape, -0.001, dtype=torch.float64), rtol=1e-2)
    ids = torch.tensor([[0, 1]])
    tables = [torch.ones(3, 4, dtype=dtype), -torch.ones(3, 4, dtype=dtype)]
    out = sm._SoupEmbeddingFn.apply(ids, c, None, *tables)
    assert torch.allclose(out.double(), torch.full((1, 2, 4), -0.001, dtype=torch.float64), rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# whole models


def tiny_llama(dtype, tied=False, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tied, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_gemma3(dtype, seed=0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).to(dtype)


def perturbed(model: nn.Module, seed: int, noise: float = 0.02) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.double() + noise * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("granularity", ["layer_mapping", "row"])
def test_no_host_sync_in_forward_and_backward(monkeypatch, granularity):
    model = tiny_llama(torch.bfloat16, tied=True)
    soup = build_soup(model, [perturbed(model, 1)], granularity=granularity, activation="sigmoid")
    ids = torch.randint(0, 64, (2, 8))
    calls = []

    originals = {n: getattr(torch.Tensor, n) for n in ("tolist", "item", "__float__", "__int__", "__bool__")}

    def trap(name):
        # transformers' own mask code syncs once per forward; only souplm's per-layer code is trapped
        def f(self, *a, **k):
            frame = sys._getframe(1)  # the first caller outside torch itself
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename == sm.__file__:
                calls.append(f"{name} in {frame.f_code.co_name}")
                raise AssertionError(f"host sync: Tensor.{name} in soup_module.{frame.f_code.co_name}")
            return originals[name](self, *a, **k)
        return f

    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    soup(input_ids=ids).float().sum().backward()
    monkeypatch.undo()
    assert calls == [] and soup.alphas.raw.grad is not None and torch.isfinite(soup.alphas.raw.grad).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lean_path_taken_and_no_merged_weight_kept(arch):
    make = tiny_llama if arch == "llama" else tiny_gemma3
    ref_a, ref_b = make(torch.float64, seed=0), make(torch.float64, seed=1)
    model = make(torch.float64, seed=0)
    sd_b = {k: v.clone() for k, v in ref_b.state_dict().items()}
    soup = build_soup(model, [sd_b], granularity="layer_mapping", activation="sigmoid")
    assert soup.fallback_modules == [] and soup.other_matrices == []
    assert not any(type(m) in (nn.Linear,) or isinstance(m, nn.Embedding) for m in soup.model.modules())
    assert any(isinstance(m, SoupEmbedding) for m in soup.model.modules())
    base_ptrs = {p.data_ptr() for p in soup.model.parameters()}
    ids = torch.randint(0, 64, (1, 7))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = soup(input_ids=ids)
    big = [tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[0] >= 32 and t.shape[1] >= 32
           and t.data_ptr() not in base_ptrs]
    assert big == [], f"autograd kept a merged weight: {big}"
    # forward semantics kept (Gemma 3's embed_scale included): the explicit average, at alpha = 0.5
    with torch.no_grad():
        for (_, p), q in zip(ref_a.named_parameters(), ref_b.parameters()):
            p.copy_(0.5 * p + 0.5 * q)
    want = ref_a(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got.detach(), want, atol=1e-9, rtol=1e-9)


def test_bf16_learned_table_agrees_with_fp32():
    """A few SGD steps on bf16 bases vs the same (bf16-rounded) bases in fp32, same data.

    Bound: the alpha gradients differ only through bf16 activations (unit roundoff 2^-8 = 0.4%,
    through ~10 rounded ops of a 2-layer model: a few %); SGD's movement is the sum of the steps,
    so each alpha's movement from init may differ by at most 10% of the fp32 movement (+1e-5).
    """
    torch.manual_seed(0)
    base = tiny_llama(torch.bfloat16, seed=0)
    other = perturbed(base, 1, noise=0.05)
    sd_a = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(0, 64, (4, 12))
    moves = {}
    for dtype in (torch.bfloat16, torch.float32):
        m = tiny_llama(dtype, seed=0)
        m.load_state_dict({k: v.to(dtype) for k, v in sd_a.items()})
        soup = build_soup(m, [{k: v.to(dtype) for k, v in other.items()}], activation="sigmoid")
        opt = torch.optim.SGD([soup.alphas.raw], lr=2.0)
        for _ in range(5):
            logits = soup(input_ids=ids[:, :-1]).float()
            nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
        moves[dtype] = torch.stack([soup.alphas.coefficients(g)[0] for g in soup.alphas.groups]).detach() - 0.5
    fp32, bf16 = moves[torch.float32], moves[torch.bfloat16]
    assert fp32.abs().max() > 1e-3  # the alphas moved
    assert ((bf16 - fp32).abs() <= 0.10 * fp32.abs() + 1e-5).all(), (bf16 - fp32).abs().max()


# ------------------------------------------------------------------------------------------------
# regularizer, unit rules, final merge


def test_regularizer_is_per_unit():
    lam = 0.1
    # sigmoid: raw moved by 1.0 in one unit; softmax (2 models): the same alpha, raw (0.5, -0.5) around init
    sig = penalty("l1", lam, torch.tensor([1.0]), torch.zeros(1), units=[(0, (1,), False)])
    soft = penalty("l1", lam, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), units=[(0, (2,), True)])
    assert float(sig) == pytest.approx(0.1) and float(soft) == pytest.approx(0.1)
    sig2 = penalty("l2", lam, torch.tensor([1.0]), torch.zeros(1), units=[(0, (1,), False)])
    soft2 = penalty("l2", lam, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), units=[(0, (2,), True)])
    assert float(sig2) == pytest.approx(0.1) and float(soft2) == pytest.approx(0.1)
    # a shift of every softmax raw value does not change alpha: no penalty
    assert float(penalty("l1", lam, torch.tensor([1.5, 1.5]), torch.tensor([0.5, 0.5]), units=[(0, (2,), True)])) == 0
    # row granularity: 8 rows each moved by 1 weigh as one unit moved by 1
    assert float(penalty("l1", lam, torch.ones(8), torch.zeros(8), units=[(0, (8,), False)])) == pytest.approx(0.1)
    assert float(penalty("l1", lam, torch.ones(2, 8) * torch.tensor([[1.0], [0.0]]), torch.zeros(2, 8),
                         units=[(0, (2, 8), True)])) == pytest.approx(0.1)


def test_bank_unit_slots_cover_every_raw_value():
    bank = AlphaBank(2, get_activation("softmax"), {"embed": (), "layers.0.q": (5,)})
    slots = bank.unit_slots()
    assert sum(torch.Size(s).numel() for _, s, _ in slots) == bank.raw.numel()
    assert all(c for _, _, c in slots)


@pytest.mark.parametrize("name,key", [
    ("model.layers.1.self_attn.qkv_proj.weight", "layers.1.qkv"),
    ("model.layers.1.mlp.gate_up_proj.weight", "layers.1.gate_up"),
    ("model.layers.2.block_sparse_moe.experts.3.w1.weight", "layers.2.experts"),
    ("model.layers.2.block_sparse_moe.gate.weight", "layers.2.router"),
    ("model.layers.0.mlp.experts.7.down_proj.weight", "layers.0.experts"),
    ("model.layers.0.mlp.experts.gate_up_proj", "layers.0.experts"),
    ("model.layers.0.mlp.gate.weight", "layers.0.router"),
    ("model.layers.0.mlp.gate_proj.weight", "layers.0.gate"),
    ("model.layers.0.mlp.shared_expert.up_proj.weight", "layers.0.shared_expert"),
    ("model.layers.0.mlp.shared_expert_gate.weight", "layers.0.shared_expert_gate"),
])
def test_fused_and_moe_units(name, key):
    assert unit_of(name).key == key


def test_final_merge_copies_what_the_table_does_not_name(tmp_path):
    """What the table does not name comes from the output model (layer 1's up_proj), not summed by linear
    normalize: false; a stored rotary buffer (inv_freq) is dropped and reported (transformers recomputes it),
    not summed to 0.5 as it once was."""
    from safetensors.torch import save_file

    from souplm.engine import merge
    from souplm.engine.recipe import Recipe

    paths = []
    for i, w in enumerate((1.0, 3.0)):
        d = tmp_path / f"m{i}"
        d.mkdir()
        model = tiny_llama(torch.float32, seed=i)
        model.config.save_pretrained(d)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.full((4,), 0.25)
        sd["model.layers.0.self_attn.q_proj.weight"] = torch.full_like(sd["model.layers.0.self_attn.q_proj.weight"], w)
        save_file(sd, str(d / "model.safetensors"))
        paths.append(str(d))
    table = CoefficientTable(paths, {"layers.0.q": [0.25, 0.75]})
    merged_table = final_merge_table(table, 1)
    assert merged_table.coefficients["default"] == [0.0, 1.0] and "default" not in table.coefficients
    recipe = Recipe.from_models(paths, method="linear", normalize=False, output_model=paths[1])
    out = merge(recipe, tmp_path / "out", coefficients=merged_table, force=True, progress=False).out_dir
    from safetensors.torch import load_file

    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in got
    assert torch.allclose(got["model.layers.0.self_attn.q_proj.weight"], torch.tensor(0.25 * 1 + 0.75 * 3))
    src1 = load_file(str(tmp_path / "m1" / "model.safetensors"))
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], src1["model.layers.1.mlp.up_proj.weight"])


def test_learn_refuses_float16_before_touching_anything(tmp_path):
    import json

    from conftest import make_llama

    from souplm.errors import SoupError
    from souplm.learn import learn

    a = make_llama(tmp_path / "a", seed=0)
    b = make_llama(tmp_path / "b", seed=1)
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"text": "abc abc"}) + "\n")
    cfg = {"models": [str(a), str(b)], "meta_sets": [{"path": str(dev)}], "output": str(tmp_path / "run"),
           "dtype": "float16", "merge": False}
    with pytest.raises(SoupError, match="float16 is refused"):
        learn(cfg)
    assert not (tmp_path / "run").exists()

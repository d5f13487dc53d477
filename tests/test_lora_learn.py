"""Learned soups of LoRA adapters (learn/lora_soup.py), against statements made here:

- the soup's logits and its gradient w.r.t. the raw alphas equal, in float64, those of a plain
  transformers model whose weights are sum_i alpha_i * (PEFT's merge_and_unload of BASE+ADAPTER_i),
  the gradient by central finite differences of that independent model's loss;
- `souplm learn` over BASE+ADAPTER models (low-rank path) learns the same alphas and losses as
  `souplm learn` over the PEFT-merged models saved as full checkpoints (the dense learnable soup);
- the learned table merged by `souplm merge --coefficients` gives the trained soup's logits.
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from souplm.cli import main
from souplm.learn import learn
from souplm.learn.lora_soup import LoraSoupLinear, build_lora_soup
from souplm.lora.checkpoint import open_with_adapters

CHARS = "abcdefghijklmnopqrstuvwxyz .,"
VOCAB = 40


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(dtype=torch.float32, tie=False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    # sdpa: eager attention takes its softmax in float32, which would blur float64 finite differences
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=64, attn_implementation="sdpa", pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype)


ADAPTERS = {  # different targets, ranks, scalings; DoRA and modules_to_save take the dense path
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    "b": {"r": 2, "lora_alpha": 3, "target_modules": ["q_proj", "k_proj", "down_proj"], "use_rslora": True},
    "c": {"r": 3, "lora_alpha": 6, "target_modules": ["v_proj", "o_proj", "gate_proj"],
          "rank_pattern": {"layers.1.self_attn.v_proj": 2}, "alpha_pattern": {"o_proj": 2.0}},
    "dora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_dora": True},
    "saved": {"r": 2, "lora_alpha": 2, "target_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
}


def make_adapter(base_dir, out_dir, dtype, seed, **kw) -> dict:
    """A PEFT adapter with random non-zero factors; returns PEFT's merge_and_unload state dict."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.2)
    pm.save_pretrained(out_dir)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(fresh, out_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def f64(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_learn64")
    tiny_llama(torch.float64).save_pretrained(root / "base")
    sds = {n: make_adapter(root / "base", root / n, torch.float64, seed=i + 1, **ADAPTERS[n])
           for i, n in enumerate(ADAPTERS)}
    return root, sds


def reference_logits(base_dir, sds: list[dict], alphas: dict, ids) -> torch.Tensor:
    """A plain LlamaForCausalLM with W = sum_i alphas[name][i] * W_i (W_i: PEFT's merged weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    sd = {k: sum(alphas[k][i] * sds[i][k] for i in range(len(sds))) for k in sds[0]}
    model.load_state_dict(sd, strict=False)
    return model(input_ids=ids).logits


def loss_of(logits, ids) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """Llama's RMSNorm computes in float32 even in a float64 model, which would drown a finite
    difference in rounding: keep it in the model's dtype."""
    from transformers.models.llama import modeling_llama

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


@pytest.mark.parametrize("names,granularity", [(("a", "b", "c"), "tensor"), (("a", "dora", "saved"), "tensor"),
                                               (("a", "b"), "row")])
def test_logits_and_gradient_against_finite_differences(f64, float64_rmsnorm, names, granularity):
    from transformers import AutoModelForCausalLM

    root, sds = f64
    sources = [open_with_adapters(f"{root / 'base'}+{root / n}") for n in names]
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float64)
    soup = build_lora_soup(model, sources, granularity=granularity, activation="softmax")
    if names == ("a", "b", "c"):  # every LoRA module kept its factors; the base's other modules are untouched
        assert len(soup.low_rank_modules) == 14 and soup.dense_modules == []
    elif "dora" in names:
        assert soup.dense_modules == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                                      "lm_head"]  # DoRA's q_proj, the saved lm_head
    assert any(isinstance(m, LoraSoupLinear) for m in soup.modules())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        soup.alphas.raw.copy_(torch.randn(soup.alphas.raw.shape, generator=g, dtype=torch.float64))
    ids = torch.randint(4, VOCAB, (2, 9), generator=g)
    keys = list(sds[names[0]])
    merged = [sds[n] for n in names]

    def alphas_from(raw: torch.Tensor) -> dict:  # the activation stated here: softmax over the models
        out = {}
        for k in keys:
            offset, shape = soup.alphas.slots[k]
            n = 1
            for s in shape:
                n *= s
            a = torch.softmax(raw[offset : offset + n].view(shape), dim=0)
            out[k] = [a[i].reshape(-1, *([1] * (merged[0][k].dim() - 1))) if a.dim() > 1 else a[i]
                      for i in range(len(names))]
        return out

    raw0 = soup.alphas.raw.detach().clone()
    got = soup(input_ids=ids)
    with torch.no_grad():
        want = reference_logits(root / "base", merged, alphas_from(raw0), ids)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    loss_of(got, ids).backward()
    grad = soup.alphas.raw.grad.detach().clone()
    # finite differences of the independent model's loss, on entries of touched and untouched tensors
    picks = {soup.alphas.slots[k][0] for k in ("model.layers.0.self_attn.q_proj.weight",
                                               "model.layers.1.mlp.up_proj.weight",
                                               "model.layers.1.self_attn.v_proj.weight",
                                               "model.norm.weight", "lm_head.weight")}
    picks |= set(torch.randint(0, raw0.numel(), (6,), generator=g).tolist())
    eps = 1e-5
    for j in sorted(picks):
        with torch.no_grad():
            lp, lm = [loss_of(reference_logits(root / "base", merged, alphas_from(raw0 + d), ids), ids).item()
                      for d in (eps * F.one_hot(torch.tensor(j), raw0.numel()).double(),
                                -eps * F.one_hot(torch.tensor(j), raw0.numel()).double())]
        fd = (lp - lm) / (2 * eps)
        assert abs(grad[j].item() - fd) <= 1e-7 + 1e-6 * abs(fd), (j, grad[j].item(), fd)


# ---------------------------------------------------------------------------------------------- learn


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    """A float32 base, two adapters, the PEFT-merged models as full checkpoints, and a dev set."""
    root = tmp_path_factory.mktemp("lora_learn32")
    tok = tokenizer()
    tiny_llama(torch.float32).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, n in enumerate(("a", "b")):
        sd = make_adapter(root / "base", root / n, torch.float32, seed=10 + i, **ADAPTERS[n])
        full = tiny_llama(torch.float32)
        full.load_state_dict(sd)
        full.save_pretrained(root / f"merged_{n}")
        tok.save_pretrained(root / f"merged_{n}")
    import random

    rng = random.Random(0)
    rows = ["".join(rng.choice(CHARS) for _ in range(20)) for _ in range(12)]
    (root / "dev.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return root


def run_learn(models, root, out, **kw):
    cfg = {"models": models, "meta_sets": [{"path": str(root / "dev.jsonl"), "samples": "all"}],
           "training": {"epochs": 2, "batch_size": 4, "max_length": 32}, "optimizer": {"lr": 0.05},
           "output": str(out), "seed": 0, **kw}
    return learn(cfg, progress=False)


@pytest.mark.parametrize("activation,granularity", [("softmax", "layer_mapping"), ("sigmoid", "model"),
                                                    ("clamp", "row")])
def test_learn_equals_dense_soup_of_merged_models(f32, tmp_path, activation, granularity):
    root = f32
    low = run_learn([f"{root / 'base'}+{root / 'a'}", f"{root / 'base'}+{root / 'b'}"], root, tmp_path / "low",
                    activation=activation, granularity=granularity, merge=False)
    dense = run_learn([str(root / "merged_a"), str(root / "merged_b")], root, tmp_path / "dense",
                      activation=activation, granularity=granularity, merge=False)
    assert low.table.meta["adapter_soup"]["low_rank_modules"] == 10
    assert low.steps == dense.steps == 6
    assert low.initial_loss == pytest.approx(dense.initial_loss, rel=1e-5)
    assert low.final_loss == pytest.approx(dense.final_loss, rel=1e-5)
    assert list(low.table.coefficients) == list(dense.table.coefficients)
    for k, v in dense.table.coefficients.items():
        torch.testing.assert_close(torch.tensor(low.table.coefficients[k]), torch.tensor(v), rtol=0, atol=2e-5)
    moved = [k for k, v in low.table.coefficients.items() if abs(torch.tensor(v).flatten()[0] - 0.5) > 1e-3]
    assert moved  # the alphas did move (so equal tables are not two untouched inits)


def test_learned_table_merges_to_the_trained_soup(f32, tmp_path):
    """learn's merged/ and `souplm merge --coefficients` over BASE+ADAPTER both give the soup's logits."""
    from transformers import AutoModelForCausalLM

    root = f32
    specs = [f"{root / 'base'}+{root / 'a'}", f"{root / 'base'}+{root / 'b'}"]
    res = run_learn(specs, root, tmp_path / "run", granularity="tensor")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    soup = build_lora_soup(model, [open_with_adapters(s) for s in specs], granularity="tensor")
    with torch.no_grad():
        soup.alphas.raw.copy_(state["raw"])
    ids = torch.randint(4, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = soup(input_ids=ids)
    out = tmp_path / "merged_cli"
    assert main(["merge", "--model", specs[0], "--model", specs[1], "--method", "linear",
                 "--coefficients", str(res.table_path),
                 "-o", str(out), "--quiet", "--no-hash"]) == 0
    for d in (out, res.merged_dir):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_config_base_and_adapters_form(f32, tmp_path):
    """`base:` + `adapters:` in a YAML file, relative paths, through the CLI."""
    root = f32
    cfg = root / "soup.yaml"
    cfg.write_text("base: base\nadapters: [a, b]\ngranularity: model\n"
                   "meta_sets: [{path: dev.jsonl, samples: all}]\ntraining: {epochs: 1, batch_size: 6}\n")
    assert main(["learn", str(cfg), "-o", str(tmp_path / "o"), "--no-merge", "--quiet"]) == 0
    table = json.loads((tmp_path / "o" / "coefficients.json").read_text())
    assert [m.split("+")[1] for m in table["models"]] == [str(root / "a"), str(root / "b")]
    assert table["meta"]["adapter_soup"] == {"low_rank_modules": 10, "dense_modules": 0}


def test_config_refusals(f32, tmp_path, capsys):
    root = f32
    cfg = root / "bad.yaml"
    cfg.write_text("base: base\nadapters: [a, b]\nmodels: [x, y]\nmeta_sets: [{path: dev.jsonl}]\n")
    assert main(["learn", str(cfg), "-o", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    cfg.write_text("base: base\nadapters: [a]\nmeta_sets: [{path: dev.jsonl}]\n")
    assert main(["learn", str(cfg), "-o", str(tmp_path / "o")]) == 2
    assert "2+ adapter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

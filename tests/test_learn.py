"""The learnable soup, checked against formulas written out here, never against its own output.

Models are tiny random Llamas (hidden 32, 2 layers) built in the tests, with a character-level
tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from souplm.arch.units import unit_of
from souplm.data.metasets import IGNORE, MetaSet, RowEncoder, load_meta_sets, split_by_ratio
from souplm.engine.coefficients import CoefficientTable
from souplm.errors import SoupError
from souplm.learn import learn, load_config
from souplm.learn.activations import get_activation
from souplm.learn.granularity import group_of
from souplm.learn.regularizers import penalty
from souplm.learn.soup_module import build_soup

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!\n<>/|+ABCDE")
# Renders plain-string and typed-part contents alike (the latter is what multimodal templates get).
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}"
    "{% endif %}{% endfor %}{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
P_ALPHABET, Q_ALPHABET = "abcdefgh", "acegbdfh"


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, BOS prepended, a tiny chat template."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()  # characters back to text, no spaces between them
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", additional_special_tokens=["<image>"])
    t.chat_template = CHAT_TEMPLATE
    return t


TOK = make_tokenizer()


def tiny_config(**kw) -> LlamaConfig:
    c = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0, "attn_implementation": "eager"}
    c.update(kw)
    return LlamaConfig(**c)


def cycle_text(rng: random.Random, alphabet: str, n: int = 24) -> str:
    start = rng.randrange(len(alphabet))
    return "".join(alphabet[(start + i) % len(alphabet)] for i in range(n))


def dev_loss(model, texts: list[str]) -> float:
    """Mean next-token loss, computed here from logits (equal-length rows, no padding)."""
    ids = torch.tensor([TOK(t)["input_ids"] for t in texts])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def average(sd_a: dict, sd_b: dict, alpha: float) -> dict:
    return {k: alpha * sd_a[k] + (1 - alpha) * sd_b[k] for k in sd_a}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine waiting threads cost 10-100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A and B fine-tuned from one init: A on cycles of abcdefgh (the dev distribution), B on acegbdfh."""
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    init = LlamaForCausalLM(tiny_config())
    out = {}
    for name, alphabet, seed in (("A", P_ALPHABET, 1), ("B", Q_ALPHABET, 2)):
        model = copy.deepcopy(init)
        rng = random.Random(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(12):  # under-trained on purpose: the soup has room to improve on A
            ids = torch.tensor([TOK(cycle_text(rng, alphabet))["input_ids"] for _ in range(8)])
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        model.save_pretrained(root / name)
        TOK.save_pretrained(root / name)
        out[name] = str(root / name)
        out[name + "_sd"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = random.Random(99)
    out["dev_texts"] = [cycle_text(rng, P_ALPHABET) for _ in range(48)]
    out["dev"] = write_jsonl(root / "dev.jsonl", [{"text": t} for t in out["dev_texts"]])
    out["root"] = root
    return out


def base_config(pair, tmp_path, **kw) -> dict:
    cfg = {"models": [pair["A"], pair["B"]], "meta_sets": [{"path": pair["dev"], "samples": 48}],
           "training": {"epochs": 3, "batch_size": 8}, "output": str(tmp_path / "run"), "merge": False}
    cfg.update(kw)
    return cfg


# ------------------------------------------------------------------------------------------------
# activations, granularity, regularizers: the paper's definitions written out


def test_activations_follow_footnote_2_and_stay_in_range():
    raw = torch.linspace(-6, 6, 25, dtype=torch.float64)
    sig = get_activation("sigmoid")
    assert sig.init(2).tolist() == 0.0 and sig(sig.init(2)).tolist() == [0.5, 0.5]
    for r, a in zip(raw.tolist(), sig(raw).T.tolist()):
        assert a[0] == pytest.approx(1 / (1 + math.exp(-r))) and a[0] + a[1] == pytest.approx(1)
        assert 0 < a[0] < 1
    lin = get_activation("linear")
    assert lin.init(2).item() == 0.5 and lin(raw).T.tolist()[0] == [-6.0, 7.0]  # unbounded: extrapolates
    clamp = get_activation("clamp")
    assert clamp.init(2).item() == 0.5
    for r, a in zip(raw.tolist(), clamp(raw).T.tolist()):
        assert a[0] == min(max(r, 0.0), 1.0) and a[1] == pytest.approx(1 - a[0])
    soft = get_activation("softmax")
    assert soft.init(2).tolist() == [0.5, 0.5] and soft(soft.init(2)).tolist() == [0.5, 0.5]
    r3 = torch.tensor([[0.3, -2.0], [1.5, 0.0], [-0.7, 4.0]], dtype=torch.float64)  # 3 models, 2 rows
    a3 = soft(r3)
    for col in range(2):
        z = sum(math.exp(r3[i, col].item()) for i in range(3))
        assert [a3[i, col].item() for i in range(3)] == pytest.approx([math.exp(r3[i, col].item()) / z for i in range(3)])
    assert soft.raw_shape(3, (5,)) == (3, 5) and sig.raw_shape(2, (5,)) == (5,)
    for name in ("sigmoid", "linear", "clamp"):
        with pytest.raises(SoupError, match="exactly 2 models.*softmax"):
            get_activation(name).check_models(3)
    get_activation("softmax").check_models(3)


def test_granularity_groups():
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    qb = "model.layers.0.self_attn.q_proj.bias"
    expect = {
        "model": ("model", "model", "model", "model"),
        "layer": ("layers.0", "layers.1", "layers.0", "embed"),
        "mapping": ("layers.*.q", "layers.*.q", "layers.*.q", "embed"),
        "layer_mapping": ("layers.0.q", "layers.1.q", "layers.0.q", "embed"),
        "tensor": (q0, q1, qb, "model.embed_tokens.weight"),
    }
    for gran, groups in expect.items():
        assert tuple(group_of(n, gran) for n in (q0, q1, qb, "model.embed_tokens.weight")) == groups


def test_regularizers_are_eq4():
    raw = torch.tensor([0.5, 1.5, -0.25], requires_grad=True)
    init = torch.tensor([0.5, 0.5, 0.5])
    assert penalty("l1", 0.1, raw, init).item() == pytest.approx(0.1 * (0 + 1.0 + 0.75))
    assert penalty("l2", 0.1, raw, init).item() == pytest.approx(0.1 * (0 + 1.0 + 0.5625))
    assert penalty("none", 0.1, raw, init).item() == 0.0


# ------------------------------------------------------------------------------------------------
# the on-the-fly soup: forward equals a static merge, gradient equals finite differences


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """Llama's RMSNorm (and eager attention's softmax) compute in float32 even in a float64 model,
    which would drown a finite difference in rounding; keep everything in the model's dtype."""
    from transformers.models.llama import modeling_llama

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def two_models(tied=False, bias=False, dtype=torch.float64):
    cfg = tiny_config(tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias, attn_implementation="sdpa")
    torch.manual_seed(3)
    a = LlamaForCausalLM(cfg).to(dtype)
    torch.manual_seed(4)
    b = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # norms start at 1 in both: make them differ so their alphas matter
        for m in (a, b):
            for n, p in m.named_parameters():
                if "norm" in n or "bias" in n:
                    p.add_(0.2 * torch.randn_like(p))
    return a, b


@pytest.mark.parametrize("granularity,activation,tied,bias", [
    ("layer_mapping", "softmax", False, False),
    ("row", "sigmoid", True, True),
    ("tensor", "linear", False, True),
    ("mapping", "clamp", True, False),
    ("model", "softmax", False, False),
])
def test_forward_equals_statically_merged_model(granularity, activation, tied, bias):
    a, b = two_models(tied, bias)
    sd_a = {k: v.clone() for k, v in a.state_dict().items()}
    sd_b = {k: v.clone() for k, v in b.state_dict().items()}
    soup = build_soup(a, [sd_b], granularity=granularity, activation=activation)
    torch.manual_seed(5)
    with torch.no_grad():
        soup.alphas.raw.copy_(0.5 + 0.8 * torch.randn_like(soup.alphas.raw))
    table = soup.coefficient_table(["A", "B"])
    ids = torch.randint(0, 64, (2, 9))
    got = soup(input_ids=ids)

    # the merge, by the formula, from the exported table (what the engine applies)
    def key(name: str) -> str:
        return name if granularity in ("tensor", "row") else unit_of(name).key

    merged = {}
    for name, theta_a in sd_a.items():
        if tied and name == "lm_head.weight":
            continue
        w = torch.tensor(table.coefficients[key(name)], dtype=torch.float64)
        if w.dim() == 2:  # one alpha per output row
            w = w.reshape(2, -1, *([1] * (theta_a.dim() - 1)))
        merged[name] = w[0] * theta_a + w[1] * sd_b[name]
    ref = LlamaForCausalLM(a.config).to(torch.float64)
    ref.load_state_dict(merged, strict=False)
    if tied:  # one unit, one alpha
        assert table.coefficients[key("lm_head.weight")] == table.coefficients[key("model.embed_tokens.weight")]
    assert torch.allclose(got, ref(input_ids=ids).logits, atol=1e-12, rtol=0)

    # the table's alphas are the activation of the raw parameter
    if activation == "sigmoid" and granularity == "row":
        name = "model.layers.1.mlp.up_proj.weight"
        raw = soup.alphas.raw_of(name)
        assert table.coefficients[name][0] == pytest.approx((1 / (1 + torch.exp(-raw))).tolist())
    groups = {group_of(n, granularity) for n in sd_a if not (tied and n == "lm_head.weight")}
    assert len(soup.alphas.groups) == len(groups)
    assert [n for n, p in soup.named_parameters() if p.requires_grad] == ["alphas.raw"]


@pytest.mark.parametrize("granularity,activation,tied,bias", [
    ("layer_mapping", "softmax", False, False),
    ("row", "sigmoid", True, True),
    ("tensor", "linear", False, True),
])
def test_alpha_gradient_matches_finite_differences(granularity, activation, tied, bias, float64_rmsnorm):
    a, b = two_models(tied, bias)
    soup = build_soup(a, [dict(b.state_dict())], granularity=granularity, activation=activation)
    torch.manual_seed(6)
    with torch.no_grad():
        soup.alphas.raw.copy_(0.5 + 0.5 * torch.randn_like(soup.alphas.raw))
    ids = torch.randint(0, 64, (2, 7))
    target = torch.randint(0, 64, (2, 7))

    def loss() -> torch.Tensor:
        return F.cross_entropy(soup(input_ids=ids).reshape(-1, 64), target.reshape(-1))

    loss().backward()
    grad = soup.alphas.raw.grad.clone()
    raw = soup.alphas.raw
    picks = random.Random(0).sample(range(raw.numel()), min(12, raw.numel()))
    eps = 1e-6
    for i in picks:
        with torch.no_grad():
            old = raw[i].item()
            raw[i] = old + eps
            up = loss().item()
            raw[i] = old - eps
            down = loss().item()
            raw[i] = old
        fd = (up - down) / (2 * eps)
        assert grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), f"raw[{i}]"


def test_bases_are_held_once_and_no_merged_copy_is_kept():
    a, b = two_models()
    a_ptrs = {p.data_ptr() for p in a.parameters()}
    soup = build_soup(a, [dict(b.state_dict())])
    base_ptrs = {p.data_ptr() for p in soup.model.parameters()}
    assert a_ptrs <= base_ptrs  # model A's own tensors are base 1: not copied
    n_params = sum(p.numel() for p in b.parameters())
    assert sum(p.numel() for p in soup.model.parameters()) == 2 * n_params  # two bases, nothing else

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        soup(input_ids=torch.randint(0, 64, (1, 5))).sum()
    big = [t for t in saved if t.dim() == 2 and t.shape[0] >= 32 and t.data_ptr() not in base_ptrs]
    assert big == [], "autograd kept a merged weight"


# ------------------------------------------------------------------------------------------------
# learning on real files


def test_learned_soup_moves_toward_A_and_beats_both_bases(pair, tmp_path):
    texts = pair["dev_texts"]
    sd_a, sd_b = pair["A_sd"], pair["B_sd"]
    model = LlamaForCausalLM(tiny_config())
    losses = {}
    for name, sd in (("A", sd_a), ("B", sd_b), ("soup", average(sd_a, sd_b, 0.5))):
        model.load_state_dict(sd)
        losses[name] = dev_loss(model, texts)

    # linear (the paper's "keep it the same") can go past A: the dev loss beats every base
    res = learn(base_config(pair, tmp_path, activation="linear", merge=True), progress=False)
    merged = LlamaForCausalLM.from_pretrained(res.merged_dir)
    learned = dev_loss(merged, texts)  # the engine's merged model, judged here
    assert learned < min(losses.values()) - 0.05, (learned, losses)
    assert res.final_loss == pytest.approx(learned, abs=1e-4)  # the soup the learner saw is the merged one
    alpha_a = [v[0] for v in res.table.coefficients.values()]
    assert sum(alpha_a) / len(alpha_a) > 0.6

    # softmax (the default) keeps alphas in (0, 1): toward A, below the even soup and B
    res = learn(base_config(pair, tmp_path / "soft"), progress=False)
    alpha_a = [v[0] for v in res.table.coefficients.values()]
    assert sum(alpha_a) / len(alpha_a) > 0.6 and all(0 < x < 1 for x in alpha_a)
    assert res.final_loss < losses["soup"] - 0.1 and res.final_loss < losses["B"]
    assert res.table.meta["final_loss"] == res.final_loss and res.table.meta["settings"]["activation"] == "softmax"
    log = [json.loads(line) for line in (tmp_path / "soft" / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if r["event"] == "step"]
    assert steps == list(range(1, 19)) and sum(r["event"] == "epoch" for r in log) == 3
    assert all("alpha" in r for r in log if r["event"] == "epoch")


def test_regularization_keeps_alphas_near_init(pair, tmp_path):
    quick = {"epochs": 3, "batch_size": 8, "evaluate": False}
    far = learn(base_config(pair, tmp_path / "free", training=quick), progress=False)
    near = learn(base_config(pair, tmp_path / "reg", training=quick, regularization={"kind": "l1", "lambda": 1.0}),
                 progress=False)

    def spread(t: CoefficientTable) -> float:
        return sum(abs(v[0] - 0.5) for v in t.coefficients.values())

    assert spread(near.table) < 0.5 * spread(far.table)


def test_resume_equals_uninterrupted(pair, tmp_path):
    cfg = base_config(pair, tmp_path, meta_sets=[{"path": pair["dev"], "samples": 16}],
                      training={"epochs": 3, "batch_size": 4, "evaluate": False})
    whole = learn({**cfg, "output": str(tmp_path / "whole")}, progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(epoch, loss):
        if epoch == 1:
            raise Stop

    part = {**cfg, "output": str(tmp_path / "part")}
    with pytest.raises(Stop):
        learn(part, progress=False, on_epoch_end=stop_after_first)
    with pytest.raises(SoupError, match="--resume"):
        learn(part, progress=False)  # a fresh run would overwrite the checkpoint: refused
    resumed = learn(part, resume=True, progress=False)
    assert resumed.resumed_from_epoch == 1 and resumed.steps == whole.steps == 12
    for key, value in whole.table.coefficients.items():
        assert resumed.table.coefficients[key] == pytest.approx(value, abs=1e-7)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "step"]
    assert steps == list(range(1, 13))  # steps logged once each, none lost or repeated
    with pytest.raises(SoupError, match="differs in: .*granularity"):
        learn({**part, "granularity": "layer"}, resume=True, progress=False)


def test_gradient_accumulation_matches_a_bigger_batch(pair, tmp_path):
    quick = {"epochs": 1, "evaluate": False}
    big = learn(base_config(pair, tmp_path / "big", training={**quick, "batch_size": 8}), progress=False)
    acc = learn(base_config(pair, tmp_path / "acc", training={**quick, "batch_size": 4, "grad_accum": 2}),
                progress=False)
    assert big.steps == acc.steps == 6
    for key, value in big.table.coefficients.items():
        assert acc.table.coefficients[key] == pytest.approx(value, abs=1e-5)  # float32 summation order


# ------------------------------------------------------------------------------------------------
# meta sets


def test_meta_set_formats_put_the_loss_where_it_belongs(tmp_path):
    enc = RowEncoder(TOK, max_length=256)

    def supervised(ex) -> str:
        return TOK.decode([t for t in ex.labels if t != IGNORE])

    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
                      {"role": "assistant", "content": "done"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ])
    ex = load_meta_sets([MetaSet(chat, samples=None)], enc)
    assert supervised(ex[0]) == "yo</s>done</s>"
    assert supervised(ex[1]) == "a</s>"
    choice = write_jsonl(tmp_path / "mc.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}])
    (ex,) = load_meta_sets([MetaSet(choice, samples=None)], enc)
    assert TOK.decode(ex.input_ids, skip_special_tokens=True) == "2+2?\nA. 3\nB. 4\nAnswer: B"
    assert supervised(ex) == " B"
    (ex,) = load_meta_sets([MetaSet(choice, samples=None, choice_style="text")], enc)
    assert supervised(ex) == " 4"
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(10)])
    (ex,) = load_meta_sets([MetaSet(text, samples=1)], enc)
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]

    assert split_by_ratio(100, [5, 95]) == [5, 95] and split_by_ratio(10, [1, 1, 1]) == [4, 3, 3]
    mixed = load_meta_sets([MetaSet(text), MetaSet(chat)], enc, counts=split_by_ratio(3, [2, 1]))
    assert [e.source.split(":")[0] for e in mixed] == [text, text, chat]


def test_bad_data_and_configs_get_clear_errors(pair, tmp_path):
    enc = RowEncoder(TOK)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SoupError, match="empty.jsonl is empty"):
        load_meta_sets([MetaSet(empty)], enc)
    with pytest.raises(SoupError, match="not found"):
        load_meta_sets([MetaSet(tmp_path / "nope.jsonl")], enc)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(SoupError, match=r"bad.jsonl:2: not valid JSON"):
        load_meta_sets([MetaSet(bad, samples=None)], enc)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "ok"}, {"prompt": "?"}])
    with pytest.raises(SoupError, match=r"odd.jsonl:2: cannot tell the row's format"):
        load_meta_sets([MetaSet(odd, samples=None)], enc)
    with pytest.raises(SoupError, match="has 2 rows, fewer than the 50"):
        load_meta_sets([MetaSet(odd)], enc)
    no_answer = write_jsonl(tmp_path / "na.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(SoupError, match="na.jsonl:1: no assistant message"):
        load_meta_sets([MetaSet(no_answer)], RowEncoder(TOK), counts=[1])

    image = write_jsonl(tmp_path / "img.jsonl", [{"image": "x.png", "messages": [
        {"role": "user", "content": "<image> what?"}, {"role": "assistant", "content": "red"}]}])
    with pytest.raises(SoupError, match=r"img.jsonl:1: row has an image, but no model in `models` is multimodal"):
        learn(base_config(pair, tmp_path, meta_sets=[{"path": image, "samples": 1}]), progress=False)
    with pytest.raises(SoupError, match="empty.jsonl is empty"):
        learn(base_config(pair, tmp_path, meta_sets=[{"path": str(empty)}]), progress=False)
    with pytest.raises(SoupError, match=r"fixed: unit 'layers.7.q' is not in the model \(2 layers"):
        learn(base_config(pair, tmp_path, fixed={"layers.7.q": [1, 0]}), progress=False)
    with pytest.raises(SoupError, match="unknown mapping 'qq'"):
        learn(base_config(pair, tmp_path, fixed={"layers.0.qq": [1, 0]}), progress=False)
    with pytest.raises(SoupError, match="activation: 'sigmoid' mixes exactly 2 models.*use softmax"):
        load_config(base_config(pair, tmp_path, models=[pair["A"], pair["B"], pair["A"]], activation="sigmoid"))
    with pytest.raises(SoupError, match=r"optimizer.lr: Input should be greater than 0"):
        load_config(base_config(pair, tmp_path, optimizer={"lr": 0}))
    with pytest.raises(SoupError, match=r"optimzer: unknown key \(did you mean 'optimizer'\?\)"):
        load_config(base_config(pair, tmp_path, optimzer={}))
    with pytest.raises(SoupError, match=r"meta_sets\[0\].samples: must be at least 1"):
        load_config(base_config(pair, tmp_path, meta_sets=[{"path": "x", "samples": 0}]))


def test_fixed_units_are_not_learned(pair, tmp_path):
    res = learn(base_config(pair, tmp_path, fixed={"embed": [1.0, 0.0], "layers.1.down": [0.25, 0.75]},
                            training={"epochs": 1, "batch_size": 8, "evaluate": False}), progress=False)
    assert res.table.coefficients["embed"] == [1.0, 0.0]
    assert res.table.coefficients["layers.1.down"] == [0.25, 0.75]
    assert res.table.coefficients["layers.1.up"] != [0.5, 0.5]


# ------------------------------------------------------------------------------------------------
# a LLaVA-style model: image rows, frozen vision tower, a vocabulary one row larger


# A text-only template that concatenates strings, as SmolLM2's and Vicuna's do: list content breaks it.
STRING_ONLY_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.mark.parametrize("template_on", ["processor", "tokenizer_only"])
def test_llava_image_rows_soup_only_the_language_model(pair, tmp_path, template_on):
    import copy

    from PIL import Image
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(7)
    text_cfg = tiny_config(vocab_size=65)  # one more row than A, as llava-hf checkpoints have
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=text_cfg, image_token_index=4, vision_feature_layer=-1))
    llava_dir = tmp_path / "llava"
    llava.save_pretrained(llava_dir)
    tok = TOK
    if template_on == "tokenizer_only":
        tok = copy.deepcopy(TOK)
        tok.chat_template = STRING_ONLY_TEMPLATE
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                   tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   chat_template=CHAT_TEMPLATE if template_on == "processor" else None,
                   num_additional_image_tokens=1).save_pretrained(llava_dir)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "red.png")
    rows = [{"image": "red.png", "messages": [{"role": "user", "content": "<image>\ncolour?"},
                                              {"role": "assistant", "content": "red"}]}] * 3
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]})
    data = write_jsonl(tmp_path / "img.jsonl", rows)

    cfg = base_config(pair, tmp_path, models=[pair["A"], str(llava_dir)], meta_sets=[{"path": data, "samples": 4}],
                      training={"epochs": 1, "batch_size": 2}, merge=True)
    with pytest.raises(SoupError, match="vocab_policy: extend"):
        learn(cfg, progress=False)
    res = learn({**cfg, "vocab_policy": "extend"}, progress=False, force=True)
    assert res.table.meta["output_model"] == str(llava_dir)
    assert not any("vision" in k or "projector" in k for k in res.table.coefficients)

    out = LlavaForConditionalGeneration.from_pretrained(res.merged_dir)
    src = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    for (n, p), q in zip(out.model.vision_tower.named_parameters(), src.model.vision_tower.parameters()):
        assert torch.equal(p, q), n  # not souped: LLaVA's own
    w = res.table.coefficients["embed"]
    emb_a = pair["A_sd"]["model.embed_tokens.weight"]
    emb_l = src.model.language_model.embed_tokens.weight.detach()
    expect = torch.cat([w[0] * emb_a + w[1] * emb_l[:64], emb_l[64:]])
    assert torch.allclose(out.model.language_model.embed_tokens.weight, expect, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# command line and plots


def test_cli_learn_then_plot(pair, tmp_path):
    import yaml

    from souplm.cli import main

    (tmp_path / "cfg").mkdir()
    cfg = {"models": [pair["A"], pair["B"]], "meta_sets": [{"path": pair["dev"], "samples": 8}],
           "training": {"epochs": 1, "batch_size": 8}, "output": "run", "granularity": "row"}
    (tmp_path / "cfg" / "soup.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["learn", str(tmp_path / "cfg" / "soup.yaml"), "--no-merge", "--quiet"]) == 0
    table = tmp_path / "cfg" / "run" / "coefficients.json"  # relative to the config file
    assert CoefficientTable.load(table).meta["settings"]["granularity"] == "row"
    assert main(["learn", str(tmp_path / "cfg" / "soup.yaml"), "--quiet"]) == 2  # earlier run: refused

    other = CoefficientTable(["A", "B"], {f"layers.{i}.{m}": [0.3, 0.7] for i in range(2) for m in ("q", "k")})
    other.save(tmp_path / "other.json")
    assert main(["plot", "alphas", str(table), str(tmp_path / "other.json"), "-o", str(tmp_path / "fig")]) == 0
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    assert {"alphas_q.png", "alphas_q.svg", "heatmap.png", "heatmap.svg", "alphas_global.png"} <= names
    assert (tmp_path / "fig" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

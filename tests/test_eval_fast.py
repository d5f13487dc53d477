"""The fast scoring paths (output head on the scored positions only; shared contexts read once from the KV cache)
give the log-likelihoods of a plain full forward pass of each whole sequence, computed here independently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_eval import make_llava_dir, make_model_dir

from souplm.evaluate.lm import HFModel, load_model

REQUESTS = [
    ("to be or not to be", " that is the question"),
    ("to be or not to be", " whether tis nobler"),
    ("to be or not to be", " the slings and arrows of outrageous fortune"),
    ("to be or not to be", " x"),
    ("and by opposing", " end them"),  # a context of its own: the plain path
    ("and by opposing end them to die", " to sleep no more"),
]


def _reference(model: torch.nn.Module, lm: HFModel, ctx: str, cont: str) -> tuple[float, int]:
    """-sum log p(continuation | context) from one unpadded forward pass over the whole sequence."""
    c = lm.encode(ctx)
    whole = lm.encode(ctx + cont)
    k = whole[len(c):] if whole[: len(c)] == c and len(whole) > len(c) else lm.encode(cont)
    toks = c + k
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([toks])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    total = sum(float(lp[len(c) - 1 + j, t]) for j, t in enumerate(k))
    return -total, len(k)


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_fast_conditional_nll_matches_a_full_forward(kind: str, tmp_path: Path) -> None:
    path = make_model_dir(tmp_path / "m", seed=1) if kind == "llama" else make_llava_dir(tmp_path / "m", seed=1)
    model, tok, proc = load_model(path, device="cpu")
    fast = HFModel(model, tok, proc, batch_size=3, progress=False)
    plain = HFModel(model, tok, proc, batch_size=3, progress=False, fast=False)
    assert fast._keep_ok and fast._prefix_ok  # both shortcuts are taken for these architectures
    got_fast = fast.conditional_nll(REQUESTS)
    got_plain = plain.conditional_nll(REQUESTS)
    for (nll_f, n_f), (nll_p, n_p), (ctx, cont) in zip(got_fast, got_plain, REQUESTS, strict=True):
        want, n = _reference(model, fast, ctx, cont)
        assert n_f == n_p == n
        assert nll_f == pytest.approx(want, abs=1e-4, rel=1e-5)
        assert nll_p == pytest.approx(want, abs=1e-4, rel=1e-5)
    # the shared context ran once for its four continuations: fewer forward calls than the plain path's batches
    assert fast.calls < plain.calls + 2
    # and the shared path was taken: its context, then its 4 continuations together, then 1 batch for the other 2
    # (without the KV-cache path it would be the plain path's 2 batches)
    assert fast.calls == 3


def test_fast_rolling_nll_matches_the_plain_path(tmp_path: Path) -> None:
    model, tok, proc = load_model(make_model_dir(tmp_path / "m", seed=2), device="cpu")
    texts = ["to be or not to be that is the question " * 3, "whether tis nobler in the mind", "a"]
    fast = HFModel(model, tok, proc, batch_size=2, progress=False).rolling_nll(texts, 16)
    plain = HFModel(model, tok, proc, batch_size=2, progress=False, fast=False).rolling_nll(texts, 16)
    for (a, n), (b, m) in zip(fast, plain, strict=True):
        assert n == m and a == pytest.approx(b, abs=1e-4, rel=1e-5)


def test_fast_generation_keeps_the_order_and_the_answers(tmp_path: Path) -> None:
    model, tok, proc = load_model(make_model_dir(tmp_path / "m", seed=3), device="cpu")
    prompts = ["to be", "or not to be that is", "the", "whether tis nobler in the mind to", "a sea", "and by"] * 2
    fast = HFModel(model, tok, proc, batch_size=2, progress=False)
    plain = HFModel(model, tok, proc, batch_size=2, progress=False, fast=False)
    got = fast.generate(prompts, 5, [])
    want = []
    for p in prompts:  # one prompt at a time, unpadded: the independent answer
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                 do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        want.append(tok.decode(new, skip_special_tokens=True))
    assert got == want == plain.generate(prompts, 5, [])
    assert fast.calls == 2 and plain.calls == 6  # 12 prompts: batches of 8 (4 x 2) against batches of 2


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_fast_conditional_nll_in_bf16_is_within_bf16_rounding_of_a_float64_forward(kind: str, tmp_path: Path) -> None:
    """Users score in bf16: the fast paths (sliced output head, KV cache repeated for a shared context) must stay as
    close to the exact log-likelihood as the plain bf16 path does. The reference is the same bf16 weights run in
    float64 on each whole, unpadded sequence."""
    path = make_model_dir(tmp_path / "m", seed=4) if kind == "llama" else make_llava_dir(tmp_path / "m", seed=4)
    model, tok, proc = load_model(path, device="cpu", dtype="bfloat16")
    fast = HFModel(model, tok, proc, batch_size=3, progress=False)
    plain = HFModel(model, tok, proc, batch_size=3, progress=False, fast=False)
    assert fast._keep_ok and fast._prefix_ok
    got_fast = fast.conditional_nll(REQUESTS)
    got_plain = plain.conditional_nll(REQUESTS)
    exact = load_model(path, device="cpu", dtype="bfloat16")[0].double()
    for (nll_f, n_f), (nll_p, n_p), (ctx, cont) in zip(got_fast, got_plain, REQUESTS, strict=True):
        want, n = _reference(exact, fast, ctx, cont)
        assert n_f == n_p == n
        # bf16 keeps 8 significant bits (relative step 2**-8 ~ 0.004): 0.01 nats a token is a few of its steps on
        # these logits (measured: under 0.001 a token), far below a position read one off (nats a token)
        assert nll_f == pytest.approx(want, abs=0.01 * n)
        assert nll_p == pytest.approx(want, abs=0.01 * n)

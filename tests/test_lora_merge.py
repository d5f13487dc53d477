"""Adapter-space merges against PEFT's own add_weighted_adapter, compared as effective deltas."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_lora import make_adapter, tiny_llama

from souplm.cli import main
from souplm.errors import SoupError
from souplm.lora.merge import combine, merge_adapters

W = [0.6, -0.5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    base = d / "base"
    tiny_llama().save_pretrained(base)
    make_adapter(base, d / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    make_adapter(base, d / "b", seed=2, r=4, lora_alpha=4, target_modules=["q_proj", "o_proj", "embed_tokens"])
    make_adapter(base, d / "c", seed=3, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    return d


def peft_deltas(base, adapter_dirs, merged_name=None, **kw):
    """{module: delta} of PEFT's add_weighted_adapter result (or of one adapter when merged_name is None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dirs[0], adapter_name="x0")
        for i, a in enumerate(adapter_dirs[1:], 1):
            m.load_adapter(a, adapter_name=f"x{i}")
        name = f"x{0}"
        if merged_name:
            m.add_weighted_adapter([f"x{i}" for i in range(len(adapter_dirs))], W[: len(adapter_dirs)], merged_name, **kw)
            name = merged_name
    from peft.tuners.lora import LoraLayer

    out = {}
    for mod_name, mod in m.named_modules():
        if isinstance(mod, LoraLayer) and (name in mod.lora_A or name in mod.lora_embedding_A):
            out[mod_name.removeprefix("base_model.model.")] = mod.get_delta_weight(name).detach()
    return out


CASES = [
    ("linear", "ab", {}), ("cat", "ac", {}), ("svd", "ac", {"svd_rank": 3}), ("ties", "ab", {"density": 0.5}),
    ("ties", "ab", {"density": 0.6, "majority_sign_method": "frequency"}), ("magnitude_prune", "ab", {"density": 0.5}),
    ("ties_svd", "ac", {"density": 0.5, "svd_rank": 4}), ("magnitude_prune_svd", "ab", {"density": 0.7}),
    ("dare_linear", "ab", {"density": 1.0}), ("dare_ties_svd", "ab", {"density": 1.0, "svd_rank": 2}),
]


@pytest.mark.parametrize(("method", "which", "kw"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft_add_weighted_adapter(setup, tmp_path, method, which, kw):
    dirs = [setup / x for x in which]
    theirs = peft_deltas(setup / "base", dirs, "merged", combination_type=method, **kw)
    report = merge_adapters(dirs, W[: len(dirs)], tmp_path / "out", method, rank=kw.get("svd_rank"),
                            density=kw.get("density", 1.0), majority_sign_method=kw.get("majority_sign_method", "total"))
    ours = peft_deltas(setup / "base", [tmp_path / "out"])  # our adapter, loaded by PEFT itself
    assert set(ours) == set(theirs) and theirs
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4, msg=k)
    if method.endswith("svd"):
        assert set(report.errors) == set(theirs) and all(0 <= e < 1 for e in report.errors.values())


def test_cat_is_exact_and_svd_error_is_the_tail(setup, tmp_path):
    """cat: the merged delta is sum_i w_i s_i B_i A_i exactly; svd: the reported error is the SVD tail's share."""
    da, dc = peft_deltas(setup / "base", [setup / "a"]), peft_deltas(setup / "base", [setup / "c"])
    merge_adapters([setup / "a", setup / "c"], W, tmp_path / "cat", "cat")
    ours = peft_deltas(setup / "base", [tmp_path / "cat"])
    for k in ours:
        torch.testing.assert_close(ours[k], W[0] * da[k] + W[1] * dc[k], atol=1e-5, rtol=1e-4)
    rep = merge_adapters([setup / "a", setup / "c"], W, tmp_path / "svd", "svd", rank=2)
    k = "model.layers.0.self_attn.q_proj"
    s = torch.linalg.svdvals(W[0] * da[k] + W[1] * dc[k])
    assert rep.errors[k] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)


def test_dare_statistics():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, 100) + 3.0  # no zeros
    out = combine("dare_linear", [t], [1.0], density=0.3, gen=g)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(out[kept], t[kept] / 0.3)
    ties = combine("dare_ties", [t, -t * 0.5], [1.0, 1.0], density=1.0)
    torch.testing.assert_close(ties, t)  # the majority sign (total) is t's; the other is dropped


def test_refusals_and_cli(setup, tmp_path, capsys):
    with pytest.raises(SoupError, match="one rank"):
        merge_adapters([setup / "a", setup / "c"], W, tmp_path / "o", "linear")
    assert not (tmp_path / "o").exists()
    rc = main(["merge-adapters", "--adapter", str(setup / "a"), "--adapter", str(setup / "b"), "--weight", "0.6",
               "--weight", "-0.5", "--method", "svd", "--rank", "3", "-o", str(tmp_path / "cli")])
    assert rc == 0 and "SVD relative error" in capsys.readouterr().out
    assert (tmp_path / "cli" / "adapter_config.json").is_file()
    rc = main(["merge-adapters", "--adapter", str(setup / "a"), "--method", "nope", "-o", str(tmp_path / "x")])
    assert rc == 2 and "souplm: error:" in capsys.readouterr().err

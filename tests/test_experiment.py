"""The experiment runner on a tiny random stand-in family: the real pipeline, a few rows and steps.

The stand-in is a 2-layer Llama with a chat template ("Vicuna"), a LLaVA assembled from it by the
family's own `build_llava`, and two noisy copies (the math and Shakespeare variants); the data sources
are replaced by a few hand-written rows. Everything else -- tasks, learning, sweeps, greedy soup,
plots, results.json and RESULTS.md -- runs exactly as in `python -m souplm.experiment.run`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers_eval import make_tokenizer

from souplm.experiment import run as X

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VISION = {"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2}

TINY = replace(
    X.QUICK,
    mode="test",
    test_rows={"easy-vqa": 2, "math": 2, "shakespeare-ppl": 2, "shakespeare-mc": 2, "instruct-ppl": 2},
    dev_rows={"easy-vqa": 2, "math": 2, "shakespeare-ppl": 1, "shakespeare-mc": 2, "instruct-ppl": 1},
    passage_chars=120,
    meta_samples=2,
    meta_pool=3,
    learn_batch=2,
    max_length=96,
    eval_batch=4,
    round3_ratios=(0.25, 0.75),  # fewer soups than QUICK's: the rounds' code paths, not their sizes
    final_seeds=(0, 1),
)

LINES = [
    "to be or not to be that is the question",
    "whether tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune",
    "or to take arms against a sea of troubles",
    "and by opposing end them to die to sleep",
    "no more and by a sleep to say we end",
    "the heartache and the thousand natural shocks",
    "that flesh is heir to tis a consummation",
    "devoutly to be wished to die to sleep",
    "to sleep perchance to dream ay there's the rub",
    "for in that sleep of death what dreams may come",
    "when we have shuffled off this mortal coil",
]


def _fake_sources(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """A few rows per split in place of easy-vqa, Shakespeare, the math generator and the stdlib docs."""
    from PIL import Image

    from souplm.data import sources

    images = []
    for i, colour in enumerate(["red", "blue", "green", "red", "blue", "green"]):
        path = root / f"img{i}.png"
        Image.new("RGB", (16, 16), colour).save(path)
        images.append((path, colour))

    def easy_vqa_rows(split: str, limit: int | None = None, seed: int = 0) -> list[dict]:
        rows = [{"image": str(p), "question": "What color is the shape?", "answer": c, "image_id": f"{split}/{i}"}
                for i, (p, c) in enumerate(images)]
        return rows[:limit] if limit is not None else rows

    def math_problems(split: str, limit: int | None = None) -> list[dict]:
        rows = [{"question": f"What is {a} plus 3?", "answer": str(a + 3), "module": "add"} for a in range(8)]
        return rows[:limit] if limit is not None else rows

    def shakespeare_texts(split: str) -> list[dict]:
        text = "TITLE PAGE\n\n" + "\n".join(LINES * 2) + "\n"
        return [{"title": f"{split} play", "text": text, "id": f"{split}_gut"}]

    def instruction_texts(split: str) -> list[dict]:
        return [{"prompt": f"What does the Python function `f{i}` do?", "response": "Return the question " * 3,
                 "messages": [], "source": "test"} for i in range(6)]

    for name, fn in [("easy_vqa_rows", easy_vqa_rows), ("math_problems", math_problems),
                     ("shakespeare_texts", shakespeare_texts), ("instruction_texts", instruction_texts)]:
        monkeypatch.setattr(sources, name, fn)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Vicuna, LLaVA (assembled by the family code), and two fine-tune-like variants of Vicuna."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from souplm.experiment.multimodal import build_llava
    from souplm.models.cogvlm import from_llava

    root = tmp_path_factory.mktemp("stand_in")
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    vicuna = LlamaForCausalLM(cfg)
    paths = {"smollm2": root / "vicuna"}
    vicuna.save_pretrained(paths["smollm2"])
    tok.save_pretrained(paths["smollm2"])
    for i, name in enumerate(("math", "shakespeare"), 1):
        torch.manual_seed(i)
        variant = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p, q in zip(variant.parameters(), vicuna.parameters(), strict=True):
                p.copy_(q + 0.05 * torch.randn_like(q))
        variant.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    llava, processor = build_llava(vicuna, tok, VISION, seed=3)
    with torch.no_grad():  # LLaVA's language model moves away from Vicuna's, like a stage-2 fine-tune
        for p in llava.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    paths["llava"] = root / "llava"
    llava.save_pretrained(paths["llava"])
    processor.save_pretrained(paths["llava"])
    # The CogVLM-style variant of the AdaMMS step: Vicuna in both experts, the visual one nudged as if trained.
    cog = from_llava(llava, vicuna)
    with torch.no_grad():
        for name, p in cog.named_parameters():
            if "vision_expert" in name or "vision_mlp" in name:
                p.add_(0.05 * torch.randn_like(p))
    paths["cogvlm"] = root / "cogvlm"
    cog.save_pretrained(paths["cogvlm"])
    processor.save_pretrained(paths["cogvlm"])
    return paths


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Tiny models run fastest on one thread (and do not spin against other work on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _numbers(text: str) -> list[str]:
    """Numbers as RESULTS.md prints them, outside code spans, links and words (`SmolLM2`, `4x`)."""
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.findall(r"(?<![\w.\-/+])[-+]?\d+(?:\.\d+)?(?![\w.\-/])", text)


def _json_numbers(obj: object) -> list[float]:
    out: list[float] = []
    if isinstance(obj, bool):
        return out
    if isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, str):
        out += [float(x) for x in re.findall(r"\d+(?:\.\d+)?", obj)]
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_numbers(k) + _json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _json_numbers(v)
    return out


def _traceable(token: str, values: list[float]) -> bool:
    """Some value of the JSON prints as `token` at the token's number of decimals."""
    decimals = len(token.split(".")[1]) if "." in token else 0
    target = float(token)
    tol = 0.5 * 10.0**-decimals + 1e-9
    return any(abs(v - target) <= tol for v in values) or any(abs(-v - target) <= tol for v in values)


def test_pipeline_on_a_tiny_stand_in_family(
    stand_in: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_sources(monkeypatch, tmp_path)
    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "cache"))
    work, out = tmp_path / "work", tmp_path / "docs"
    doc = X.run_experiment(stand_in, work, out, TINY, progress=False)

    md = (out / "RESULTS.md").read_text()
    stored = json.loads((out / "results" / "results.json").read_text())
    assert stored == json.loads(json.dumps(doc))
    assert md == X.render_markdown(stored)  # the document is a function of results.json alone
    for heading in ("## 1. Vanilla soup sweep", "## 2. Learnable soup", "## 3. Regularized soup",
                    "## 4. Greedy and uniform soups", "## 5. Robustness", "## 6. Which of the paper's claims",
                    "## 7. AdaMMS", "## Wall time"):
        assert heading in md
    for claim in ("Vanilla soup beats both base models", "Learnable soup beats vanilla soup",
                  "Alpha patterns are stable under regularization"):
        line = next(ln for ln in md.splitlines() if ln.startswith(f"- {claim}"))
        assert "**holds**" in line or "**does not hold**" in line or "**inconclusive**" in line
    assert "The alpha distribution is" in md

    # Every score has an interval from its test items and every comparison a paired, Holm-corrected test.
    st = stored["statistics"]
    assert st["resamples"] == 2000 and st["correction"] == "holm" and st["n_comparisons"] == len(st["comparisons"])
    for label, tasks in st["intervals"].items():
        for task, (est, lo, hi) in tasks.items():
            assert lo - 1e-9 <= est <= hi + 1e-9, (label, task)
    assert st["intervals"]["vanilla a=1"]["easy-vqa"][0] == stored["vanilla"]["per_task"]["easy-vqa"]["llava"]
    kinds = {c["kind"] for c in st["comparisons"]}
    for kind in ("vanilla soup vs LLaVA", "vanilla soup vs Vicuna", "best learnable vs best vanilla",
                 "mean learnable vs vanilla 0.5", "regularized vs unregularized", "per-mapping vs whole-model",
                 "variant vs runner-up on its speciality"):
        assert kind in kinds, kind
    ps = sorted(c["p"] for c in st["comparisons"])
    assert all(c["p_holm"] >= c["p"] for c in st["comparisons"])
    assert min(c["p_holm"] for c in st["comparisons"]) == pytest.approx(min(1.0, ps[0] * len(ps)), rel=1e-3)
    for c in st["comparisons"]:
        assert c["test"].startswith("mcnemar-exact" if stored_metric(stored, c["task"]) != "bpb"
                                    and "mean" not in c["kind"] and "rounds choice" not in c["kind"]
                                    and c["kind"] != "per-mapping vs whole-model"
                                    else "paired-bootstrap"), c
    assert set(stored["bases"]["models"]) == {"LLaVA", "Vicuna", "Math", "Shakespeare"}
    ss = stored["regularized"]["seed_study"]
    assert ss["seeds"] == list(TINY.reg_seeds) and [r["lambda"] for r in ss["lambdas"]] == list(TINY.lambdas)
    assert ss["baseline"]["pairs"] == len(TINY.reg_seeds) * (len(TINY.reg_seeds) - 1) // 2
    assert ss["verdict"] == stored["claims"]["stable_under_regularization"]["verdict"]

    # The three ablation rounds and the generalization test (issue 16 §7): every grid point scored on the dev
    # tasks, only the choices on the test tasks, the final setting at every seed; their comparisons in the Holm
    # family, their claims with verdicts, their figures written.
    for heading in ("## 8. The paper's three ablation rounds", "### Round 1", "### Round 2", "### Round 3",
                    "## 9. Generalization"):
        assert heading in md, heading
    rd = stored["rounds"]
    r1, r2, r3 = rd["round1"], rd["round2"], rd["round3"]
    assert len(r1["points"]) == len(X.META_SETS) * len(TINY.round_lrs) * len(TINY.round_epochs)
    assert len(r2["points"]) == len(TINY.round2_samples) * len(X.ACTIVATIONS) * len(TINY.round2_lrs) * len(
        TINY.round_epochs)
    assert [p["ratio"] for p in r3["points"]] == list(TINY.round3_ratios)
    assert r2["pair"] == r1["pair"] == r1["order"][:2]
    dev = {f"{n}-dev" for n in X.TASKS}
    for p in r1["points"] + r2["points"] + r3["points"]:
        assert set(p["dev"]) == dev and p["mean_rank"] >= 1.0
    assert [x["seed"] for x in r3["seeds"]] == list(TINY.final_seeds)
    assert len({x["id"] for x in r3["seeds"]}) == len(TINY.final_seeds)  # a soup per seed
    chosen3 = next(p for p in r3["points"] if p["id"] == r3["chosen"])
    assert chosen3["mean_rank"] == min(p["mean_rank"] for p in r3["points"])
    for f in r1["figures"] + r2["figures"] + [r3["figure"]] + rd["paper_alpha_setting"]["figures"]:
        assert (out / f).is_file(), f
    assert r1["budget"]["grid_points"] == len(r1["points"])
    ge = stored["general"]
    assert ge["tasks"] == list(X.GENERAL_TASKS) and set(ge["models"]) == {"LLaVA", "Vicuna", "vanilla 0.5",
                                                                          "rounds final (seed mean)"}
    assert {"rounds choice vs vanilla 0.5", "generalization: rounds choice vs LLaVA"} <= kinds
    for claim in ("rounds_choice_beats_vanilla", "generalizes"):
        assert stored["claims"][claim]["verdict"] in ("holds", "does not hold", "inconclusive")

    # Every number in the document is a number of results.json (at the printed precision).
    values = _json_numbers(stored)
    numbers = _numbers(md)
    assert len(numbers) > 200
    untraced = [t for t in numbers if not _traceable(t, values)]
    assert not untraced, untraced[:10]

    # The study's shape: the sweep's endpoints are the bases, every activation x meta-set config, seeds.
    assert stored["vanilla"]["alphas"] == list(TINY.alphas)
    learn = stored["learnable"]
    assert {(r["meta"], r["activation"]) for r in learn["runs"]} == {
        (c, a) for c in [*X.META_SETS, "+".join(TINY.pair)] for a in X.ACTIVATIONS}
    assert [c["lambda"] for c in stored["regularized"]["comparisons"]] == list(TINY.lambdas)
    assert len(stored["robustness"]["runs"]) == len(TINY.seeds)
    assert len(stored["robustness"]["whole_model_runs"]) == len(TINY.seeds)  # every granularity at every seed
    whole = stored["robustness"]["whole_model"]["alpha_llava"]
    assert whole["min"] == whole["max"]  # one alpha for the whole model
    assert stored["greedy"]["runs"][0]["chosen"]
    assert (out / "results" / "vanilla_sweep.png").is_file()
    for p in stored["regularized"]["figures"]["metasets"] + stored["regularized"]["figures"]["regularized"]:
        assert (out / p).is_file()
    for step, rec in stored["timings"]["steps"].items():
        assert rec["this_run"]["wall_s"] >= 0, step
    ad = stored["adamms"]
    assert len(ad["runs"]) == len(X.ADAMMS_SETTINGS) == ad["agreement"]["adamms"]["settings"]
    for r in ad["runs"]:
        assert r["alphas"] == list(TINY.adamms_alphas) and r["chosen"] in r["alphas"][1:-1]
        assert r["criterion"] == "adamms" and r["chosen"] in r["minima"]
        assert set(r["check"]["scores"]) == {str(a) for a in TINY.adamms_alphas}
        assert set(r["choices"]) == {"adamms", "mean"}
        assert (out / r["figure"]).is_file()
        for a in r["alphas"]:  # every alpha's labelled score has its interval
            assert st["intervals"][r["labels"][f"{a:g}"]][r["task"]][0] == pytest.approx(r["check"]["scores"][str(a)])

    # A rerun resumes from the caches: nothing is learned or evaluated again, and the numbers agree.
    again = X.run_experiment(stand_in, work, out, TINY, progress=False)
    for step, rec in again["timings"]["steps"].items():
        assert rec["this_run"]["evaluations_computed"] == 0, step
        assert rec["this_run"]["soups_learned"] == 0, step
    assert again["claims"] == doc["claims"]
    assert again["learnable"]["summary"] == doc["learnable"]["summary"]


def stored_metric(doc: dict, task: str) -> str:
    return next(t["metric"] for t in doc["tasks"] + doc["general_tasks"] if t["name"] == task)


@pytest.mark.parametrize("module, command", [(m, c) for m, c, _ in X.REQUIRED_PACKAGES])
def test_missing_package_names_the_install_command(
    module: str, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert X.main(["--quick", "--check"]) == 2
    err = capsys.readouterr().err
    assert command in err
    assert X.main(["--quick", "--cache", "/nonexistent/souplm"]) == 2  # before looking for the family
    assert command in capsys.readouterr().err


def test_missing_family_names_the_build_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if X.missing_packages():
        pytest.skip("the experiment's data packages are not installed here")
    assert X.main(["--quick", "--cache", str(tmp_path)]) == 2
    assert f"python -m souplm.experiment.family build --quick --cache {tmp_path}" in capsys.readouterr().err

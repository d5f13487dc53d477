"""Evaluation: metrics on hand-made cases, task files and their errors, the runner and its cache."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import pytest
from helpers_eval import (
    CORPUS,
    make_llava_dir,
    make_model_dir,
    make_tokenizer,
    mc_task,
    text_task,
    write_task,
)

from souplm.errors import SoupError
from souplm.evaluate import metrics as M
from souplm.evaluate.cache import ResultCache, cache_key, soup_key
from souplm.evaluate.runner import evaluate
from souplm.evaluate.tasks import load_task


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # The engine memoises content hashes under $SOUPLM_CACHE: keep tests off the user's home.
    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "souplm-cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny", seed=0)


class StubLM:
    """A model with known answers: picks choice B, says `answer`, and costs exactly 1 bit per byte."""

    def __init__(self, answer: str = "#### 5"):
        self.answer = answer
        self.calls = 0

    def loglikelihood(self, requests):
        self.calls += 1
        return [0.0 if cont.strip() == "B" else -5.0 for _, cont in requests]

    def rolling_nll(self, texts, context_length):
        self.calls += 1
        return [(math.log(2) * len(t.encode()), len(t.split())) for t in texts]

    def generate(self, prompts, max_new_tokens, stop, chat_template=False):
        self.calls += 1
        return [self.answer for _ in prompts]

    def generate_vqa(self, prompts, images, max_new_tokens, stop, chat_template=False):
        self.calls += 1
        return [self.answer for _ in prompts]


# -- metrics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48 clips... #### 72", "72"),
        ("#### 1,234", "1234"),
        ("so she has -5 dollars left", "-5"),
        ("first 3, then 4, finally 1,000,000.", "1000000"),
        ("the total is 3.50", "3.5"),
        ("12 apples #### 7 and then 9", "7"),
        ("5 apples and 6 pears ####", "6"),  # an empty marker falls back to the last number
        ("#### nothing at all", None),
        ("no digits here", None),
        ("x2 and y3", None),  # digits glued to words are variable names, not answers
        ("answer: 10.0", "10"),
        ("lists like 1,2 are two numbers", "2"),
    ],
)
def test_extract_number(text, expected):
    assert M.extract_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("-3/4", "-3/4"), ("189/4.", "189/4"), (" -1,234 / 7", "-1234/7"), ("46.35\nQuestion: 2", "46.35"),
     ("2.50", "2.5"), ("I don't know", None)],
)
def test_extract_math(text, expected):
    assert M.extract_math(text) == expected


def test_numbers_keep_their_sign_and_point(tmp_path):
    rows = [{"question": "q", "answer": "-5"}, {"question": "q", "answer": "3.5"}]
    for extract in ("number", "math"):
        task = write_task(tmp_path, f"sign-{extract}", {"kind": "generation", "extract": extract}, rows)
        res = evaluate(StubLM("5"), [task], progress=False)["results"][f"sign-{extract}"]
        assert res["score"] == 0.0  # "5" is neither "-5" nor "3.5" (text normalisation would say "-5" == "5")
        res = evaluate(StubLM("35"), [task], progress=False)["results"][f"sign-{extract}"]
        assert res["score"] == 0.0


def test_exact_match_normalisation():
    assert M.exact_match("The Circle.", "circle") == 1.0
    assert M.exact_match("  RED  ", "red") == 1.0
    assert M.exact_match("a red circle", "red circle") == 1.0
    assert M.exact_match("blue", "red") == 0.0
    assert M.exact_match(None, "5") == 0.0
    assert M.exact_match("", "") == 0.0  # an empty gold never counts as answered
    assert M.first_line("\n  yes\nbecause ...") == "yes"


def test_perplexity_and_bits_per_byte_known_values():
    assert M.perplexity(math.log(4) * 10, 10) == pytest.approx(4.0)
    assert M.bits_per_byte(math.log(2) * 8, 8) == pytest.approx(1.0)
    assert math.isnan(M.perplexity(1.0, 0))


def test_acc_and_acc_norm_by_hand():
    # Choice 1 has the higher total log-likelihood, choice 0 the higher per-byte one.
    lls, lengths = [-4.0, -3.0], [8, 2]
    assert M.choice_correct(lls, 1) == 1.0
    assert M.choice_correct_norm(lls, lengths, 0) == 1.0
    assert M.argmax([1.0, 3.0, 3.0]) == 1  # ties go to the first


# -- task kinds on a stub model with known answers ----------------------------------------------------
def test_always_b_scores_the_share_of_b_answers(tmp_path):
    golds = ["B", "A", "B", "C", "D", "B", "A", 1, 0, 3]  # letters and indexes: 4 of 10 are B
    rows = [{"query": f"q{i}", "choices": ["A", "B", "C", "D"], "gold": g} for i, g in enumerate(golds)]
    task = write_task(tmp_path, "always-b", {"kind": "multiple_choice"}, rows)
    res = evaluate(StubLM(), [task], progress=False)["results"]["always-b"]
    assert res["metrics"] == {"acc": 0.4, "acc_norm": 0.4}
    assert res["n"] == 10
    res = evaluate(StubLM(), [task], limit=3, progress=False)["results"]["always-b"]
    assert res["metrics"]["acc"] == pytest.approx(2 / 3)


def test_generation_exact_match_share(tmp_path):
    rows = [{"question": "2+3?", "answer": "#### 5"}, {"question": "1+1?", "answer": "2"},
            {"question": "10/2?", "answer": "5.0"}]
    task = write_task(tmp_path, "gen", {"kind": "generation", "stop": "\n"}, rows)
    res = evaluate(StubLM("It is 5."), [task], progress=False)["results"]["gen"]
    assert res["score"] == pytest.approx(2 / 3)
    assert res["samples"][0] == {"output": "It is 5.", "pred": "5", "gold": "5"}


def test_perplexity_aggregates_bytes_and_tokens(tmp_path):
    task = write_task(tmp_path, "ppl", {"kind": "perplexity"}, [{"text": "ab cd"}, {"text": "héllo"}])
    res = evaluate(StubLM(), [task], progress=False)["results"]["ppl"]
    assert res["metrics"]["bpb"] == pytest.approx(1.0)  # the stub pays exactly 1 bit per UTF-8 byte
    assert res["metrics"]["ppl"] == pytest.approx(2 ** (11 / 3))  # 11 bytes ("é" is 2), 3 "tokens"
    assert res["higher_is_better"] is False and res["primary"] == "bpb"


def test_vqa_on_stub(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    rows = [{"image": "red.png", "question": "what colour?", "answer": a} for a in ("Red", "red.", "blue", "red")]
    task = write_task(tmp_path, "vqa", {"kind": "vqa"}, rows)
    assert evaluate(StubLM("red\nand more"), [task], progress=False)["results"]["vqa"]["score"] == 0.75


def test_vqa_on_a_tiny_llava(tmp_path):
    from PIL import Image

    model = make_llava_dir(tmp_path / "llava")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "blue.png")
    rows = [{"image": f"{c}.png", "question": q, "answer": c}
            for c, q in (("red", "what colour?"), ("blue", "what colour is the shape in the image?"), ("red", "?"))]
    task = write_task(tmp_path, "vqa", {"kind": "vqa", "max_new_tokens": 3}, rows)
    res = evaluate(model, [task], batch_size=2, progress=False)["results"]["vqa"]
    assert res["n"] == 3 and res["score"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert len(res["samples"]) == 3 and all(s["gold"] in ("red", "blue") for s in res["samples"])


# -- task files: bad inputs name the culprit ----------------------------------------------------------
def test_missing_task_file_names_it(tmp_path):
    with pytest.raises(SoupError, match="nope.yaml"):
        load_task(tmp_path / "nope.yaml")


def test_unknown_task_name():
    with pytest.raises(SoupError, match="unknown task 'no-such-task'"):
        load_task("no-such-task")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = mc_task(tmp_path)
    data = tmp_path / "mc.jsonl"
    data.write_text(data.read_text() + "{not json\n")
    task = load_task(path)
    with pytest.raises(SoupError, match=r"mc\.jsonl:5: not valid JSON"):
        task.rows()


def test_unknown_kind_names_kind_and_file(tmp_path):
    path = write_task(tmp_path, "odd", {"kind": "essay"}, [{"text": "x"}])
    with pytest.raises(SoupError, match=r"odd\.json: unknown task kind 'essay'"):
        load_task(path)


@pytest.mark.parametrize(
    ("spec", "rows", "match"),
    [
        ({"kind": "perplexity", "max_new_token": 3}, [{"text": "x"}], "unknown key.*max_new_token"),
        ({"kind": "multiple_choice"}, [{"query": "q", "choices": ["a", "b"], "gold": 5}], "out of range"),
        ({"kind": "multiple_choice"}, [{"query": "q", "choices": ["a", "b"]}], "needs field.*gold"),
        ({"kind": "generation", "prompt": "{questoin}"}, [{"question": "q", "answer": "1"}], "questoin"),
        ({"kind": "generation", "extract": "regex"}, [{"question": "q", "answer": "1"}], "extract must be"),
        ({"kind": "multiple_choice", "metric": "f1"}, [{"query": "q", "choices": ["a", "b"], "gold": 0}],
         "metric 'f1'"),
    ],
)
def test_bad_specs_and_rows(tmp_path, spec, rows, match):
    with pytest.raises(SoupError, match=match):
        load_task(write_task(tmp_path, "t", spec, rows)).rows()


def test_missing_data_file(tmp_path):
    (tmp_path / "t.yaml").write_text("kind: perplexity\ndata: missing.jsonl\n")
    with pytest.raises(SoupError, match="missing.jsonl"):
        load_task(tmp_path / "t.yaml")


def test_yaml_task_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"q": "x", "c": ["a", "b"], "g": "a"}\n')
    (tmp_path / "t.yaml").write_text(
        "name: yaml-mc\nkind: multiple_choice\ndata: d.jsonl\nprompt: '{q}:'\nchoices_field: c\ngold_field: g\n"
    )
    task = load_task(tmp_path / "t.yaml")
    assert (task.name, task.kind, task.prompt(task.rows()[0])) == ("yaml-mc", "multiple_choice", "x:")


# -- a real (tiny) transformers model ------------------------------------------------------------------
def test_rolling_nll_matches_transformers_loss(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from souplm.evaluate.lm import HFModel

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = HFModel(model, tok, progress=False)
    text = CORPUS[1]
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    (nll, n), = lm.rolling_nll([text], context_length=256)
    assert n == len(ids) - 1
    assert nll == pytest.approx(loss * n, rel=1e-5)
    # Short windows score every token exactly once too.
    (_nll_w, n_w), = lm.rolling_nll([text], context_length=4)
    assert n_w == n


def test_batching_does_not_change_scores(model_dir, tmp_path):
    tasks = [text_task(tmp_path), mc_task(tmp_path)]
    one = evaluate(model_dir, tasks, batch_size=1, progress=False)["results"]
    many = evaluate(model_dir, tasks, batch_size=8, progress=False)["results"]
    for name in one:
        for k, v in one[name]["metrics"].items():
            assert many[name]["metrics"][k] == pytest.approx(v, rel=1e-5), (name, k)


def test_generation_respects_stop_and_max_tokens(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from souplm.evaluate.lm import HFModel

    lm = HFModel(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                 batch_size=2, progress=False)
    outs = lm.generate(["the quick", "to be or not to be that is"], max_new_tokens=6, stop=[])
    assert len(outs) == 2 and all(outs)
    assert lm.calls == 1  # both prompts in one batch
    first = outs[0]
    stop = first[len(first) // 2]  # a character the unconstrained output contains
    cut = lm.generate(["the quick"], max_new_tokens=6, stop=[stop])[0]
    assert stop not in cut and first.startswith(cut)


def test_cut_at_stop():
    from souplm.evaluate.lm import cut_at_stop

    assert cut_at_stop("42\n\nQuestion: next", ["Question:", "\n\n"]) == "42"
    assert cut_at_stop("no stop here", ["###", ""]) == "no stop here"


def test_cache_hit_skips_model_loading(model_dir, tmp_path, monkeypatch):
    from souplm.evaluate import runner

    tasks = [text_task(tmp_path), mc_task(tmp_path)]
    cache = ResultCache(tmp_path / "cache")
    first = evaluate(model_dir, tasks, cache=cache, progress=False)
    assert not any(r["cached"] for r in first["results"].values())

    def boom(*a, **k):
        raise AssertionError("the model was loaded although every result is cached")

    monkeypatch.setattr(runner, "load_model", boom)
    again = evaluate(model_dir, tasks, cache=cache, progress=False)
    assert all(r["cached"] for r in again["results"].values())
    for name, r in first["results"].items():
        assert again["results"][name]["metrics"] == r["metrics"]
    assert cache.hits == 2
    # A different limit is a different key: work again.
    monkeypatch.undo()
    assert not evaluate(model_dir, tasks[:1], cache=cache, limit=2, progress=False)["results"]["text-ppl"]["cached"]


def test_cache_hit_skips_model_calls(tmp_path):
    task = mc_task(tmp_path)
    stub = StubLM()
    evaluate(stub, [task], cache=tmp_path / "c", model_key="stub-1", progress=False)
    assert stub.calls == 1
    evaluate(stub, [task], cache=tmp_path / "c", model_key="stub-1", progress=False)
    assert stub.calls == 1
    # Editing the data changes the task's fingerprint, so the stale result is not reused.
    data = tmp_path / "mc.jsonl"
    data.write_text(data.read_text().replace('"gold": 1', '"gold": 2'))
    evaluate(stub, [task], cache=tmp_path / "c", model_key="stub-1", progress=False)
    assert stub.calls == 2


def test_cache_ignores_corrupt_entries(tmp_path):
    cache = ResultCache(tmp_path)
    cache.put("m", "t", "1", None, {"score": 1.0})
    path = cache.path(cache_key("m", "t", "1", None))
    path.write_text("{truncated")
    assert cache.get("m", "t", "1", None) is None


def _hammer(args):
    root, worker = args
    cache = ResultCache(root)
    bad = 0
    for i in range(40):
        cache.put("m", "t", "1", None, {"score": worker, "pad": "x" * 20000, "i": i})
        got = cache.get("m", "t", "1", None)
        bad += got is None or len(got["pad"]) != 20000
    return bad


def test_cache_is_safe_under_concurrent_writers(tmp_path):
    with mp.get_context("spawn").Pool(3) as pool:
        assert sum(pool.map(_hammer, [(str(tmp_path), w) for w in range(3)])) == 0
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temp files left behind


def test_soup_key_is_stable_and_distinct():
    a = soup_key(["h1", "h2"], "linear", {"weights": [0.3, 0.7]})
    assert a == soup_key(["h1", "h2"], "linear", {"weights": [0.1 + 0.2, 0.7]})
    assert a != soup_key(["h2", "h1"], "linear", {"weights": [0.3, 0.7]})
    assert a != soup_key(["h1", "h2"], "linear", {"weights": [0.4, 0.6]})


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_eval_writes_json_and_reruns_from_cache(model_dir, tmp_path, capsys):
    from souplm.cli import main

    task = text_task(tmp_path)
    out = tmp_path / "res.json"
    argv = ["eval", str(model_dir), "--task", str(task), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
            "--quiet"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["results"]["text-ppl"]["kind"] == "perplexity"
    assert main(argv) == 0
    assert "(cached)" in capsys.readouterr().out


def test_cli_eval_bad_task_is_one_line_error(model_dir, tmp_path, capsys):
    from souplm.cli import main

    assert main(["eval", str(model_dir), "--task", str(tmp_path / "missing.yaml"), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("souplm: error:") and "missing.yaml" in err and "\n" not in err


def test_lm_eval_backend_missing_names_the_install(monkeypatch):
    import builtins

    from souplm.evaluate.lm_eval_adapter import import_lm_eval

    real = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(SoupError, match=r"pip install lm-eval==0\.4\.13"):
        import_lm_eval()


def test_tokenizer_helper_roundtrip():
    tok = make_tokenizer()
    assert tok.decode(tok("to be or not")["input_ids"]) == "to be or not"


def test_lm_eval_backend_reports_missing_install_before_any_work(model_dir, monkeypatch):
    from importlib import metadata

    from souplm.evaluate.lm_eval_adapter import evaluate_lm_eval

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    with pytest.raises(SoupError, match=r"pip install lm-eval==0\.4\.13"):
        evaluate_lm_eval(model_dir, ["hellaswag"])


LM_EVAL_MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_backend_on_local_jsonl(model_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from souplm.evaluate.lm_eval_adapter import evaluate_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    mc_task(tmp_path)  # writes mc.jsonl with integer and string golds; keep the integer ones
    rows = [json.loads(x) for x in (tmp_path / "mc.jsonl").read_text().splitlines()]
    (tmp_path / "int.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if isinstance(r["gold"], int)))
    (tmp_path / "tiny_mc.yaml").write_text(LM_EVAL_MC_YAML.format(data=tmp_path / "int.jsonl"))
    report = evaluate_lm_eval(model_dir, [str(tmp_path / "tiny_mc.yaml")], cache=tmp_path / "c", batch_size=2)
    res = report["results"]["tiny_mc"]
    assert res["primary"] == "acc" and 0.0 <= res["score"] <= 1.0 and res["n"] == 2
    again = evaluate_lm_eval(model_dir, [str(tmp_path / "tiny_mc.yaml")], cache=tmp_path / "c")
    assert again["results"]["tiny_mc"]["cached"]

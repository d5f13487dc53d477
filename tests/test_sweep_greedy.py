"""Vanilla soup sweeps and greedy soup on tiny random models built here."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers_eval import (
    assert_card_rebuilds,
    make_llava_dir,
    make_model_dir,
    make_tokenizer,
    mc_task,
    text_task,
    write_task,
)

from souplm.errors import SoupError
from souplm.evaluate.runner import evaluate
from souplm.search.greedy import greedy_soup
from souplm.search.sweep import candidates_for_rank, parse_alphas, sweep


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "souplm-cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two unrelated bases for sweeps; three fine-tune-like variants of one base and a broken one."""
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer()
    base = make_model_dir(root / "base", seed=0, tokenizer=tok)
    out = {
        "a": base,
        "b": make_model_dir(root / "b", seed=1, tokenizer=tok),
        "broken": make_model_dir(root / "broken", seed=9, tokenizer=tok, base=base, noise=1.0),
    }
    for i in range(2):
        out[f"good{i}"] = make_model_dir(root / f"good{i}", seed=10 + i, tokenizer=tok, base=base, noise=0.01)
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("tasks")
    return [text_task(folder), mc_task(folder)]


# -- alpha grids ---------------------------------------------------------------------------------------
def test_parse_alphas():
    grid = parse_alphas("0:1:0.1")
    assert len(grid) == 11 and grid[3] == 0.3 and grid[-1] == 1.0
    assert parse_alphas("0.5, 0, 1") == [0.0, 0.5, 1.0]
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    for bad in ("0:1", "a:b:c", "1:0:0.1", "0:1:0", ""):
        with pytest.raises(SoupError, match="--alphas"):
            parse_alphas(bad)


def test_candidates_split_across_ranks_cover_the_grid_once():
    grid = parse_alphas("0:1:0.1")
    parts = [candidates_for_rank(grid, r, 3) for r in range(3)]
    assert sorted(a for p in parts for a in p) == grid


# -- sweep ---------------------------------------------------------------------------------------------
def test_sweep_endpoints_are_the_base_models(models, tasks, tmp_path):
    res = sweep([models["a"], models["b"]], "0:1:0.5", tasks, out_dir=tmp_path / "out", cache=tmp_path / "c",
                progress=False)
    assert res.alphas == [0.0, 0.5, 1.0]
    own_a = evaluate(models["a"], tasks, progress=False)["results"]
    own_b = evaluate(models["b"], tasks, progress=False)["results"]
    for name in own_a:
        for k, v in own_a[name]["metrics"].items():
            assert res.results[1.0][name]["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9)
            assert res.results[0.0][name]["metrics"][k] == pytest.approx(own_b[name]["metrics"][k], rel=1e-6,
                                                                         abs=1e-9)
    # Tables and the Figure 1 plot.
    for f in ("sweep.csv", "sweep.md", "sweep.json", "sweep.png", "sweep.svg"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").read_text().splitlines()))
    assert [r["row"] for r in rows][:3] == ["soup"] * 3
    assert rows[3]["row"].startswith("base A") and rows[4]["row"].startswith("base B")
    assert float(rows[3]["text-ppl"]) == pytest.approx(own_a["text-ppl"]["score"], rel=1e-6)
    assert "**" in (tmp_path / "out" / "sweep.md").read_text()  # best alpha marked


def test_sweep_never_reloads_and_resumes_from_cache(models, tasks, tmp_path, monkeypatch):
    import souplm.evaluate.lm as lm_mod
    from souplm import engine

    loads, soups = [], []
    real_load, real_soup = lm_mod.load_model, engine.soup_into
    monkeypatch.setattr(lm_mod, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(engine, "soup_into", lambda *a, **k: soups.append(a) or real_soup(*a, **k))
    cache = tmp_path / "c"
    # An "interrupted" sweep got as far as two alphas (plus the endpoints it always scores) ...
    first = sweep([models["a"], models["b"]], "0.25,0.5", tasks, cache=cache, progress=False)
    assert len(loads) == 1 and len(soups) == 4  # one model built, four soups written into it
    # ... the full sweep redoes nothing already cached.
    full = sweep([models["a"], models["b"]], "0:1:0.25", tasks, cache=cache, progress=False)
    assert len(loads) == 2 and len(soups) == 5  # only alpha=0.75 was new
    assert full.results[0.5]["text-ppl"]["cached"] and not full.results[0.75]["text-ppl"]["cached"]
    assert full.score(0.5, "mc") == first.score(0.5, "mc")
    # A complete rerun touches no weights at all.
    sweep([models["a"], models["b"]], "0:1:0.25", tasks, cache=cache, progress=False)
    assert len(loads) == 2 and len(soups) == 5


def test_sweep_of_two_llavas_endpoints_and_streaming(tasks, tmp_path):
    from PIL import Image

    a, b = make_llava_dir(tmp_path / "la", seed=0), make_llava_dir(tmp_path / "lb", seed=1)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    vqa = write_task(tmp_path, "vqa", {"kind": "vqa", "max_new_tokens": 2},
                     [{"image": "red.png", "question": "colour?", "answer": "red"}])
    res = sweep([a, b], "0,1", [vqa, tasks[0]], cache=None, progress=False)
    own_b = evaluate(b, [tasks[0]], progress=False)["results"]["text-ppl"]["score"]
    assert res.score(0.0, "text-ppl") == pytest.approx(own_b, rel=1e-6)
    # Re-reading the bases from disk per alpha gives the same soups as holding them in memory.
    streamed = sweep([a, b], "0,1", [tasks[0]], cache=None, progress=False, in_memory=False)
    assert streamed.score(1.0, "text-ppl") == pytest.approx(res.score(1.0, "text-ppl"), rel=1e-6)


def test_sweep_needs_two_models(models, tasks):
    with pytest.raises(SoupError, match="exactly 2 models"):
        sweep([models["a"]], "0:1:0.5", tasks, cache=None, progress=False)


# -- greedy soup ---------------------------------------------------------------------------------------
def test_greedy_soup_leaves_the_broken_ingredient_out(models, tasks, tmp_path):
    ingredients = [models["good0"], models["broken"], models["good1"]]
    res = greedy_soup(ingredients, tasks[0], test_tasks=[tasks[1]], out_dir=tmp_path / "soup",
                      cache=tmp_path / "c", progress=False)
    assert str(models["broken"]) not in res.chosen
    assert res.ranking[-1][0] == str(models["broken"])  # ranked last on held-out perplexity
    broken_step = next(s for s in res.steps if s["ingredient"] == str(models["broken"]))
    assert broken_step["kept"] is False
    # Greedy never ends worse than its best single ingredient on the held-out task (bpb: lower is better).
    assert res.greedy_score <= res.ranking[0][1]
    assert res.uniform_score > res.greedy_score  # the uniform soup includes the noise
    assert set(res.test) == {"best single", "uniform", "greedy"}
    # The written soup is the uniform mean of the chosen, loads, and scores what the search measured.
    written = evaluate(tmp_path / "soup", [tasks[0]], progress=False)["results"]["text-ppl"]["score"]
    assert written == pytest.approx(res.greedy_score, rel=1e-5)
    assert_card_rebuilds(tmp_path / "soup", tmp_path)
    assert "Greedy steps" in (tmp_path / "soup" / "greedy_soup.md").read_text()


def test_greedy_refuses_validation_leakage(models, tasks):
    with pytest.raises(SoupError, match="leakage"):
        greedy_soup([models["good0"], models["good1"]], tasks[0], test_tasks=[tasks[0]], cache=None,
                    progress=False)


def test_greedy_bad_inputs(models, tasks, tmp_path):
    with pytest.raises(SoupError, match="at least 2 models"):
        greedy_soup([models["good0"]], tasks[0], cache=None, progress=False)
    with pytest.raises(SoupError, match="given twice"):
        greedy_soup([models["good0"], models["good0"]], tasks[0], cache=None, progress=False)
    with pytest.raises(SoupError, match="no-model"):
        greedy_soup([models["good0"], tmp_path / "no-model"], tasks[0], cache=None, progress=False)


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_sweep_and_greedy(models, tasks, tmp_path, capsys):
    from souplm.cli import main

    common = ["--cache-dir", str(tmp_path / "c"), "--quiet"]
    assert main(["sweep", "--model", str(models["a"]), "--model", str(models["b"]), "--alphas", "0:1:0.5",
                 "--task", str(tasks[1]), "-o", str(tmp_path / "sw"), *common]) == 0
    assert "best alpha for mc" in capsys.readouterr().out
    assert main(["greedy", "--model", str(models["good0"]), "--model", str(models["broken"]),
                 "--task", str(tasks[0]), "-o", str(tmp_path / "g"), *common]) == 0
    assert "wrote the greedy soup (1 of 2 models)" in capsys.readouterr().out
    assert main(["greedy", "--model", str(models["good0"]), "--model", str(models["good1"]),
                 "--task", str(tasks[0]), "--test-task", str(tasks[0]), *common]) == 2
    assert "leakage" in capsys.readouterr().err

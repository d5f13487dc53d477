"""Evaluation results keep their per-example values (`items`), cached, and the metrics follow from them."""

from __future__ import annotations

import json
import math

from helpers_eval import make_model_dir, mc_task, text_task

from souplm.evaluate.cache import ResultCache
from souplm.evaluate.runner import evaluate


def test_results_keep_per_item_values_that_give_the_headline_metrics(tmp_path) -> None:
    model = make_model_dir(tmp_path / "m")
    tasks = [text_task(tmp_path), mc_task(tmp_path)]
    cache = ResultCache(tmp_path / "cache")
    first = evaluate(model, tasks, cache=cache, progress=False)["results"]
    ppl, mc = first["text-ppl"], first["mc"]
    items = ppl["items"]
    assert len(items["nll"]) == len(items["bytes"]) == ppl["n"] == 5
    assert ppl["metrics"]["bpb"] == sum(items["nll"]) / (math.log(2) * sum(items["bytes"]))
    assert ppl["metrics"]["ppl"] == math.exp(sum(items["nll"]) / sum(items["tokens"]))
    assert mc["items"]["acc"] and set(mc["items"]["acc"]) <= {0.0, 1.0}
    assert mc["metrics"]["acc"] == sum(mc["items"]["acc"]) / 4

    again = evaluate(model, tasks, cache=cache, progress=False)["results"]
    assert all(r["cached"] for r in again.values())
    assert again["mc"]["items"] == mc["items"] and again["text-ppl"]["items"] == items


def test_a_cached_result_without_items_is_scored_again_with_the_same_numbers(tmp_path) -> None:
    model = make_model_dir(tmp_path / "m")
    task = mc_task(tmp_path)
    cache = ResultCache(tmp_path / "cache")
    first = evaluate(model, [task], cache=cache, progress=False)["results"]["mc"]
    (entry,) = (tmp_path / "cache").rglob("*.json")
    old = json.loads(entry.read_text())
    del old["result"]["items"]  # as results were cached before per-example values were kept
    entry.write_text(json.dumps(old))
    again = evaluate(model, [task], cache=cache, progress=False)["results"]["mc"]
    assert not again["cached"] and again["items"] == first["items"] and again["metrics"] == first["metrics"]
    assert "items" in json.loads(entry.read_text())["result"]

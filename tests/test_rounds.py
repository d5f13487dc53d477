"""The ablation rounds' selection rule, ratios, Table 3, the generalization data and the rounds' report sections,
checked against answers worked out by hand (issue 16 §7)."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
from test_learn import base_config, pair  # noqa: F401  (the learner's tiny pair of models)

from souplm.experiment import rounds as R
from souplm.experiment.report import _render_general, _render_rounds
from souplm.experiment.settings import FULL, GENERAL_MODULES
from souplm.experiment.stats import choose, mean_ranks, ranks


def test_ranks_share_ties_and_put_nan_last() -> None:
    # higher is better: 0.7 first, the two 0.5s share ranks 2 and 3, NaN last
    assert ranks([0.5, 0.7, 0.5, math.nan], True) == [2.5, 1.0, 2.5, 4.0]
    # lower is better (bits per byte): the two 1.0s share ranks 1 and 2
    assert ranks([1.0, 2.0, 1.0], False) == [1.5, 3.0, 1.5]
    assert ranks([3.0], True) == [1.0]


def test_mean_ranks_and_choice_by_hand() -> None:
    pts = [{"acc": 0.6, "bpb": 1.2}, {"acc": 0.5, "bpb": 1.0}, {"acc": 0.6, "bpb": 1.1}]
    hib = {"acc": True, "bpb": False}
    # acc ranks: 1.5, 3, 1.5; bpb ranks: 3, 1, 2 -> means 2.25, 2.0, 1.75
    assert mean_ranks(pts, hib) == [2.25, 2.0, 1.75]
    assert choose(pts, hib) == 2
    # a tie in mean rank goes to the first point in grid order
    assert choose([{"acc": 0.6, "bpb": 1.0}, {"acc": 0.7, "bpb": 1.1}], hib) == 0
    assert mean_ranks([], hib) == []


@pytest.mark.parametrize("ratio, total, want", [(0.05, 48, (2, 46)), (0.5, 4, (2, 2)), (0.25, 4, (1, 3)),
                                                (0.05, 4, (1, 3)), (0.95, 4, (3, 1)), (0.75, 48, (36, 12))])
def test_ratio_samples(ratio: float, total: int, want: tuple[int, int]) -> None:
    assert R.ratio_samples(ratio, total) == want


def test_table3_mean_and_best() -> None:
    pts = [{"dev": {"a": 0.2, "b": 1.5}}, {"dev": {"a": 0.4, "b": 1.1}}, {"dev": {"a": 0.3, "b": 1.3}}]
    t3 = R.table3(pts, ["a", "b"], {"a": True, "b": False})
    assert t3["a"] == {"mean": pytest.approx(0.3), "best": 0.4}
    assert t3["b"] == {"mean": pytest.approx(1.3), "best": 1.1}


def test_general_rows_are_unseen_and_labelled_right() -> None:
    from souplm.data.sources import INSTRUCTION_MODULES
    from souplm.experiment.data import general_rows

    assert not set(GENERAL_MODULES) & set(INSTRUCTION_MODULES)
    rows = general_rows(replace(FULL, general_rows={"stdlib-ppl": 20, "stdlib-mc": 20, "compare-mc": 50}))
    assert [len(rows[k]) for k in ("stdlib-ppl", "stdlib-mc", "compare-mc")] == [20, 20, 50]
    for r in rows["compare-mc"]:
        a, b = (float(c) for c in r["choices"])
        assert a != b and r["gold"] == (0 if a > b else 1)
    ppl_names = {r["text"].split("\n")[0] for r in rows["stdlib-ppl"]}
    mc_names = {r["query"].split("`")[1] for r in rows["stdlib-mc"]}
    assert not ppl_names & mc_names  # the two halves never share an entry
    for r in rows["stdlib-mc"]:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["gold"] < 4


def _ctx_with_items() -> SimpleNamespace:
    infos = [{"name": n, "higher_is_better": n != "instruct-ppl"} for n in
             ("easy-vqa", "math", "shakespeare-ppl", "shakespeare-mc", "instruct-ppl")]
    items = {lb: {"math": ([1.0, 0.0] * 6, [1.0] * 12)} for lb in
             ("rounds final (seed mean)", "vanilla a=0.5", "vanilla a=1", "vanilla a=0")}
    return SimpleNamespace(items=items, data=SimpleNamespace(info={"tasks": infos, "general_tasks": []}))


def test_rounds_comparisons_pair_the_seed_mean_with_each_reference() -> None:
    from souplm.experiment.steps import rounds_comparisons

    ctx = _ctx_with_items()
    comps = [c for c in rounds_comparisons(ctx, {"rounds": {"round3": {"label": "rounds final (seed mean)"}}}) if c]
    assert [c["kind"] for c in comps] == ["rounds choice vs vanilla 0.5", "rounds choice vs LLaVA",
                                           "rounds choice vs Vicuna"]
    for c in comps:  # an average over seeds is not 0/1: the paired bootstrap, never McNemar
        assert c["task"] == "math" and c["test"].startswith("paired-bootstrap") and c["advantage"][0] == 0.0
    assert rounds_comparisons(ctx, {}) == []


def _point(pid: str, meta: str, e: int, lr: float, act: str = "softmax", n: int = 2, rank: float = 1.0,
           ratio: float | None = None) -> dict:
    p = {"id": pid, "metas": meta.split("+"), "meta": meta, "activation": act, "seed": 0, "epochs": e, "lr": lr,
         "samples": [n] * len(meta.split("+")), "dev": {"easy-vqa-dev": 0.25, "instruct-ppl-dev": 1.125},
         "mean_rank": rank, "table": "t.json"}
    if ratio is not None:
        p["ratio"] = ratio
    return p


def _fake_doc() -> dict:
    budget = {"grid_points": 4, "learn_runs": 3, "learn_cached": 1, "learn_s": 120.0, "dev_soups": 4,
              "dev_s": 60.0, "test_soups": 1, "test_s": 30.0}
    tasks = [{"name": "easy-vqa", "metric": "exact_match", "higher_is_better": True},
             {"name": "instruct-ppl", "metric": "bpb", "higher_is_better": False}]
    test = {"easy-vqa": 0.5, "instruct-ppl": 1.0625}
    r1pts = [_point(f"p{i}", "vqa", e, lr, rank=1.0 + i) for i, (e, lr) in enumerate([(1, 0.1), (2, 0.1)])]
    r1 = {"points": r1pts, "per_meta": {"vqa": {"table3": {"easy-vqa-dev": {"mean": 0.25, "best": 0.375},
                                                           "instruct-ppl-dev": {"mean": 1.125, "best": 1.0}},
                                                "chosen": "p0", "best_mean_rank": 1.0, "test": test}},
          "order": ["vqa", "instruct"], "pair": ["vqa", "instruct"], "epochs": [1, 2], "lrs": [0.1],
          "samples": 2, "dev_tasks": ["easy-vqa-dev", "instruct-ppl-dev"], "figures": ["results/round1_vqa.png"],
          "budget": budget}
    q = _point("q0", "vqa+instruct", 2, 0.3, act="clamp", rank=3.5)
    r2 = {"pair": ["vqa", "instruct"], "points": [q], "chosen": "q0", "test": test,
          "by_activation": {"clamp": {"easy-vqa-dev": 0.25, "instruct-ppl-dev": 1.125}},
          "by_samples": {"2": {"easy-vqa-dev": 0.25, "instruct-ppl-dev": 1.125}}, "samples": [2], "lrs": [0.3],
          "epochs": [1, 2], "figures": ["results/round2_n2.png"], "budget": budget}
    pts3 = [_point(f"r{i}", "vqa+instruct", 2, 0.3, rank=2.0, ratio=x) for i, x in enumerate([0.25, 0.75])]
    seeds = [{"seed": s, "id": f"r{s}", "test": test} for s in (0, 1)]
    r3 = {"pair": ["vqa", "instruct"], "total_samples": 4, "points": pts3, "chosen": "r0",
          "setting": {"metas": ["vqa", "instruct"], "activation": "clamp", "epochs": 2, "lr": 0.3,
                      "samples": [1, 3], "ratio": 0.25},
          "seeds": seeds, "seed_spread": {n: {"mean": v, "std": 0.0, "min": v, "max": v} for n, v in test.items()},
          "label": "rounds final (seed mean)", "figure": "results/round3_ratio.png", "budget": budget}
    paper = {"epochs": 2, "lr": 0.3, "single_samples": 2, "pair_lr": 0.3, "pair_samples": 2,
             "figures": ["results/alphas_paper_setting/k_proj.png"]}
    general = {"tasks": ["compare-mc"], "models": ["LLaVA", "rounds final (seed mean)"],
               "scores": {"LLaVA": {"compare-mc": 0.5}, "rounds final (seed mean)": {"compare-mc": 0.625}},
               "labels": {"LLaVA": "vanilla a=1", "rounds final (seed mean)": "rounds final (seed mean)"},
               "seed_spread": {"compare-mc": {"std": 0.0625, "min": 0.5625, "max": 0.6875}},
               "budget": {"test_soups": 2, "test_s": 90.0, "vanilla_s": 45.0}}
    return {"tasks": tasks, "dev_tasks": [{"name": "easy-vqa-dev", "rows": 4}, {"name": "instruct-ppl-dev", "rows": 2}],
            "general_tasks": [{"name": "compare-mc", "kind": "multiple_choice", "metric": "acc",
                               "higher_is_better": True, "rows": 6, "description": "which number is larger"}],
            "rounds": {"round1": r1, "round2": r2, "round3": r3, "paper_alpha_setting": paper},
            "general": general,
            "statistics": {"intervals": {"rounds final (seed mean)": {"compare-mc": [0.625, 0.5, 0.75]}}}}


def test_rounds_and_general_sections_render_from_a_small_fake_document() -> None:
    doc = _fake_doc()
    md = "\n".join(_render_rounds(doc))
    assert "## 8. The paper's three ablation rounds" in md
    for figure in ("results/round1_vqa.png", "results/round2_n2.png", "results/round3_ratio.png",
                   "results/alphas_paper_setting/k_proj.png"):
        assert f"({figure})" in md
    assert "| vqa | 0.2500 / 0.3750 | 1.1250 / 1.0000 |" in md  # Table 3: mean / best
    assert "4 grid points; 3 learning runs computed (2.0 min)" in md  # the budget in counts and minutes
    assert "Chosen: vqa+instruct, clamp, 2 epochs, lr 0.3, 2+2 rows (mean dev rank 3.50" in md
    assert "| 0.25 (2+2) [2.00] |" in md
    assert "| between seeds: std [min, max] | 0.0000 [0.5000, 0.5000] | 0.0000 [1.0625, 1.0625] |" in md
    gmd = "\n".join(_render_general(doc))
    assert "## 9. Generalization" in gmd
    assert "| rounds final (seed mean) | 0.6250 [0.5000, 0.7500] |" in gmd  # score with its interval
    assert "| LLaVA | 0.5000 |" in gmd  # no items kept: the bare score
    assert "0.0625 [0.5625, 0.6875]" in gmd


def test_a_trajectory_continued_to_more_epochs_equals_a_fresh_run(pair, tmp_path) -> None:  # noqa: F811
    """The rounds' epoch axis: learn 1 epoch, then resume the same folder with 3 epochs; the alphas are those of a
    fresh 3-epoch run (the learner's checkpoint holds alphas, optimizer state and RNG, epochs excluded from its
    fingerprint)."""
    from souplm.learn import learn

    cfg = base_config(pair, tmp_path, meta_sets=[{"path": pair["dev"], "samples": 16}],
                      training={"epochs": 3, "batch_size": 4, "evaluate": False})
    fresh = learn({**cfg, "output": str(tmp_path / "fresh")}, progress=False)
    traj = {**cfg, "output": str(tmp_path / "traj")}
    one = learn({**traj, "training": {**cfg["training"], "epochs": 1}}, resume=True, progress=False)
    assert one.steps == 4
    three = learn(traj, resume=True, progress=False)
    assert three.resumed_from_epoch == 1 and three.steps == fresh.steps == 12
    for key, value in fresh.table.coefficients.items():
        assert three.table.coefficients[key] == pytest.approx(value, abs=1e-7)

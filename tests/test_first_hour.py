"""Issue 18, a user's first hour: Hub-ready cards, Hub ids, shard sizes in human units, the demo."""

from __future__ import annotations

import yaml

import souplm
from souplm import Recipe


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_card_front_matter_names_inputs_library_and_method(family, tmp_path):
    recipe = Recipe.from_models([str(family["a"]), str(family["b"])], "ties", base_model=str(family["base"]),
                                density=0.5)
    out = souplm.merge(recipe, tmp_path / "soup").out_dir
    meta = _front_matter((out / "README.md").read_text())
    # The Hub reads these keys (https://huggingface.co/docs/hub/model-cards#model-card-metadata).
    assert meta["library_name"] == "souplm"
    assert meta["base_model"] == [str(family["a"]), str(family["b"]), str(family["base"])]
    assert "merge" in meta["tags"] and "ties" in meta["tags"]


def _hub_cache(root, repo: str, model_dir, rev: str = "0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>/<files>}."""
    import shutil

    folder = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(model_dir, folder / "snapshots" / rev)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    return folder / "snapshots" / rev


def test_hub_id_resolves_from_a_prepopulated_cache_offline(family, tmp_path, monkeypatch):
    snap_a = _hub_cache(tmp_path / "hub", "tiny-org/model-a", family["a"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder tiny-org/model-a here
    recipe = Recipe.vanilla("tiny-org/model-a", str(family["b"]), alpha=1.0)
    out = souplm.merge(recipe, tmp_path / "soup", hash_inputs=False).out_dir
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    want = load_file(snap_a / "model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    assert "tiny-org/model-a" in _front_matter((out / "README.md").read_text())["base_model"]


def test_hub_id_missing_from_cache_offline_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from souplm.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code = main(["merge", "--model", "nobody/none-a", "--model", "nobody/none-b", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nobody/none-a" in err[0] and "offline" in err[0]
    assert not (tmp_path / "o").exists()


def test_local_path_wins_over_a_hub_id(family, tmp_path, monkeypatch):
    import shutil

    from souplm.io.hub import hub_id, resolve_model

    shutil.copytree(family["a"], tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/name") is None and resolve_model("org/name").resolve() == (tmp_path / "org" / "name")
    assert hub_id("other/name@v1") == ("other/name", "v1")
    assert hub_id("./x/y") is None and hub_id("a/b/c") is None


def _shard_bytes(out) -> list[int]:
    from safetensors import safe_open

    sizes = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            sizes.append(sum(g.get_tensor(k).numel() * g.get_tensor(k).element_size() for k in g.keys()))  # noqa: SIM118 (safe_open is not iterable)
    return sizes


def test_shard_size_in_human_units_cli_and_recipe(family, tmp_path):
    from souplm.cli import main
    from souplm.io.sizes import parse_size

    # decimal SI units, binary IEC units, mergekit's K/M/B (thousand, million, billion), plain bytes
    assert [parse_size(x) for x in ("5GB", "2GiB", "5B", "1.5MB", "300K", "123")] == [
        5 * 10**9, 2 * 2**30, 5 * 10**9, 1_500_000, 300_000, 123]
    assert Recipe.vanilla(str(family["a"]), str(family["b"]), 0.5).shard_size == 5 * 10**9  # mergekit's default
    code = main(["merge", "--model", str(family["a"]), "--model", str(family["b"]), "--alpha", "0.5",
                 "--shard-size", "40KB", "-o", str(tmp_path / "cli"), "--quiet", "--no-hash"])
    sizes = _shard_bytes(tmp_path / "cli")
    assert code == 0 and len(sizes) > 1 and max(sizes) <= 40_000 < sum(sizes)
    (tmp_path / "r.yaml").write_text(f"models: [{{model: {family['a']}}}, {{model: {family['b']}}}]\n"
                                     "shard_size: 30KiB\n")
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "rec"), "--quiet", "--no-hash"]) == 0
    sizes = _shard_bytes(tmp_path / "rec")
    assert len(sizes) > 1 and max(sizes) <= 30 * 1024


def test_bad_shard_size_is_one_line_error(family, tmp_path, capsys):
    from souplm.cli import main

    code = main(["merge", "--model", str(family["a"]), "--model", str(family["b"]), "--shard-size", "5 parsecs",
                 "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--shard-size" in err[0] and "not a size" in err[0]
    assert not (tmp_path / "o").exists()


def test_demo_shows_a_soup_with_both_skills(tmp_path, capsys, monkeypatch):
    """The toy demo: each specialist fails the other's skill; TIES of the two does both (issue 18 §1)."""
    from souplm.cli import main

    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        pct = [p for p in parts if p.endswith("%")]
        if len(pct) == 2:
            label = line[:18].strip()
            rows[label] = tuple(int(p[:-1]) / 100 for p in pct)
    want = {"base", "specialist A", "specialist B", "learnable soup", "task arithmetic", "TIES"}
    assert want <= rows.keys() and any(k.startswith("vanilla a=") for k in rows)
    a, b, ties = rows["specialist A"], rows["specialist B"], rows["TIES"]
    assert a[0] >= 0.9 and a[1] <= 0.1 and b[1] >= 0.9 and b[0] <= 0.1  # each specialist fails one skill
    assert ties[1] > a[1] + 0.5 and ties[0] > b[0] + 0.5  # the soup beats each on its weaker skill
    assert min(ties) >= 0.8
    assert "7101>" in out and "0212." in out  # decoded answers, not token ids
    card = (tmp_path / "demo" / "ties" / "README.md").read_text()
    assert "ties" in _front_matter(card)["tags"]


def test_demo_never_rewrites_a_folder_it_did_not_make(tmp_path, capsys):
    from souplm.cli import main

    keep = tmp_path / "mine"
    (keep / "models").mkdir(parents=True)
    (keep / "models" / "precious.txt").write_text("user data")
    assert main(["demo", "--quick", "-o", str(keep)]) == 2
    assert "was not made by souplm demo" in capsys.readouterr().err
    assert (keep / "models" / "precious.txt").read_text() == "user data"
    assert sorted(p.name for p in keep.rglob("*")) == ["models", "precious.txt"]


def test_demo_help_describes_it(capsys):
    import pytest

    from souplm.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "specialist" in capsys.readouterr().out


def test_search_alphas_renamed_source_weights_with_a_clear_error(tmp_path, capsys):
    from souplm.cli import main

    code = main(["search", "--target", "t", "--source", "s", "--alphas", "0:1:0.5", "--inputs", "u.jsonl",
                 "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--source-weights" in err[0]
    assert not (tmp_path / "o").exists()


def test_learn_show_config_lists_every_key_and_loads(tmp_path, capsys):
    from souplm.cli import main
    from souplm.learn.config import LearnConfig, MetaSetConfig

    assert main(["learn", "--show-config"]) == 0
    text = capsys.readouterr().out
    for model in (LearnConfig, MetaSetConfig):
        for name, field in model.model_fields.items():
            assert f"{field.alias or name}:" in text, name
    data = yaml.safe_load(text)
    cfg = LearnConfig.model_validate(data)  # the printed file is a valid config, with the defaults
    assert cfg.model_dump(exclude={"models", "meta_sets"}) == LearnConfig(
        models=data["models"], meta_sets=data["meta_sets"]).model_dump(exclude={"models", "meta_sets"})


def test_plot_alphas_model_help_names_the_index(capsys):
    import pytest

    from souplm.cli import main

    with pytest.raises(SystemExit):
        main(["plot", "alphas", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "model 1" not in out and "index from 0" in out


class _FakeLM:
    """Log-likelihoods fixed per continuation text, so each metric is checked against its formula."""

    def __init__(self, lls: dict[str, float], nll: float = 6.0):
        self.lls, self.nll, self.requests = lls, nll, []

    def loglikelihood(self, requests):
        self.requests += list(requests)
        return [self.lls[cont.strip()] for _, cont in requests]

    def rolling_nll(self, texts, context_length):
        return [(self.nll, 4) for _ in texts]


def test_native_metrics_match_lm_evals_definitions_on_the_same_rows(tmp_path):
    import math

    from helpers_eval import write_task

    from souplm.evaluate.runner import aggregate, score_rows
    from souplm.evaluate.tasks import load_task

    rows = [{"query": "Q:\n", "choices": ["ab", "abcdefgh"], "gold": 1}]
    lls = {"ab": -3.0, "abcdefgh": -10.0}
    for compat, want_norm, want_request in [(True, 1.0, ("Q:", "\n ab")), (False, 0.0, ("Q:\n", " ab"))]:
        spec = {"kind": "multiple_choice", "prompt": "{query}", "lm_eval_compat": compat}
        task = load_task(write_task(tmp_path / str(compat), "mc", spec, rows))
        lm = _FakeLM(lls)
        m = aggregate(task, score_rows(lm, task, task.rows(None)))
        # lm-eval: trailing whitespace of the context moves into the continuation; acc_norm = argmax(ll / len(choice))
        # with len in characters of the choice itself: -3/2 < -10/8, so choice 1. souplm's default divides by
        # the bytes of " " + choice: -3/3 > -10/9, so choice 0. acc (raw ll) picks choice 0 either way.
        assert lm.requests[0] == want_request
        assert m["acc"] == 0.0 and m["acc_norm"] == want_norm

    texts = ["a b  c", " lead"]  # lm-eval's word count: re.split(r"\s+") pieces, 3 and 2 (a leading '' counts)
    task = load_task(write_task(tmp_path / "ppl", "ppl", {"kind": "perplexity"}, [{"text": t} for t in texts]))
    m = aggregate(task, score_rows(_FakeLM({}, nll=6.0), task, task.rows(None)))
    total, words, nbytes = 12.0, 5, 11
    assert math.isclose(m["word_perplexity"], math.exp(total / words))
    assert math.isclose(m["byte_perplexity"], math.exp(total / nbytes))
    assert math.isclose(m["bpb"], total / nbytes / math.log(2))
    assert math.isclose(m["ppl"], math.exp(total / 8))


def test_lm_eval_headline_is_the_tasks_first_listed_metric():
    from souplm.evaluate.lm_eval_adapter import headline

    metrics = {"word_perplexity": 30.0, "byte_perplexity": 1.9, "bits_per_byte": 0.93}
    config = {"metric_list": [{"metric": "bits_per_byte"}, {"metric": "word_perplexity"}]}
    assert headline(metrics, config) == "bits_per_byte"
    assert headline(metrics, None) == "word_perplexity"  # no list: lm-eval's first reported metric


def test_continuing_a_checkpoint_this_process_wrote_is_not_announced_as_a_resume(tmp_path, capsys):
    """The LLaVA stage trains stage 1, then stages 1+2: a fresh build must not log 'resuming' (issue 18 §5)."""
    import torch
    from conftest import llama_config
    from transformers import LlamaForCausalLM

    from souplm.experiment import train as T

    model = LlamaForCausalLM(llama_config())
    ids = torch.randint(0, 64, (2, 8))

    def phase(name):
        return T.Phase(name, 2, lambda m: [{"params": list(m.parameters()), "lr": 1e-3}],
                       lambda step: {"input_ids": ids, "labels": ids})

    T.train_phases(model, [phase("stage1")], tmp_path, "toy")
    T.train_phases(model, [phase("stage1"), phase("stage2")], tmp_path, "toy")
    assert "resuming" not in capsys.readouterr().err
    T._WRITTEN_HERE.clear()  # as a new process would see the checkpoint: a real resume, announced
    T.train_phases(model, [phase("stage1"), phase("stage2")], tmp_path, "toy")
    assert "resuming at phase stage2" in capsys.readouterr().err


def test_sweep_plot_flat_panel_has_plain_axis_and_role_legends(tmp_path, monkeypatch):
    """A flat panel (scores equal up to 1e-17) gets no offset and a readable band; legends say the roles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from souplm.plots import sweep as S

    class Result:
        def __init__(self):
            self.models = ["/cache/family/llava-3f9a1c", "/cache/family/smollm2-8e21b0"]
            self.alphas = [0.0, 0.5, 1.0]
            self.tasks = [{"name": "flat", "primary": "bpb", "higher_is_better": False},
                          {"name": "zero", "primary": "acc", "higher_is_better": True}]

        def score(self, a, task):  # equal up to rounding, as sums of equal records come out
            return 1.806 + a * 1e-13 if task == "flat" else a * 1e-17

        def base_score(self, k, task):
            return 1.806 if task == "flat" else 0.0

        def best_alpha(self, task):
            return 0.5

    seen = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig) and real_close(fig))
    S.plot_sweep(Result(), tmp_path / "sweep", labels=("LLaVA", "Vicuna"))
    seen["fig"].canvas.draw()
    for ax in seen["fig"].axes[:2]:  # matplotlib alone: "1e-12+1.806" and "1e-17" offsets on these panels
        lo, hi = ax.get_ylim()
        assert ax.yaxis.get_major_formatter().get_offset() == "" and hi - lo > 1e-3
    ax = seen["fig"].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "A: LLaVA" in legend and "B: Vicuna" in legend and not any("3f9a1c" in t for t in legend)


def test_souplm_cache_is_one_root_for_family_data_eval_and_tasks(tmp_path, monkeypatch):
    from souplm.data import sources
    from souplm.evaluate.cache import default_cache_root
    from souplm.experiment.family import cache_root, family_dir

    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(sources, "_DATA_DIR", None)
    root = (tmp_path / "c").resolve()
    assert default_cache_root().resolve() == root  # eval/ and tasks/ live under it
    assert cache_root() == root / "family" and family_dir(quick=True) == root / "family" / "quick"
    assert sources.data_cache_dir().resolve() == root / "family" / "data"
    assert cache_root(tmp_path / "fam") == (tmp_path / "fam").resolve()  # --cache DIR is the family folder
    sources.use_data_dir(tmp_path / "fam" / "data")  # as the build does for --cache DIR
    assert sources.data_cache_dir() == tmp_path / "fam" / "data"


def test_commands_with_their_own_bar_switch_off_transformers_bars_only(tmp_path, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from souplm.cli import main

    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "c"))
    hf_logging.enable_progress_bar()
    try:
        assert main(["eval", str(tmp_path / "missing"), "--task", "x"]) == 2  # any eval run, even a failing one
        assert not hf_logging.is_progress_bar_enabled()  # one progress display: souplm's
        assert not are_progress_bars_disabled()  # downloads still show theirs
    finally:
        hf_logging.enable_progress_bar()


def test_learn_shows_progress_during_start_up_and_dev_loss(tmp_path, capsys):
    from souplm import demo as toy
    from souplm.learn import learn

    paths = []
    for seed in (0, 1):
        m = toy.new_model(seed)
        m.save_pretrained(tmp_path / f"m{seed}")
        toy.save_tokenizer(tmp_path / f"m{seed}")
        paths.append(str(tmp_path / f"m{seed}"))
    dev = toy.write_dev_set(tmp_path / "dev.jsonl", 4)
    learn({"models": paths, "meta_sets": [{"path": str(dev), "format": "text", "samples": "all"}],
           "training": {"epochs": 1, "batch_size": 4}, "output": str(tmp_path / "out"), "merge": False},
          progress=True)
    err = capsys.readouterr().err
    for what in ("souplm learn: opening 2 models", "souplm learn: reading and tokenizing",
                 "souplm learn: loading", "dev loss"):
        assert what in err, what

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

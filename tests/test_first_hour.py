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

"""The fused executor sees its inputs in place in the mapped files (io/safetensors_file.py `mapped_bytes`):
the same bytes out as reading them into buffers, and the mapped pages leave the resident set when given back."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import souplm
from souplm.engine import execute_fused as fused
from souplm.engine.recipe import Recipe
from souplm.io.safetensors_file import SafetensorsFile

pytestmark = pytest.mark.skipif(fused._kernels is None, reason="souplm._kernels is not built")


def resident_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_unmapped_pages_leave_the_resident_set(tmp_path):
    big = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB
    save_file({"w": big, "v": torch.ones(3)}, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    before = resident_kib()
    view = f.mapped_bytes("w")
    assert not view.flags.writeable
    assert np.array_equal(view.view(np.float32)[:5], [0, 1, 2, 3, 4])
    total = float(view.view(np.float32).sum(dtype=np.float64))  # touches every page
    assert total == float(big.double().sum())
    touched = resident_kib()
    assert touched - before > 48 << 10  # the mapped pages count while touched
    f.unmap_bytes("w")
    assert resident_kib() - before < 8 << 10  # and leave again
    assert view.view(np.float32)[-1] == (16 << 20) - 1  # the view still reads (pages mapped back)
    del view
    f.close()


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.5}), ("nearswap", {"t": 0.01}),
                                                ("linear", {})])
def test_mapped_and_read_inputs_give_the_same_bytes(family, tmp_path, monkeypatch, method, params):
    names = ("a",) if method == "nearswap" else ("a", "b")
    data = {"merge_method": method, "models": [{"model": str(family[m]), "parameters": {"weight": 0.6}}
                                               for m in names], "parameters": params, "dtype": "bfloat16"}
    if method != "linear":
        data["base_model"] = str(family["base"])
    recipe = Recipe.load(data)
    outs = {}
    for mapped in (True, False):
        monkeypatch.setattr(fused, "MAP_INPUTS", mapped)
        report = souplm.merge(recipe, tmp_path / f"out-{mapped}", progress=False, hash_inputs=False)
        assert report.executor == "fused"
        outs[mapped] = {k: v for f in sorted((tmp_path / f"out-{mapped}").glob("*.safetensors"))
                        for k, v in load_file(f).items()}
    assert outs[True].keys() == outs[False].keys()
    for k, t in outs[True].items():
        assert torch.equal(t.view(torch.uint8), outs[False][k].view(torch.uint8)), k


def test_a_nan_in_a_mapped_input_is_named(family, tmp_path, monkeypatch):
    monkeypatch.setattr(fused, "MAP_INPUTS", True)
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = {k: v for f in sorted(family["b"].glob("*.safetensors")) for k, v in load_file(f).items()}
    name = next(k for k in sd if "q_proj" in k)
    sd[name] = sd[name].clone()
    sd[name].view(-1)[3] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((family["b"] / "config.json").read_text())
    recipe = Recipe.load({"merge_method": "linear", "models": [{"model": str(family["a"])}, {"model": str(bad)}]})
    with pytest.raises(souplm.SoupError, match=name):
        souplm.merge(recipe, tmp_path / "out", progress=False, hash_inputs=False)
    assert not (tmp_path / "out").exists()

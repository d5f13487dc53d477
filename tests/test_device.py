"""`merge --device`: the methods run on a torch device one tensor at a time (the GPU path, run on the CPU in CI)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import souplm
from souplm.engine.recipe import Recipe
from souplm.errors import SoupError


def _weights(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ties(family):
    return Recipe.from_models([family["a"], family["b"]], "ties", base_model=family["base"])


def test_device_path_uses_torch_executor_and_equals_it(family, tmp_path, monkeypatch):
    # The device path moves inputs to the device, runs the method there and brings the result back; on "cpu" the
    # moves are no-ops, so its bits must be the torch executor's exactly.
    dev = souplm.merge(_ties(family), tmp_path / "dev", progress=False, device="cpu", hash_inputs=False)
    assert dev.executor == "torch"
    monkeypatch.setenv("SOUPLM_EXECUTOR", "torch")
    ref = souplm.merge(_ties(family), tmp_path / "ref", progress=False, hash_inputs=False)
    assert ref.executor == "torch"
    a, b = _weights(tmp_path / "dev"), _weights(tmp_path / "ref")
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_device_linear_matches_float64_formula(family, tmp_path):
    souplm.merge(Recipe.vanilla(family["a"], family["b"], 0.3), tmp_path / "o", progress=False, device="cpu",
                 hash_inputs=False)
    out, wa, wb = _weights(tmp_path / "o"), _weights(family["a"]), _weights(family["b"])
    for n, t in out.items():
        ref = 0.3 * wa[n].double() + 0.7 * wb[n].double()
        assert torch.allclose(t.double(), ref, rtol=1e-6, atol=1e-7), n


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_error_before_reading(family, tmp_path):
    with pytest.raises(SoupError, match="CUDA is not available"):
        souplm.merge(_ties(family), tmp_path / "o", progress=False, device="cuda")
    assert not (tmp_path / "o").exists()


def test_bad_device_via_cli_exits_2_and_writes_nothing(family, tmp_path):
    out = tmp_path / "o"
    res = subprocess.run(
        [sys.executable, "-m", "souplm", "merge", "--model", str(family["a"]), "--model", str(family["b"]),
         "--alpha", "0.5", "-o", str(out), "--device", "nosuchdevice"],
        check=False, capture_output=True, text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("souplm: error: --device 'nosuchdevice'")
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ties_matches_host(family, tmp_path, monkeypatch):
    souplm.merge(_ties(family), tmp_path / "gpu", progress=False, device="cuda", hash_inputs=False)
    monkeypatch.setenv("SOUPLM_EXECUTOR", "torch")
    souplm.merge(_ties(family), tmp_path / "cpu", progress=False, hash_inputs=False)
    a, b = _weights(tmp_path / "gpu"), _weights(tmp_path / "cpu")
    for n in a:
        assert torch.allclose(a[n].float(), b[n].float(), rtol=1e-5, atol=1e-6), n


def test_dare_ties_on_device_path_equals_torch_executor(family, tmp_path, monkeypatch):
    recipe = Recipe.from_models([family["a"], family["b"]], "dare_ties", base_model=family["base"])
    souplm.merge(recipe, tmp_path / "dev", progress=False, device="cpu", hash_inputs=False)
    monkeypatch.setenv("SOUPLM_EXECUTOR", "torch")
    souplm.merge(recipe, tmp_path / "ref", progress=False, hash_inputs=False)
    a, b = _weights(tmp_path / "dev"), _weights(tmp_path / "ref")
    for n in a:
        assert torch.equal(a[n], b[n]), n

"""The `souplm` command's end: `merge` skips the interpreter's teardown once torch is loaded (cli.console),
and that must lose nothing: the exit status, the messages on both streams and a complete output."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from souplm import Recipe


def _souplm(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "SOUPLM_EXECUTOR": "torch"}  # the executor that loads torch
    return subprocess.run([sys.executable, "-m", "souplm", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_merge_ends_with_a_complete_output_and_its_report(family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(Recipe.vanilla(family["a"], family["b"], 0.25).to_yaml())
    r = _souplm("merge", str(recipe), "-o", "out", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "merged" in r.stdout + r.stderr
    a, b = load_file(family["a"] / "model.safetensors"), load_file(family["b"] / "model.safetensors")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out.keys() == a.keys()
    for k in a:  # the vanilla soup, against its formula in float64
        want = (0.25 * a[k].double() + 0.75 * b[k].double()).to(a[k].dtype)
        torch.testing.assert_close(out[k], want, rtol=0, atol=float(torch.finfo(a[k].dtype).eps) * 4)


def test_a_merge_failing_after_torch_loaded_still_says_why_and_exits_non_zero(family, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(family["b"] / "model.safetensors")
    name = max(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((family["b"] / "config.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(Recipe.vanilla(family["a"], bad, 0.5).to_yaml())
    r = _souplm("merge", str(recipe), "-o", "out", "--quiet", cwd=tmp_path)
    assert r.returncode == 2 and name in r.stderr and "NaN" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*partial*"))

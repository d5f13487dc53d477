"""Issue 12 §4/§5 for `souplm learn`: the merged model's card recipe rebuilds the same bytes from any directory;
an interrupt (Ctrl-C or SIGTERM) after a checkpoint says what was kept; a torn log line does not break --resume;
a NaN base or a NaN in `fixed:` is refused before the first step, by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from test_learn import base_config, pair  # noqa: F401  (the module's tiny A/B pair fixture)

from souplm.errors import SoupError
from souplm.learn import LearnInterrupted, learn


def _souplm(*argv, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "souplm", *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False, **kw)


def test_learned_card_recipe_reproduces_bytes_from_another_cwd(pair, tmp_path):  # noqa: F811
    cfg = base_config(pair, tmp_path, merge=True, training={"epochs": 1, "batch_size": 16, "evaluate": False})
    res = learn(cfg, progress=False)
    merged = res.merged_dir
    saved = yaml.safe_load((merged / "souplm_recipe.yaml").read_text())
    assert saved["coefficients"] == "souplm_coefficients.json"  # the applied table, beside the recipe
    assert all(os.path.isabs(m["model"]) for m in saved["models"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _souplm("merge", merged / "souplm_recipe.yaml", "-o", "again", "--quiet", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (merged / "model.safetensors").read_bytes() == (elsewhere / "again" / "model.safetensors").read_bytes()


def test_interrupt_after_a_checkpoint_says_what_was_kept_and_resume_survives_a_torn_log(pair, tmp_path):  # noqa: F811
    cfg = base_config(pair, tmp_path, training={"epochs": 3, "batch_size": 16, "evaluate": False})

    def stop(epoch, loss):
        raise KeyboardInterrupt

    with pytest.raises(LearnInterrupted) as e:
        learn(cfg, progress=False, on_epoch_end=stop)
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").is_file()
    assert str(run / "checkpoint.pt") in e.value.kept and "--resume" in e.value.kept
    with open(run / "log.jsonl", "a") as f:
        f.write('{"event": "step", "epoch": 2, "st')  # torn by a kill mid-write
    res = learn(cfg, progress=False, resume=True)
    assert res.resumed_from_epoch == 1 and res.steps == 3 * 3
    lines = (run / "log.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn line is gone, every other line parses


def test_sigterm_is_handled_like_ctrl_c(pair, tmp_path):  # noqa: F811
    cfg = base_config(pair, tmp_path, training={"epochs": 400, "batch_size": 16, "evaluate": False})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "souplm", "learn", str(tmp_path / "c.yaml"), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.is_file(), proc.communicate()[1] if proc.poll() is not None else "no checkpoint in 120 s"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "souplm: interrupted; kept" in err and "checkpoint.pt" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "coefficients.json").exists()


def test_nan_in_a_base_or_in_fixed_is_refused_before_training(pair, tmp_path):  # noqa: F811
    with pytest.raises(SoupError, match=r"fixed\.embed"):
        learn(base_config(pair, tmp_path, fixed={"embed": [float("nan"), 0.5]}), progress=False)
    from transformers import LlamaForCausalLM

    bad = LlamaForCausalLM.from_pretrained(pair["B"])
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    bad.save_pretrained(tmp_path / "nanB")
    cfg = base_config(pair, tmp_path, models=[pair["A"], str(tmp_path / "nanB")])
    with pytest.raises(SoupError, match=r"model\.layers\.1\.mlp\.down_proj\.weight of model .*nanB"):
        learn(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()

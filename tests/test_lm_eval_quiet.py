"""lm-eval's git-hash lookup prints git's "fatal: not a git repository" outside a repository; souplm runs
lm-eval with a quiet lookup instead (a stand-in lm_eval module: lm-eval itself is optional)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from souplm.evaluate import lm_eval_adapter as A

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _noisy_lookup() -> str | None:
    """What lm-eval 0.4.13 does: git describe, with git's stderr left on the terminal."""
    try:
        return subprocess.check_output(["git", "describe", "--always"]).strip().decode()
    except subprocess.CalledProcessError:
        return None


@needs_git
def test_the_git_lookup_is_quiet_outside_a_repository_while_lm_eval_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    evaluator = types.ModuleType("lm_eval.evaluator")
    evaluator.get_git_commit_hash = _noisy_lookup  # type: ignore[attr-defined]
    package = types.ModuleType("lm_eval")
    package.evaluator = evaluator  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lm_eval", package)
    monkeypatch.setitem(sys.modules, "lm_eval.evaluator", evaluator)
    monkeypatch.chdir(tmp_path)  # not a repository
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))

    evaluator.get_git_commit_hash()
    assert "not a git repository" in capfd.readouterr().err  # the noise this is about

    with A.quiet_lm_eval_git():
        assert evaluator.get_git_commit_hash() is None
        print("souplm: warning: a real warning", file=sys.stderr)  # other output passes untouched
    err = capfd.readouterr().err
    assert "fatal" not in err and "a real warning" in err
    assert evaluator.get_git_commit_hash is _noisy_lookup  # restored


@needs_git
def test_the_quiet_lookup_still_finds_the_commit_inside_a_repository(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                                        "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, check=True)
    head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"]).decode().strip()
    assert A.quiet_git_hash() is not None and A.quiet_git_hash().startswith(head[:7])

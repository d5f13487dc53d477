"""`make experiment-quick` leaves the repository clean: its documents go to an ignored folder and its work
files to the cache, and the writing step touches nothing git tracks."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from souplm.experiment import pipeline, run
from souplm.experiment.family import family_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs git and the repository")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout


def test_the_quick_targets_output_folder_is_ignored_and_untracked() -> None:
    recipe = re.search(r"^experiment-quick:.*?(?=^\S|\Z)", (ROOT / "Makefile").read_text(), re.DOTALL | re.MULTILINE)
    assert recipe is not None
    out = re.search(r"souplm\.experiment\.run --quick .*--out (\S+)", recipe.group(0))
    assert out is not None and Path(out.group(1)) == run.default_out(True)
    for f in ("RESULTS.md", "results/results.json", "results/vanilla_sweep.png", "results/alphas_metasets/x.png"):
        assert _git("check-ignore", f"{out.group(1)}/{f}").strip(), f
    assert not _git("ls-files", out.group(1)).strip()
    assert run.default_out(False) == Path("docs")  # only the full run writes the tracked documents


def test_the_quick_runs_work_folder_is_outside_the_repository(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SOUPLM_CACHE", raising=False)
    work = family_dir(None, True) / "experiment"  # where run.main puts the quick run's caches
    assert ROOT not in work.resolve().parents


def test_the_writing_step_changes_no_tracked_file() -> None:
    quick = ROOT / run.default_out(True)
    existed = quick.exists()
    out = quick / "test-write"  # beside a real quick run's documents, never over them
    try:
        written = pipeline.write_documents(out, {"format": "souplm.experiment/1"}, "# RESULTS (test)\n")
        assert all(out in p.parents for p in written)
        assert _git("status", "--porcelain", "--untracked-files=all", "--", str(quick)) == ""
        assert not _git("ls-files", "--", *[str(p) for p in written]).strip()
    finally:
        shutil.rmtree(quick if not existed else out, ignore_errors=True)


def test_large_and_quick_are_refused_together(capsys) -> None:
    assert run.main(["--quick", "--large"]) == 2
    assert "souplm: error: --large and --quick: choose one" in capsys.readouterr().err


def test_the_large_runs_default_output_is_ignored_too() -> None:
    assert run.LARGE.test_rows["easy-vqa"] >= 1000 and run.LARGE.test_rows["shakespeare-mc"] >= 500
    assert _git("check-ignore", "scratch/experiment-large/RESULTS.md").strip()

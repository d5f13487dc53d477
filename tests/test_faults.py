"""Fault injection for outputs (issue 12 §1, §4 card hashes, §6 output errors, §7): what is on disk afterwards.

Faults are injected with SOUPLM_TEST_FAULT (souplm/io/output.py) in a child process or in-process, so these
tests behave the same as root (where chmod does not make a directory read-only).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_learn import one_thread, pair  # noqa: F401  (fixtures: two tiny fine-tunes and a dev set)

from souplm.cli import main
from souplm.errors import SoupError
from souplm.io import output as O


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def souplm(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "souplm", *args], check=False, capture_output=True, text=True,
                          env=full,
                          cwd=cwd, timeout=120)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("souplm: warning")]
    assert len(lines) == 1 and lines[0].startswith("souplm: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def leftovers(parent: Path, name: str) -> list[str]:
    """Staging debris of output `name` (the fallback's `.NAME.lock` stays by design: unlinking it would race)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name != f".{name}.lock")


def merged(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def expected(family, alpha: float) -> dict[str, torch.Tensor]:
    a, b = load_file(family["a"] / "model.safetensors"), load_file(family["b"] / "model.safetensors")
    return {k: alpha * a[k] + (1 - alpha) * b[k] for k in a}


def assert_soup(out: Path, family, alpha: float) -> None:
    got, want = merged(out), expected(family, alpha)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def quick(family, out: Path, alpha: float, *extra: str) -> list[str]:
    return ["merge", "--model", str(family["a"]), "--model", str(family["b"]), "--alpha", str(alpha),
            "-o", str(out), "--quiet", *extra]


# -- §1 data loss ---------------------------------------------------------------------------------------------
def test_force_onto_a_folder_holding_the_inputs_is_refused(family, tmp_path, capsys, monkeypatch):
    fam = tmp_path / "fam"
    shutil.copytree(family["a"], fam / "A")
    shutil.copytree(family["b"], fam / "B")
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    recipe = recipe_dir / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {fam / 'A'}\n  - model: {fam / 'B'}\n")
    before = tree_hashes(tmp_path)
    monkeypatch.chdir(tmp_path)
    for out in (fam, fam / "A", fam / "A" / "inside", tmp_path, Path("."), Path("..")):
        for force in ([], ["--force"]):
            rc = main(["merge", "--model", str(fam / "A"), "--model", str(fam / "B"), "-o", str(out), "--quiet",
                       *force])
            assert rc == 2, out
            err = one_error_line(capsys.readouterr().err)
            assert str(out) in err and ("input" in err or "working directory" in err), err
    # the recipe's own folder, through the recipe
    assert main(["merge", str(recipe), "-o", str(recipe_dir), "--force", "--quiet"]) == 2
    assert "recipe" in one_error_line(capsys.readouterr().err)
    # a symlink to an input is seen through
    (tmp_path / "link").symlink_to(fam / "A")
    assert main(quick({"a": fam / "A", "b": fam / "B"}, tmp_path / "link", 0.5, "--force")) == 2
    capsys.readouterr()
    (tmp_path / "link").unlink()
    assert tree_hashes(tmp_path) == before  # no input touched, nothing written


def test_two_merges_into_one_output_exactly_one_wins(family, tmp_path):
    out = tmp_path / "out"
    # Both pass the emptiness check, then hold before the final rename so they race for it.
    env = {O.FAULT_ENV: "before-rename:sleep=1.5"}
    procs = [subprocess.Popen([sys.executable, "-m", "souplm", *quick(family, out, alpha)], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for alpha in (0.25, 0.75)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = [rc for rc, _ in results]
    assert sorted(codes) == [0, 2], results
    winner = (0.25, 0.75)[codes.index(0)]
    err = one_error_line(results[codes.index(2)][1])
    assert str(out) in err and "someone else" in err
    assert_soup(out, family, winner)  # the winner's output is whole and untouched
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "lock-fallback"])
def test_interrupted_force_swap_keeps_a_complete_output(family, tmp_path, fallback):
    out = tmp_path / "out"
    assert souplm(*quick(family, out, 0.25)).returncode == 0
    old = tree_hashes(out)
    env = {"SOUPLM_NO_RENAMEAT2": "1"} if fallback else {}
    # Ctrl-C before the rename: the old output stays, nothing else is left.
    r = souplm(*quick(family, out, 0.75, "--force"), env={**env, O.FAULT_ENV: "before-rename"})
    assert r.returncode == 130
    assert tree_hashes(out) == old and leftovers(tmp_path, "out") == []
    # Ctrl-C between the exchange and the removal of the old one: the new output is in place, the old is gone
    # (without renameat2, between moving the old one aside and placing the new: the old one is put back).
    r = souplm(*quick(family, out, 0.75, "--force"), env={**env, O.FAULT_ENV: "after-exchange"})
    assert r.returncode == 130
    assert_soup(out, family, 0.25 if fallback else 0.75)
    assert leftovers(tmp_path, "out") == []
    if fallback:  # a SIGKILL between the two renames: the old output survives whole beside the target
        r = souplm(*quick(family, out, 0.75, "--force"), env={**env, O.FAULT_ENV: "after-exchange:kill"})
        assert r.returncode == -9 and not out.exists()
        (aside,) = [tmp_path / n for n in leftovers(tmp_path, "out") if ".old-" in n]
        assert tree_hashes(aside) == old
        return
    # SIGKILL there: a complete output is in place, and the orphan is cleaned by the next run.
    r = souplm(*quick(family, out, 0.25, "--force"), env={**env, O.FAULT_ENV: "after-exchange:kill"})
    assert r.returncode == -9
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert leftovers(tmp_path, "out")  # the old one, with its (now free) owner lock
    assert souplm(*quick(family, out, 0.5, "--force")).returncode == 0
    assert_soup(out, family, 0.5)
    assert leftovers(tmp_path, "out") == []


def test_sigkilled_merge_leaves_a_partial_the_next_run_cleans(family, tmp_path):
    out = tmp_path / "out"
    r = souplm(*quick(family, out, 0.5), env={O.FAULT_ENV: "write:kill"})
    assert r.returncode == -9 and not out.exists()
    left = leftovers(tmp_path, "out")
    assert any(n.endswith(".owner") for n in left) and any(not n.endswith(".owner") for n in left)
    # A partial whose writer is alive (its owner lock held) is not touched.
    alive = O.AtomicDir(tmp_path / "out")
    alive_path = alive.open()
    assert souplm(*quick(family, out, 0.5)).returncode == 0
    assert_soup(out, family, 0.5)
    assert leftovers(tmp_path, "out") == sorted([alive_path.name, alive_path.name + ".owner"])
    alive.abort()
    assert leftovers(tmp_path, "out") == []


# -- §6 one line for output errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("point,code,words", [("write", "ENOSPC", "disk full"), ("stage", "EROFS", "read-only")])
def test_disk_full_and_read_only_are_one_line_and_leave_the_old_output(family, tmp_path, point, code, words):
    out = tmp_path / "out"
    assert souplm(*quick(family, out, 0.25)).returncode == 0
    old = tree_hashes(out)
    for target, force in ((out, ["--force"]), (tmp_path / "new", [])):
        r = souplm(*quick(family, target, 0.75, *force), env={O.FAULT_ENV: f"{point}:{code}"})
        assert r.returncode == 2
        err = one_error_line(r.stderr)
        assert words in err.lower() and str(tmp_path) in err
    assert tree_hashes(out) == old
    assert not (tmp_path / "new").exists() and leftovers(tmp_path, "out") == [] and leftovers(tmp_path, "new") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; the EROFS injection covers it")
def test_real_read_only_parent(family, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(quick(family, ro / "out", 0.5)) == 2
        assert str(ro) in one_error_line(capsys.readouterr().err)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_long_names_parent_file_and_eval_out_directory(family, tmp_path, capsys):
    long_ok = tmp_path / ("n" * 250)  # fits a name, not `.NAME.partial-XXXX`: the staging name is hashed
    assert main(quick(family, long_ok, 0.5)) == 0
    capsys.readouterr()
    assert_soup(long_ok, family, 0.5)
    assert [p.name for p in tmp_path.iterdir()] == [long_ok.name]
    cases = [tmp_path / ("n" * 300), tmp_path / long_ok.name / "model.safetensors" / "x"]
    (tmp_path / "file").write_text("x")
    cases += [tmp_path / "file" / "out", tmp_path / "file"]
    for out in cases:
        assert main(quick(family, out, 0.5)) == 2, out
        err = one_error_line(capsys.readouterr().err)
        assert str(out)[:100] in err or str(out.parent)[:100] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long_ok.name, "file"])
    # eval --out that is a directory fails before any evaluation
    assert main(["eval", str(family["a"]), "--task", "shakespeare-ppl", "--out", str(tmp_path)]) == 2
    assert "is a directory" in one_error_line(capsys.readouterr().err)


def test_output_model_without_config_json_warns(family, tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"
    shutil.copy(family["a"] / "model.safetensors", bare)
    assert main(["merge", "--model", str(bare), "--model", str(family["b"]), "--alpha", "0.5",
                 "-o", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no config.json" in err and "will not load" in err
    assert not (tmp_path / "out" / "config.json").exists()


# -- §7 umask ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_get_the_users_umask(family, tmp_path, capsys, mask):
    old = os.umask(mask)
    try:
        assert main(quick(family, tmp_path / "out", 0.5)) == 0
        with O.AtomicFile(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~mask


# -- §4 card hashes and inputs changed during a merge ------------------------------------------------------------
def test_card_records_each_input_files_plain_sha256(family, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", "--model", str(family["sharded"]), "--model", str(family["sharded"]), "-o", str(out),
                 "--quiet"]) == 0
    card = (out / "README.md").read_text()
    block = card.split("## Input files", 1)[1].split("```")[1]
    listed = dict(reversed(ln.split("  ", 1)) for ln in block.strip().splitlines())
    shards = sorted(family["sharded"].glob("*.safetensors"))
    assert len(shards) > 1
    for f in [*shards, family["sharded"] / "model.safetensors.index.json", family["sharded"] / "config.json"]:
        assert listed[str(f)] == hashlib.sha256(f.read_bytes()).hexdigest()
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "-"], check=False, input=block.strip() + "\n", capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("how", ["rewrite", "replace", "touch"])
def test_input_changed_during_the_merge_fails_it(family, tmp_path, monkeypatch, how):
    from souplm.engine import write as engine

    a = tmp_path / "a"
    shutil.copytree(family["a"], a)
    weights = a / "model.safetensors"
    data = weights.read_bytes()
    real = engine._write_shards

    def write_then_change(*args, **kwargs):
        result = real(*args, **kwargs)
        if how == "rewrite":  # same bytes, same size, mtime restored: only ctime tells
            st = weights.stat()
            weights.write_bytes(data)
            os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif how == "replace":
            tmp = a / "new"
            tmp.write_bytes(data)
            os.replace(tmp, weights)
        else:
            os.utime(weights)
        return result

    monkeypatch.setattr(engine, "_write_shards", write_then_change)
    with pytest.raises(SoupError, match="changed while the merge was reading it"):
        engine.merge({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(family["b"])}]},
                     tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


# -- report folders and files (eval --out, sweep, search, plot) ----------------------------------------------------
def test_staged_report_folder_is_all_or_nothing(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    with pytest.raises(KeyboardInterrupt), O.staged_dir(out) as d:
        (d / "a.csv").write_text("new")
        raise KeyboardInterrupt
    assert not out.exists() and leftovers(tmp_path, "rep") == []
    with O.staged_dir(out) as d:
        (d / "a.csv").write_text("old")
    assert (out / "a.csv").read_text() == "old"
    (out / "keep.txt").write_text("user's")
    monkeypatch.setenv(O.FAULT_ENV, "write:ENOSPC")
    with pytest.raises(O.OutputError, match="disk full"), O.staged_dir(out) as d:
        (d / "a.csv").write_text("new")
    assert (out / "a.csv").read_text() == "old" and leftovers(tmp_path, "rep") == []
    monkeypatch.delenv(O.FAULT_ENV)
    with O.staged_dir(out) as d:
        (d / "a.csv").write_text("new")
    assert (out / "a.csv").read_text() == "new" and (out / "keep.txt").read_text() == "user's"


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "r.json"
    O.write_text(f, "old")
    monkeypatch.setenv(O.FAULT_ENV, "before-rename")
    with pytest.raises(KeyboardInterrupt):
        O.write_text(f, "new")
    assert f.read_text() == "old" and leftovers(tmp_path, "r.json") == []
    monkeypatch.setenv(O.FAULT_ENV, "write:ENOSPC")
    with pytest.raises(O.OutputError, match="disk full"):
        O.write_text(f, "new")
    assert f.read_text() == "old" and leftovers(tmp_path, "r.json") == []


# -- learn --force keeps the earlier run until the new one has finished --------------------------------------------
def test_learn_force_interrupted_keeps_the_earlier_results(pair, tmp_path, monkeypatch):  # noqa: F811
    from souplm.learn import learn

    out = tmp_path / "run"
    cfg = {"models": [pair["A"], pair["B"]], "meta_sets": [{"path": pair["dev"], "samples": 16}],
           "training": {"epochs": 1, "batch_size": 8}, "output": str(out), "merge": True}
    learn(cfg, progress=False)
    (out / "notes.txt").write_text("the user's")
    old = tree_hashes(out)
    assert {"coefficients.json", "checkpoint.pt", "log.jsonl", "merged/model.safetensors"} <= set(old)
    for fault in ("learn-finished", "before-rename"):  # after training and merging / at the final rename
        monkeypatch.setenv(O.FAULT_ENV, fault)
        with pytest.raises(KeyboardInterrupt):
            learn({**cfg, "seed": 7}, progress=False, force=True)
        assert tree_hashes(out) == old and leftovers(tmp_path, "run") == []
    monkeypatch.delenv(O.FAULT_ENV)
    res = learn({**cfg, "seed": 7, "training": {"epochs": 2, "batch_size": 8}}, progress=False, force=True)
    assert res.table_path == out / "coefficients.json" and res.merged_dir == out / "merged"
    new = tree_hashes(out)
    assert new["notes.txt"] == old["notes.txt"] and new["coefficients.json"] != old["coefficients.json"]
    assert (out / "merged" / "config.json").is_file() and leftovers(tmp_path, "run") == []
    with pytest.raises(SoupError, match="input"):  # an output inside an input model, even with force
        learn({**cfg, "output": str(Path(pair["A"]) / "run")}, progress=False, force=True)


def test_sweep_outputs_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from souplm.search.sweep import SweepResult, write_outputs

    def result(shift: float) -> SweepResult:
        alphas = [0.0, 0.5, 1.0]
        return SweepResult(["A", "B"], alphas, [{"name": "t", "primary": "acc", "higher_is_better": True}],
                           {a: {"t": {"score": a / 2 + shift}} for a in alphas})

    out = tmp_path / "sweep"
    paths = write_outputs(result(0.0), out)
    assert {p.name for p in paths} >= {"sweep.csv", "sweep.json", "sweep.png"} and all(p.parent == out for p in paths)
    old = tree_hashes(out)
    for fault in ("write:ENOSPC", "before-rename"):
        monkeypatch.setenv(O.FAULT_ENV, fault)
        with pytest.raises((O.OutputError, KeyboardInterrupt)):
            write_outputs(result(0.25), out)
        assert tree_hashes(out) == old and leftovers(tmp_path, "sweep") == []
    monkeypatch.delenv(O.FAULT_ENV)
    write_outputs(result(0.25), out)
    new = tree_hashes(out)
    assert set(new) == set(old) and all(new[k] != old[k] for k in ("sweep.csv", "sweep.json", "sweep.md"))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a small tmpfs")
def test_real_full_and_read_only_file_systems(family, tmp_path, capsys):
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    mounted = []
    try:
        for where, opts in ((full, "size=64k"), (ro, "size=64k,ro")):
            if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=False,
                              capture_output=True).returncode != 0:
                pytest.skip("mount is not permitted here")
            mounted.append(where)
        for where, words in ((full, "No space left on device"), (ro, "Read-only file system")):
            assert main(quick(family, where / "out", 0.5)) == 2
            err = one_error_line(capsys.readouterr().err)
            assert words in err and str(where / "out") in err and ".partial-" not in err
            assert list(where.iterdir()) == []
    finally:
        for where in mounted:
            subprocess.run(["umount", str(where)], check=False)

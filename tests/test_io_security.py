"""Checkpoint, index, config and YAML readers under hostile or damaged input (issue 12 §2/§3/§6, issue 15 §1).

Each case states the expected outcome independently: the exact refusal (a SoupError, one line, naming the
culprit), or the exact bytes read back. Short reads are injected with a small per-call cap and a preadv that
returns fewer bytes than asked, on every reader path.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import souplm
from souplm.cli import main as cli
from souplm.engine.recipe import Recipe
from souplm.errors import SoupError, short_repr
from souplm.io import safetensors_file as sf
from souplm.io.checkpoint import Checkpoint
from souplm.io.safetensors_file import SafetensorsFile, SafetensorsWriter
from souplm.yamlfile import load_yaml, read_mapping


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file from a hand-written header (dict or raw JSON bytes) and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def refused(path: Path, pattern: str) -> str:
    with pytest.raises(SoupError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert pattern in msg and "\n" not in msg, msg
    return msg


# -- safetensors headers -----------------------------------------------------------------------------
def test_overlapping_tensors_are_refused(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    refused(raw_file(tmp_path / "x.safetensors", h, bytes(12)), "tensors 'a' and 'b' overlap")
    # the same bytes named twice (full aliasing) too
    h["b"]["data_offsets"] = [0, 8]
    refused(raw_file(tmp_path / "y.safetensors", h, bytes(12)), "overlap")


def test_adjacent_and_empty_tensors_are_accepted(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]},
         "b": {"dtype": "I8", "shape": [4], "data_offsets": [8, 12]}}
    data = struct.pack("<2f", 1.5, -2.0) + bytes([1, 2, 3, 255])
    f = SafetensorsFile(raw_file(tmp_path / "x.safetensors", h, data))
    assert f.get("a").tolist() == [1.5, -2.0]
    assert f.get("b").tolist() == [1, 2, 3, -1]
    assert f.get("e").shape == (0, 3)


@pytest.mark.parametrize("entry,pattern", [
    ({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype 'F33'"),
    ({"dtype": 3, "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype 3"),
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "malformed shape [2.0]"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "malformed shape"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "malformed shape [-2]"),
    ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "malformed shape '2'"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "malformed data_offsets [8, 0]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "malformed data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "malformed data_offsets"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "do not match its shape [3]"),
    ({"dtype": "F32", "shape": [2]}, "malformed header entry"),
    ([1, 2], "malformed header entry"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}, "truncated: tensor 'a' ends at byte"),
    ({"dtype": "F32", "shape": [10**30, 10**30], "data_offsets": [0, 8]}, "do not match"),
])
def test_malformed_entries_are_refused(tmp_path, entry, pattern):
    refused(raw_file(tmp_path / "x.safetensors", {"a": entry}, bytes(8)), pattern)


@pytest.mark.parametrize("header,length,pattern", ids=["deep", "duplicate", "invalid", "utf8", "array", "metadata",
                                                        "huge-length", "past-end"], argvalues=[
    (b"[" * 200_000 + b"]" * 200_000, None, "nested deeper than 4 levels"),
    (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', None, "names key 'a' twice"),
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe{}", None, "not UTF-8"),
    (b"[]", None, "header is not an object"),
    (b'{"__metadata__": {"k": 1}}', None, "__metadata__ is not an object of strings"),
    (b"{}", 200 * 1024 * 1024, "exceeds the 100 MiB limit"),
    (b"{}", 1000, "exceeds file size"),
])
def test_header_bounds(tmp_path, header, length, pattern):
    t0 = time.perf_counter()
    refused(raw_file(tmp_path / "x.safetensors", header, length=length), pattern)
    assert time.perf_counter() - t0 < 5


def test_a_huge_name_is_not_echoed_in_full(tmp_path):
    name = "n" * 100_000
    msg = refused(raw_file(tmp_path / "x.safetensors", {name: {"dtype": "F99", "shape": [], "data_offsets": [0, 0]}}),
                  "unsupported dtype")
    assert len(msg) < 400


def test_short_repr_bounds_any_value():
    assert short_repr("abc") == "'abc'"
    assert short_repr([1, 2]) == "[1, 2]"
    assert len(short_repr("x" * 10**6)) == 80
    assert short_repr(list(range(100))) == "<list of 100 items>"
    nested: list = []
    for _ in range(10_000):
        nested = [nested]
    assert len(short_repr(nested)) <= 80
    shared = ["x" * 50] * 8
    for _ in range(30):  # 8**30 leaves when expanded
        shared = [shared] * 8
    t0 = time.perf_counter()
    assert len(short_repr({"k": shared})) <= 80
    assert time.perf_counter() - t0 < 1


# -- short reads: every reader path ------------------------------------------------------------------
@pytest.fixture
def short_io(monkeypatch):
    """Per-call cap of 7 bytes and a preadv/write that transfer a random 1..cap of what they are asked."""
    real_preadv, real_write = os.preadv, os.write
    rng = random.Random(0)
    calls = {"read": 0, "write": 0}

    def preadv(fd, bufs, offset):
        (view,) = bufs
        calls["read"] += 1
        return real_preadv(fd, [memoryview(view)[: rng.randint(1, max(1, len(memoryview(view).cast("B"))))]], offset)

    def write(fd, data):
        calls["write"] += 1
        view = memoryview(data).cast("B")
        return real_write(fd, view[: rng.randint(1, max(1, view.nbytes))])

    monkeypatch.setattr(sf, "IO_CHUNK", 7)
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "write", write)
    return calls


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(13, 5, generator=g), "h": torch.randn(7, generator=g).to(torch.bfloat16),
            "i": torch.arange(11, dtype=torch.int64)}


def test_every_reader_path_survives_short_reads(tmp_path, short_io):
    ref = _tensors()
    save_file(ref, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    for name, t in ref.items():
        assert torch.equal(f.get(name), t), name  # same dtype: read straight into the tensor
        assert torch.equal(f.get(name, dtype=torch.float64), t.double()), name  # via the scratch buffer
        out = torch.empty(t.shape, dtype=t.dtype)
        assert torch.equal(f.read_into(name, out), t)
        raw = np.empty(t.numel() * t.element_size(), dtype=np.uint8)
        f.read_bytes_into(name, memoryview(raw))  # the fused executor's path
        assert raw.tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes()
        assert torch.equal(f.get_rows(name, 2, 6), t[2:6])  # learn's sharded loading
    assert short_io["read"] > 100  # the injection really split the reads


def test_scalar_tensors_round_trip(tmp_path):
    """0-d tensors (a stored scale, a step counter) through the writer and reader, against safetensors."""
    ref = {"s": torch.tensor(2.5), "b": torch.tensor(-3.0, dtype=torch.bfloat16), "i": torch.tensor(7)}
    save_file(ref, tmp_path / "ref.safetensors")
    f = SafetensorsFile(tmp_path / "ref.safetensors")
    assert all(f.get(n).shape == () and torch.equal(f.get(n), t) for n, t in ref.items())
    assert f.get("b", dtype=torch.float32).item() == -3.0
    w = SafetensorsWriter(tmp_path / "o.safetensors", [(n, str(t.dtype).split(".")[1], ()) for n, t in ref.items()])
    for n, t in ref.items():
        w.write(n, t)
    w.close()
    got = load_file(tmp_path / "o.safetensors")
    assert all(torch.equal(got[n], t) for n, t in ref.items())


def test_writer_survives_partial_writes(tmp_path, short_io):
    ref = _tensors()
    w = SafetensorsWriter(tmp_path / "o.safetensors", [(n, str(t.dtype).split(".")[1], tuple(t.shape)) for n, t in ref.items()])
    for n, t in ref.items():
        w.write(n, t)
    w.close()
    got = load_file(tmp_path / "o.safetensors")  # the reference reader
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
    assert short_io["write"] > 50


@pytest.mark.parametrize("executor", ["fused", "torch"])
def test_whole_merge_under_short_io_equals_the_formula(family, tmp_path, monkeypatch, short_io, executor):
    monkeypatch.setenv("SOUPLM_EXECUTOR", executor)
    report = souplm.merge(Recipe.vanilla(family["a"], family["b"], 0.25), tmp_path / "m", progress=False)
    assert report.executor == executor
    a, b = load_file(family["a"] / "model.safetensors"), load_file(family["b"] / "model.safetensors")
    out = load_file(tmp_path / "m" / "model.safetensors")
    for n in a:
        assert torch.allclose(out[n], 0.25 * a[n] + 0.75 * b[n], atol=1e-6), n


def test_mapping_view_and_checkpoint_reads_under_short_io(family, short_io):
    ref = load_file(family["sharded"] / next(p.name for p in family["sharded"].glob("*.safetensors")))
    ck = Checkpoint(family["sharded"])
    for n, t in ref.items():
        assert torch.equal(ck.get(n, dtype=None), t)
        assert torch.equal(ck.get_rows(n, 1, 3, dtype=None), t[1:3])


def test_end_of_file_during_a_read_is_one_line_naming_the_file(tmp_path):
    save_file(_tensors(), tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    os.truncate(tmp_path / "m.safetensors", f.tensors["w"].start + 3)  # shrunk after its header was checked
    with pytest.raises(SoupError) as e:
        f.get("w")
    assert str(e.value).startswith(f"{tmp_path / 'm.safetensors'}: unexpected end of file reading tensor w (3 of 260")


def test_io_chunk_comes_from_the_environment():
    code = "from souplm.io import safetensors_file as s; print(s.IO_CHUNK)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SOUPLM_IO_CHUNK": "4096"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "4096"


# -- indexes and model directories -------------------------------------------------------------------
def _sharded(family, tmp_path) -> tuple[Path, dict]:
    d = tmp_path / "m"
    shutil.copytree(family["sharded"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d, index


def _write_index(d: Path, index: dict) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _ck_refused(path: Path, pattern: str) -> str:
    with pytest.raises(SoupError) as e:
        Checkpoint(path)
    assert pattern in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/abs/outside.safetensors", "sub/../../x.safetensors"])
def test_index_naming_a_file_outside_the_directory_is_refused(family, tmp_path, target):
    d, index = _sharded(family, tmp_path)
    first = next(iter(index["weight_map"]))
    shutil.copy(d / index["weight_map"][first], tmp_path / "outside.safetensors")
    index["weight_map"][first] = target
    _write_index(d, index)
    _ck_refused(d, "outside the model directory")


def test_a_symlink_resolving_outside_is_refused(family, tmp_path):
    d, index = _sharded(family, tmp_path)
    shard = d / min(index["weight_map"].values())
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, elsewhere)
    shard.symlink_to(elsewhere)
    _ck_refused(d, "outside the model directory")
    (d / "model.safetensors.index.json").unlink()  # the same without an index
    _ck_refused(d, "outside the model directory")


def test_a_hub_cache_snapshot_may_link_into_its_blobs(family, tmp_path):
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in family["a"].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    assert Checkpoint(snap).names == Checkpoint(family["a"]).names


@pytest.mark.parametrize("weight_map,pattern", [
    (["a.safetensors"], "weight_map must be an object of tensor name -> file, got list"),
    ({"x": 3}, "weight_map entry 'x' must name a file, got 3"),
    ({"x": None}, "must name a file, got None"),
    ({"x": "model.bin"}, "not a .safetensors file"),
])
def test_malformed_weight_map_is_refused(family, tmp_path, weight_map, pattern):
    d, index = _sharded(family, tmp_path)
    index["weight_map"] = weight_map
    _write_index(d, index)
    _ck_refused(d, pattern)


def test_index_naming_a_tensor_its_shard_lacks_is_refused(family, tmp_path):
    d, index = _sharded(family, tmp_path)
    shard = min(index["weight_map"].values())
    index["weight_map"]["model.ghost.weight"] = shard
    _write_index(d, index)
    _ck_refused(d, f"names tensor 'model.ghost.weight' in shard {shard}, which lacks it")


def test_index_omitting_a_stored_tensor_is_refused(family, tmp_path):
    d, index = _sharded(family, tmp_path)
    dropped = min(index["weight_map"])
    del index["weight_map"][dropped]
    _write_index(d, index)
    _ck_refused(d, f"does not list tensor '{dropped}'")


def test_unlisted_shard_is_named_in_a_warning_and_not_read(family, tmp_path, capsys):
    d, _ = _sharded(family, tmp_path)
    shutil.copy(family["other"] / "model.safetensors", d / "consolidated.safetensors")
    ck = Checkpoint(d)
    err = capsys.readouterr().err
    assert err == (f"souplm: warning: {d / 'consolidated.safetensors'} is not listed in "
                   "model.safetensors.index.json; it is not read\n")
    assert d / "consolidated.safetensors" not in ck.weight_files()


@pytest.mark.parametrize("text,pattern", ids=["list", "str", "invalid", "deep"], argvalues=[
    ("[1, 2]", "must hold a JSON object, got list"),
    ('"x"', "must hold a JSON object, got str"),
    ("{", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
])
def test_config_that_is_not_an_object_is_refused(family, tmp_path, text, pattern):
    d = tmp_path / "m"
    shutil.copytree(family["a"], d)
    (d / "config.json").write_text(text)
    with pytest.raises(SoupError, match=pattern):
        _ = Checkpoint(d).config


# -- through the CLI: exact message and exit code ----------------------------------------------------
def _merge_cli(capsys, *models, out: Path, extra=()) -> tuple[int, str]:
    argv = ["merge"]
    for m in models:
        argv += ["--model", str(m)]
    code = cli([*argv, "--alpha", "0.5", "-o", str(out), "--quiet", "--no-hash", *extra])
    return code, capsys.readouterr().err


def test_cli_path_traversal(family, tmp_path, capsys):
    d, index = _sharded(family, tmp_path)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../a/model.safetensors"
    _write_index(d, index)
    code, err = _merge_cli(capsys, family["a"], d, out=tmp_path / "out")
    assert code == 2
    assert err == (f"souplm: error: {d / 'model.safetensors.index.json'} names '../../a/model.safetensors', "
                   f"which is outside the model directory {d}; refused\n")
    assert not (tmp_path / "out").exists()


def test_cli_overlapping_header(family, tmp_path, capsys):
    d = tmp_path / "b"
    shutil.copytree(family["b"], d)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    names = sorted(k for k in header if k != "__metadata__" and header[k]["shape"] == [32])[:2]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]  # two norms aliasing one vector
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    new = new.ljust(n)
    f.write_bytes(raw[:8] + new + raw[8 + n :])
    code, err = _merge_cli(capsys, family["a"], d, out=tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"souplm: error: {f} is corrupted: tensors '") and err.endswith("overlap in the file (their bytes alias)\n")


def test_cli_legacy_bin_with_allow_pickle(tmp_path, capsys, family):
    """A pre-zip pickle loads (weights-only, without mmap) and merges to the formula; a garbage .bin is one line."""
    d = tmp_path / "legacy"
    d.mkdir()
    b = load_file(family["b"] / "model.safetensors")
    torch.save(b, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    shutil.copy(family["b"] / "config.json", d)
    code, err = _merge_cli(capsys, family["a"], d, out=tmp_path / "out", extra=["--allow-pickle"])
    assert code == 0, err
    a, out = load_file(family["a"] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.allclose(out[n], 0.5 * a[n] + 0.5 * b[n], atol=1e-6) for n in a)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage, not a pickle")
    code, err = _merge_cli(capsys, family["a"], d, out=tmp_path / "out2", extra=["--allow-pickle"])
    assert code == 2
    assert err.startswith(f"souplm: error: {d / 'pytorch_model.bin'} could not be loaded as a weights-only checkpoint")
    assert err.count("\n") == 1 and not (tmp_path / "out2").exists()


# -- YAML ---------------------------------------------------------------------------------------------
def _bomb(levels: int = 9, fan: int = 9) -> str:
    lines = ['l0: &l0 ["' + "x" * 40 + '"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly():
    t0 = time.perf_counter()
    with pytest.raises(SoupError, match="aliases expand to more than 100000 extra nodes"):
        load_yaml(_bomb(), "bomb.yaml")
    assert time.perf_counter() - t0 < 1


def test_alias_bomb_via_the_cli_under_a_memory_cap(tmp_path):
    """The whole command (recipe read, error printed) in a process limited to 1 GiB of address space."""
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_bomb() + "merge_method: linear\nmodels:\n  - model: *l9\n")

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "souplm", "merge", str(recipe), "-o", str(tmp_path / "out")],
                       check=False, preexec_fn=cap, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 60
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr == (f"souplm: error: {recipe} is refused: its aliases expand to more than 100000 extra nodes "
                        "(an alias bomb?)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,pattern", ids=["cycle", "deep", "invalid", "python-tag"], argvalues=[
    ("a: &a [*a]", "contains itself"),
    ("[" * 5000 + "]" * 5000, "nested deeper than 100 levels"),
    ("a: [1, 2", "not valid YAML"),
    ("a: !!python/object:os.system {}", "not valid YAML"),
])
def test_yaml_refusals(text, pattern):
    with pytest.raises(SoupError, match=pattern):
        load_yaml(text, "f.yaml")


def test_yaml_size_cap(tmp_path, monkeypatch):
    from souplm import yamlfile

    monkeypatch.setattr(yamlfile, "MAX_YAML_BYTES", 100)
    p = tmp_path / "r.yaml"
    p.write_text("a: " + "x" * 200)
    with pytest.raises(SoupError, match="over the 100 byte limit"):
        read_mapping(p, "recipe")


def test_yaml_numbers_read_as_numbers():
    data = load_yaml("lr: 1e-3\nbig: 2E+5\ns: '1e-3'\nflag: false\nsflag: 'false'\nn: 3\nf: 1.5", "c.yaml")
    assert data == {"lr": 0.001, "big": 200000.0, "s": "1e-3", "flag": False, "sflag": "false", "n": 3, "f": 1.5}


# -- property fuzz: any bytes are read correctly or refused with SoupError -------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                     max_leaves=20)
_entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "F64", "X"]),
                                "shape": st.lists(st.integers(-1, 5), max_size=3),
                                "data_offsets": st.lists(st.integers(-2, 40), min_size=2, max_size=3)})
_header = st.dictionaries(st.text(max_size=4), _entry | _json, max_size=4)


def _check_read(path: Path) -> None:
    try:
        f = SafetensorsFile(path)
    except SoupError:
        return
    size = path.stat().st_size
    spans = sorted((i.start, i.end) for i in f.tensors.values() if i.nbytes)
    assert all(0 < s <= e <= size for s, e in spans)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # disjoint
    raw = path.read_bytes()
    for name, info in f.tensors.items():
        assert f.get(name).reshape(-1).view(torch.uint8).numpy().tobytes() == raw[info.start : info.end]
    f.close()


def _framed(t: tuple[dict, bytes, int]) -> bytes:
    """A header's JSON framed as a file: length prefix (off by `t[2]` bytes), header, data `t[1]`."""
    raw = json.dumps(t[0]).encode()
    return struct.pack("<Q", max(0, len(raw) + t[2])) + raw + t[1]


@st.composite
def _near_valid(draw) -> bytes:
    """A header whose entries mostly match their shapes, with offsets nudged so some overlap or overrun."""
    header, end = {}, 0
    for i in range(draw(st.integers(1, 3))):
        code, size = draw(st.sampled_from([("F32", 4), ("BF16", 2), ("I8", 1)]))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        nbytes = size * int(np.prod(shape))
        lo = max(0, end + draw(st.sampled_from([0, 0, 0, -1, -4, 2])))
        header[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": [lo, lo + nbytes]}
        end = max(end, lo + nbytes)
    data = draw(st.binary(min_size=max(0, end - 2), max_size=end + 2))
    return _framed((header, data, 0))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=64) | st.tuples(_header, st.binary(max_size=48), st.integers(-3, 3)).map(_framed)
       | _near_valid())
def test_fuzz_safetensors_header(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fz") / "x.safetensors"
    path.write_bytes(blob)
    _check_read(path)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    save_file({"model.embed_tokens.weight": torch.ones(4, 2), "model.norm.weight": torch.ones(2)},
              d / "s1.safetensors")
    return d


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=64) | _json.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from(["model.embed_tokens.weight", "model.norm.weight", "x"]),
                         st.sampled_from(["s1.safetensors", "../s1.safetensors", "/s1.safetensors", "s2.safetensors", 1]),
                         max_size=3).map(lambda m: json.dumps({"weight_map": m}).encode()))
def test_fuzz_index_reader(one_shard, tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("ix")
    shutil.copy(one_shard / "s1.safetensors", d)
    (d / "model.safetensors.index.json").write_bytes(blob)
    try:
        ck = Checkpoint(d)
    except SoupError:
        return
    index = json.loads(blob)  # accepted: then it is exactly the shard's tensors, all in s1
    assert index["weight_map"] == {"model.embed_tokens.weight": "s1.safetensors", "model.norm.weight": "s1.safetensors"}
    assert sorted(ck.names) == sorted(index["weight_map"])


def test_eval_of_a_model_without_a_tokenizer_is_one_line(family, tmp_path):
    from souplm.evaluate.lm import load_model

    d = tmp_path / "m"
    shutil.copytree(family["a"], d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(SoupError) as e:
        load_model(d, device="cpu")
    assert str(e.value).startswith(f"{d} has no tokenizer (none of tokenizer.json, tokenizer.model, "
                                   "tokenizer_config.json, ...), which evaluating it needs")


def test_pickle_index_must_agree_with_its_shards(family, tmp_path):
    d = tmp_path / "binm"
    d.mkdir()
    sd = load_file(family["a"] / "model.safetensors")
    torch.save(sd, d / "pytorch_model.bin")
    index = {"weight_map": dict.fromkeys(sd, "pytorch_model.bin")}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert sorted(Checkpoint(d, allow_pickle=True).names) == sorted(sd)
    index["weight_map"]["model.ghost.weight"] = "pytorch_model.bin"
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(SoupError, match="names tensor 'model.ghost.weight' in shard pytorch_model.bin, which lacks it"):
        Checkpoint(d, allow_pickle=True)
    index["weight_map"] = {"x": "../a/pytorch_model.bin"}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(SoupError, match="outside the model directory"):
        Checkpoint(d, allow_pickle=True)


def test_a_corrupt_or_deeply_nested_hash_memo_is_ignored_not_fatal(tmp_path, monkeypatch):
    import hashlib as _hl

    from souplm.io.checkpoint import content_hash

    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    expected = _hl.sha256(b"model.safetensors\0" + _hl.sha256(b"weights").digest()).hexdigest()
    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    memo = tmp_path / "cache" / "content_hashes.json"
    for bad in ("[" * 200_000, "{not json", "[1, 2]", '{"x": {"y": 1}}'):
        memo.write_text(bad)
        assert content_hash(d) == expected


def test_the_hash_memo_is_parsed_once_and_forgets_files_that_are_gone(tmp_path, monkeypatch):
    """A merge asks the memo once per input file: it is parsed once while it stays the same, and an entry
    that can never hit again (its file removed or rewritten) is dropped when the memo is next written."""
    import hashlib as _hl

    import souplm.io.checkpoint as ck

    monkeypatch.setenv("SOUPLM_CACHE", str(tmp_path / "cache"))
    files = []
    for i in range(3):
        f = tmp_path / f"w{i}.safetensors"
        f.write_bytes(b"weights %d" % i)
        files.append(f)
    for f in files[:2]:
        assert ck.file_sha256(f) == _hl.sha256(f.read_bytes()).hexdigest()
    memo = tmp_path / "cache" / "content_hashes.json"
    assert len(json.loads(memo.read_text())) == 2
    parses = []
    real = ck.load_json
    monkeypatch.setattr(ck, "load_json", lambda *a, **k: parses.append(1) or real(*a, **k))
    for _ in range(5):  # hits: no re-parse while the memo file is unchanged
        ck.file_sha256(files[0])
        ck.file_sha256(files[1])
    assert len(parses) <= 1
    files[0].unlink()
    files[1].write_bytes(b"rewritten")  # a new identity: the old entry can never hit
    assert ck.file_sha256(files[2]) == _hl.sha256(b"weights 2").hexdigest()
    kept = json.loads(memo.read_text())
    assert [k.split("|")[0] for k in kept] == [f"file:{files[2].resolve()}"]
    assert ck.file_sha256(files[1]) == _hl.sha256(b"rewritten").hexdigest()  # re-read, not the stale digest

#!/usr/bin/env python
"""Whole-process merge benchmark: ``souplm merge`` against mergekit 0.1.5.

The script

1. builds (once, cached under ``--workdir``) a random Llama-family trio in bf16: a base model
   and two "fine-tunes" that are the base plus small random deltas, written directly with
   ``safetensors.torch.save_file`` in Hugging Face naming, sharded, with an index and a
   ``LlamaConfig`` ``config.json``;
2. installs mergekit 0.1.5 once in its own virtual environment (torch pinned first so that no
   CUDA build is pulled);
3. runs ``souplm merge RECIPE.yaml -o OUT`` and ``mergekit-yaml RECIPE.yaml OUT`` on the same
   recipe file (mergekit's YAML, ``dtype: bfloat16``) for ``linear``, ``ties`` and
   ``dare_ties``, measuring each child process's wall time and peak RSS (``os.wait4``), and
   reports GB of input safetensors read per second;
4. checks that both tools' ``linear`` outputs agree, so the comparison is of the same
   computation, and prints a markdown table (optionally written to ``--out``).

Examples::

    python benchmarks/merge_bench.py --quick                 # tiny model, < 1 minute
    python benchmarks/merge_bench.py --out bench.md          # the ~370M model of issue 2
    python benchmarks/merge_bench.py --layers 48             # doubled model (RSS scaling)
    python benchmarks/merge_bench.py --tools mergekit        # one tool only
    python benchmarks/merge_bench.py --profile-mergekit ties # where mergekit spends its time
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"
METHODS = ("linear", "ties", "dare_ties")  # issue 2's targets (the default)
OPTIONAL_METHODS = ("slerp",)  # measured on request: --methods linear,slerp
# issue 14: mergekit's sparsified task-vector methods and model stock (base + ft_a + ft_b)
SPARSE_METHODS = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock")
OPTIONAL_METHODS += SPARSE_METHODS
# issue 14: the geometric methods and mergekit's other per-tensor ones; which of the trio each reads
GEOMETRIC_INPUTS = {
    "nuslerp": ("ft_a", "ft_b"), "multislerp": ("base", "ft_a", "ft_b"), "karcher": ("ft_a", "ft_b"),
    "nearswap": ("base", "ft_a"), "arcee_fusion": ("base", "ft_a"), "ram": ("base", "ft_a", "ft_b"), "ramplus_tl": ("base", "ft_a", "ft_b"),
    "passthrough": ("ft_a",),
    # nuslerp with nuslerp_flatten: false, nuslerp_row_wise: true (one SLERP per column): the torch executor's path
    "nuslerp_rowwise": ("ft_a", "ft_b"),
}
OPTIONAL_METHODS += tuple(GEOMETRIC_INPUTS)
TOOLS = ("souplm", "mergekit")
MODEL_NAMES = ("base", "ft_a", "ft_b")
DEFAULT_CACHE = Path(os.path.expanduser("~/.cache/souplm"))
READ_CHUNK = 16 << 20


# --------------------------------------------------------------------------------------------
# Model generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the random Llama-family model to build."""

    hidden: int = 1024
    layers: int = 24
    intermediate: int = 2816
    vocab: int = 32000
    heads: int = 16
    shards: int = 2
    seed: int = 0
    base_std: float = 0.02
    delta_std: float = 0.002

    @property
    def tag(self) -> str:
        """Directory name that identifies this spec in the cache."""
        return (
            f"llama-h{self.hidden}-l{self.layers}-i{self.intermediate}-v{self.vocab}"
            f"-a{self.heads}-s{self.shards}-seed{self.seed}"
        )

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """All tensors of the model in file order, with their shapes (HF Llama naming)."""
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}"
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out.append((f"{p}.self_attn.{proj}.weight", (h, h)))
            out.append((f"{p}.mlp.gate_proj.weight", (i, h)))
            out.append((f"{p}.mlp.up_proj.weight", (i, h)))
            out.append((f"{p}.mlp.down_proj.weight", (h, i)))
            out.append((f"{p}.input_layernorm.weight", (h,)))
            out.append((f"{p}.post_attention_layernorm.weight", (h,)))
        out.append(("model.norm.weight", (h,)))
        out.append(("lm_head.weight", (self.vocab, h)))
        return out

    def num_params(self) -> int:
        """Number of parameters of one model."""
        total = 0
        for _, shape in self.tensor_shapes():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _split_shards(names: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[str]]:
    """Split tensors (in order) into ``shards`` contiguous groups of roughly equal bytes."""
    total = sum(_numel(s) for _, s in names)
    groups: list[list[str]] = [[]]
    seen = 0
    for name, shape in names:
        boundary = total * len(groups) / shards
        if groups[-1] and seen >= boundary and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        seen += _numel(shape)
    return groups


def _write_config(spec: ModelSpec, model_dir: Path) -> None:
    """Write a valid ``LlamaConfig`` ``config.json`` for ``spec``."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )
    cfg.save_pretrained(str(model_dir))


def draw_trio(spec: ModelSpec, shape: tuple[int, ...], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One tensor of base, ft_a and ft_b (bf16): base ~ N(0, base_std) (norms ~ N(1, 0.05)), each fine-tune the
    base plus its own N(0, delta_std) delta (5x larger on norms)."""
    base = torch.empty(shape, dtype=torch.float32)
    if len(shape) == 1:
        base.normal_(1.0, 0.05, generator=gen)
        dstd = spec.delta_std * 5
    else:
        base.normal_(0.0, spec.base_std, generator=gen)
        dstd = spec.delta_std
    out = {"base": base.to(torch.bfloat16)}
    delta = torch.empty_like(base)
    for ft in MODEL_NAMES[1:]:
        delta.normal_(0.0, dstd, generator=gen)
        out[ft] = (base + delta).to(torch.bfloat16)
    return out


def build_trio(spec: ModelSpec, workdir: Path, *, log: bool = True) -> dict[str, Path]:
    """Build (or reuse) base + two fine-tunes for ``spec`` under ``workdir``; return their dirs.

    Every tensor of the base is drawn from N(0, base_std) (norm weights around 1); each
    fine-tune adds an independent N(0, delta_std) delta, so task vectors are dense, of mixed
    sign and have a magnitude spread that TIES trimming and DARE dropping act on.
    """
    root = workdir / "models" / spec.tag
    dirs = {name: root / name for name in MODEL_NAMES}
    marker = root / "COMPLETE.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == asdict(spec):
                return dirs
        except (OSError, ValueError):
            pass
    if root.exists():
        shutil.rmtree(root)
    _mkdir(root.parent)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{spec.tag}.", dir=root.parent))
    t0 = time.perf_counter()
    try:
        shapes = spec.tensor_shapes()
        shape_of = dict(shapes)
        groups = _split_shards(shapes, spec.shards)
        n_sh = len(groups)
        files = [f"model-{k + 1:05d}-of-{n_sh:05d}.safetensors" for k in range(n_sh)]
        gen = torch.Generator().manual_seed(spec.seed)
        for name in MODEL_NAMES:
            _mkdir(tmp_root / name)
        weight_map: dict[str, str] = {}
        total_bytes = 0
        for fname, group in zip(files, groups):
            shard: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MODEL_NAMES}
            for tname in group:
                shape = shape_of[tname]
                for m, t in draw_trio(spec, shape, gen).items():
                    shard[m][tname] = t
                weight_map[tname] = fname
                total_bytes += _numel(shape) * 2
            for m in MODEL_NAMES:
                save_file(shard[m], str(tmp_root / m / fname), metadata={"format": "pt"})
            del shard
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        for m in MODEL_NAMES:
            (tmp_root / m / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            _write_config(spec, tmp_root / m)
        (tmp_root / "COMPLETE.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
        tmp_root.chmod(0o755)
        tmp_root.rename(root)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    if log:
        gb = spec.num_params() * 2 / 1e9
        print(
            f"built {spec.tag}: 3 x {spec.num_params() / 1e6:.1f}M params ({gb:.2f} GB each) "
            f"in {time.perf_counter() - t0:.1f}s -> {root}",
            flush=True,
        )
    return dirs


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def safetensors_bytes(model_dir: Path) -> int:
    """Total size in bytes of the ``.safetensors`` files of a model directory."""
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# mergekit environment
# --------------------------------------------------------------------------------------------


def ensure_mergekit(venv: Path) -> Path:
    """Create ``venv`` with torch (pinned, installed first) and mergekit; return mergekit-yaml.

    Skips installation when ``venv/bin/mergekit-yaml`` exists and reports the right version.
    Fails loudly if ``mergekit-yaml --help`` does not run.
    """
    exe = venv / "bin" / "mergekit-yaml"
    py = venv / "bin" / "python"
    if not (exe.is_file() and _mergekit_version(py) == MERGEKIT_VERSION):
        print(f"installing mergekit {MERGEKIT_VERSION} into {venv} (once) ...", flush=True)
        if not py.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, TORCH_PIN], check=True)
        subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"], check=True)
    res = subprocess.run([str(exe), "--help"], check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: {exe} --help failed:\n{res.stderr[-2000:]}")
    return exe


def _mergekit_version(py: Path) -> str | None:
    """Installed mergekit version in the interpreter ``py``, or None."""
    if not py.is_file():
        return None
    res = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        check=False,
        capture_output=True,
        text=True,
    )
    return res.stdout.strip() if res.returncode == 0 else None


def find_souplm() -> list[str]:
    """Command that runs the souplm CLI of the current environment."""
    beside = Path(sys.executable).parent / "souplm"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("souplm")
    if found:
        return [found]
    return [sys.executable, "-m", "souplm.cli"]


def byte_compile_souplm() -> str:
    """Write souplm's bytecode once, as pip did for mergekit's venv at install: an editable install keeps
    its sources in the checkout, and where PYTHONDONTWRITEBYTECODE is set (as on these machines) every run
    would otherwise compile each module again (~0.2 s) while mergekit's start from its cached .pyc files."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("souplm")
    where = list(spec.submodule_search_locations or []) if spec else []
    ok = all(compileall.compile_dir(d, quiet=1) for d in where)
    return f"souplm bytecode written once in {', '.join(where)}" if ok and where else "souplm bytecode: not written"


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def write_recipe(method: str, dirs: dict[str, Path], path: Path, density: float = 0.5) -> Path:
    """Write the mergekit-format recipe for ``method`` (shared by both tools) to ``path``."""
    a, b, base = dirs["ft_a"], dirs["ft_b"], dirs["base"]
    if method == "linear":
        text = (
            "models:\n"
            f"  - model: {a}\n    parameters:\n      weight: 0.5\n"
            f"  - model: {b}\n    parameters:\n      weight: 0.5\n"
            "merge_method: linear\n"
            "dtype: bfloat16\n"
        )
    elif method in ("ties", "dare_ties"):
        text = (
            "models:\n"
            f"  - model: {a}\n    parameters:\n      density: {density}\n      weight: 1.0\n"
            f"  - model: {b}\n    parameters:\n      density: {density}\n      weight: 1.0\n"
            f"merge_method: {method}\n"
            f"base_model: {base}\n"
            "dtype: bfloat16\n"
        )
    elif method == "slerp":  # mergekit interpolates from base_model (t = 0) to the other model (t = 1)
        text = (
            "models:\n"
            f"  - model: {a}\n"
            f"  - model: {b}\n"
            "merge_method: slerp\n"
            f"base_model: {a}\n"
            "parameters:\n  t: 0.4\n"
            "dtype: bfloat16\n"
        )
    elif method in SPARSE_METHODS:
        per_model = {
            "breadcrumbs": f"      density: {density}\n      gamma: 0.01\n      weight: 1.0\n",
            "della": f"      density: {density}\n      epsilon: 0.15\n      weight: 1.0\n",
        }.get(method.split("_")[0], "")
        models = "".join(f"  - model: {m}\n" + (f"    parameters:\n{per_model}" if per_model else "") for m in (a, b))
        shared = f"parameters:\n  select_topk: {density}\n" if method == "sce" else ""
        text = f"models:\n{models}merge_method: {method}\nbase_model: {base}\n{shared}dtype: bfloat16\n"
    elif method in GEOMETRIC_INPUTS:
        text = geometric_recipe(method, dirs)
    else:
        raise ValueError(f"unknown method {method!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def geometric_recipe(method: str, dirs: dict[str, Path]) -> str:
    """The recipe of one of GEOMETRIC_INPUTS, in mergekit's YAML (each reads the models listed there)."""
    base = dirs["base"]
    weights = {"nuslerp": (0.6, 0.4), "nuslerp_rowwise": (0.6, 0.4), "multislerp": (0.6, 0.4)}.get(method)
    models = [dirs[n] for n in GEOMETRIC_INPUTS[method] if n != "base"]
    lines = ["models:"]
    for k, m in enumerate(models):
        lines.append(f"  - model: {m}")
        if weights:
            lines.append(f"    parameters:\n      weight: {weights[k]}")
    if method == "passthrough":
        lines.append("    parameters:\n      scale:\n        - filter: o_proj\n          value: 0.5\n        - value: 1.0")
    lines.append(f"merge_method: {method.removesuffix('_rowwise')}")
    if method == "nuslerp_rowwise":
        lines.append("parameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: true")
    if "base" in GEOMETRIC_INPUTS[method]:
        lines.append(f"base_model: {base}")
    if method == "nearswap":
        lines.append("parameters:\n  t: 0.001")
    return "\n".join(lines) + "\ndtype: bfloat16\n"


def input_models(method: str) -> tuple[str, ...]:
    """Which of the trio a method reads."""
    if method in GEOMETRIC_INPUTS:
        return GEOMETRIC_INPUTS[method]
    return ("ft_a", "ft_b") if method in ("linear", "slerp") else MODEL_NAMES


# --------------------------------------------------------------------------------------------
# Running and measuring
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One whole-process run of one tool."""

    tool: str
    method: str
    wall_s: float
    peak_rss_bytes: int
    returncode: int
    cpu_s: float = float("nan")
    peak_anon_bytes: int = 0
    peak_file_bytes: int = 0
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        """True if the process exited with status 0."""
        return self.returncode == 0


class RssSampler(threading.Thread):
    """Samples ``RssAnon`` / ``RssFile`` of a process from ``/proc/PID/status`` and keeps the peaks.

    ``ru_maxrss`` counts both anonymous memory (tensors the process allocated) and file-backed
    pages of memory-mapped inputs that it touched (safetensors files are mmapped); the split
    tells which of the two drives a peak. Sampling (every ``interval`` s) can miss short spikes.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.interval = interval
        self.peak_anon = 0
        self.peak_file = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Poll until stopped or the process is gone."""
        while not self._stop_event.is_set():
            try:
                text = self.path.read_text()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_anon = max(self.peak_anon, int(line.split()[1]) * 1024)
                elif line.startswith("RssFile:"):
                    self.peak_file = max(self.peak_file, int(line.split()[1]) * 1024)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop_event.set()
        self.join()


@dataclass
class Measurement:
    """What :func:`run_measured` observed of one child process."""

    wall_s: float
    peak_rss_bytes: int
    returncode: int
    cpu_s: float
    peak_anon_bytes: int
    peak_file_bytes: int


def run_measured(cmd: Sequence[str], env: dict[str, str], log_path: Path) -> Measurement:
    """Run ``cmd`` with stdout/stderr to ``log_path`` and measure the child process.

    Peak RSS and CPU time (user + system) come from ``os.wait4``'s rusage of the child
    (``ru_maxrss`` is in KiB on Linux), which also covers descendants the child waited for.
    CPU time is far less sensitive than wall time to other processes sharing the machine.
    The anonymous / file-backed split of RSS is sampled by :class:`RssSampler`.

    ``ru_maxrss`` has a floor: Linux records the old address space's high-water mark at ``exec``, so
    a child reports at least this benchmark process's own size when it started it (~0.2 GiB with
    torch imported). Peaks below that are overstated, which can only favour the smaller tool's rival.
    """
    with open(log_path, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=logf, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
        )
        sampler = RssSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(
        wall,
        int(usage.ru_maxrss) * 1024,
        proc.returncode,
        usage.ru_utime + usage.ru_stime,
        sampler.peak_anon,
        sampler.peak_file,
    )


def preread(paths: Sequence[Path]) -> int:
    """Read files once so that both tools start with the same (warm) page cache."""
    total = 0
    buf = bytearray(READ_CHUNK)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def _tail(path: Path, n: int = 1500) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


@dataclass
class Bench:
    """Everything one benchmark invocation needs."""

    dirs: dict[str, Path]
    workdir: Path
    souplm_cmd: list[str]
    mergekit_exe: Path | None
    env: dict[str, str]
    tag: str
    results: list[RunResult] = field(default_factory=list)
    outputs: Path | None = None  # where merged outputs go (None: under workdir/runs); e.g. a tmpfs

    def command(self, tool: str, recipe: Path, out: Path) -> list[str]:
        """The exact command line for ``tool``."""
        if tool == "souplm":
            return [*self.souplm_cmd, "merge", str(recipe), "-o", str(out)]
        assert self.mergekit_exe is not None
        return [str(self.mergekit_exe), str(recipe), str(out)]

    def out_dir(self, tool: str, method: str) -> Path:
        """Where ``tool`` writes its ``method`` output."""
        return (self.outputs or self.workdir / "runs") / self.tag / f"{tool}-{method}"

    def run(self, tool: str, method: str, recipe: Path, *, record: bool = True) -> RunResult:
        """One measured run (output directory removed first, dirty pages synced)."""
        out = self.out_dir(tool, method)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.sync()
        log = out.parent / f"{tool}-{method}.log"
        meas = run_measured(self.command(tool, recipe, out), self.env, log)
        wall, rss, rc, cpu = meas.wall_s, meas.peak_rss_bytes, meas.returncode, meas.cpu_s
        res = RunResult(
            tool,
            method,
            wall,
            rss,
            rc,
            cpu,
            meas.peak_anon_bytes,
            meas.peak_file_bytes,
            "" if rc == 0 else _tail(log),
        )
        status = "ok" if rc == 0 else f"FAILED rc={rc} (log: {log})"
        kind = "run" if record else "warm-up"
        print(
            f"  {kind:7s} {tool:8s} {method:9s} {wall:8.2f}s wall {cpu:8.2f}s CPU  "
            f"peak RSS {rss / 2**30:6.2f} GiB (anon {meas.peak_anon_bytes / 2**30:.2f}, "
            f"file {meas.peak_file_bytes / 2**30:.2f})  {status}",
            flush=True,
        )
        if record:
            self.results.append(res)
        return res


def _tensor_locations(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file for any (sharded or not) output directory."""
    loc: dict[str, Path] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            loc.update(dict.fromkeys(h.keys(), f))
    return loc


def compare_outputs(a_dir: Path, b_dir: Path, sample: int = 6) -> dict[str, object]:
    """Compare two merged models: same tensor names, and max |a - b| on a sample of tensors.

    Agreement means every sampled element is within bf16 rounding of the other: |a - b| <=
    2**-7 * |b| + 1e-6 (one bf16 ulp relative), i.e. the two tools computed the same merge.
    """
    la, lb = _tensor_locations(a_dir), _tensor_locations(b_dir)
    names = sorted(set(la) & set(lb))
    only = sorted(set(la) ^ set(lb))
    layer_names = [n for n in names if ".layers." in n]
    picks = [n for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight") if n in names]
    if layer_names:
        step = max(1, len(layer_names) // max(1, sample - len(picks)))
        picks += layer_names[::step][: max(0, sample - len(picks))]
    worst_abs, worst_name, agree = 0.0, "", True
    for n in picks:
        with safe_open(str(la[n]), framework="pt") as h:
            ta = h.get_tensor(n).float()
        with safe_open(str(lb[n]), framework="pt") as h:
            tb = h.get_tensor(n).float()
        if ta.shape != tb.shape:
            agree = False
            worst_name = f"{n} (shape {tuple(ta.shape)} vs {tuple(tb.shape)})"
            break
        diff = (ta - tb).abs()
        m = float(diff.max())
        if m >= worst_abs:
            worst_abs, worst_name = m, n
        if bool((diff > tb.abs() * 2**-7 + 1e-6).any()):
            agree = False
    return {
        "tensors_compared": len(picks),
        "max_abs_diff": worst_abs,
        "worst_tensor": worst_name,
        "names_only_in_one": len(only),
        "agree": agree and not only,
    }


def elsewhere(fn, *args):
    """``fn(*args)`` in a spawned process. Work that grows this process (building the models, loading
    tensors to compare) would be reported by every later child as its own peak RSS: a child started by
    vfork + exec inherits its parent's high-water mark (Linux records the old address space's peak at
    exec). A first run at 48 layers, which built the trio in this process, put every souplm merge at
    3.00 GiB."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(fn, *args).result()


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _fmt(x: float, spec: str, suffix: str = "") -> str:
    return "n/a" if math.isnan(x) else format(x, spec) + suffix


def markdown_table(
    results: list[RunResult], input_bytes: dict[str, int], methods: Sequence[str], tools: Sequence[str]
) -> str:
    """Median wall time, peak RSS, input GB/s and CPU time per tool and method, with ratios."""
    lines = [
        (
            "| method | input GB | souplm s | mergekit s | time ratio (mk/souplm) | souplm peak RSS GiB "
            "| mergekit peak RSS GiB | RSS ratio (mk/souplm) | souplm GB/s | mergekit GB/s "
            "| souplm CPU s | mergekit CPU s | CPU ratio (mk/souplm) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        gb = input_bytes[m] / 1e9
        cells: dict[str, tuple[float, float, float]] = {}
        fails: dict[str, int] = {}
        for t in TOOLS:
            runs = [r for r in results if r.tool == t and r.method == m]
            good = [r for r in runs if r.ok]
            fails[t] = len(runs) - len(good)
            if t in tools and good:
                cells[t] = (
                    _median([r.wall_s for r in good]),
                    _median([r.peak_rss_bytes / 2**30 for r in good]),
                    _median([r.cpu_s for r in good]),
                )
            else:
                cells[t] = (float("nan"), float("nan"), float("nan"))

        shown = {
            t: [("FAILED" if fails[t] and math.isnan(v) else _fmt(v, ".2f")) for v in cells[t]] for t in TOOLS
        }
        ts, tm = cells["souplm"][0], cells["mergekit"][0]
        rs, rm = cells["souplm"][1], cells["mergekit"][1]
        cs, cm = cells["souplm"][2], cells["mergekit"][2]
        lines.append(
            f"| {m} | {gb:.2f} | {shown['souplm'][0]} | {shown['mergekit'][0]} | {_fmt(tm / ts, '.1f', 'x')} "
            f"| {shown['souplm'][1]} | {shown['mergekit'][1]} | {_fmt(rm / rs, '.2f', 'x')} "
            f"| {_fmt(gb / ts, '.3g')} | {_fmt(gb / tm, '.3g')} "
            f"| {shown['souplm'][2]} | {shown['mergekit'][2]} | {_fmt(cm / cs, '.1f', 'x')} |"
        )
    return "\n".join(lines)


def memory_table(results: list[RunResult], methods: Sequence[str], tools: Sequence[str]) -> str:
    """Median sampled peaks of anonymous and file-backed (mmapped input) RSS per tool and method."""
    head = "| method |" + "".join(f" {t} anon GiB | {t} file-backed GiB |" for t in tools)
    lines = [head, "|---|" + "---:|---:|" * len(tools)]
    for m in methods:
        row = f"| {m} |"
        for t in tools:
            good = [r for r in results if r.tool == t and r.method == m and r.ok]
            anon = _median([r.peak_anon_bytes / 2**30 for r in good])
            filed = _median([r.peak_file_bytes / 2**30 for r in good])
            row += f" {_fmt(anon, '.2f')} | {_fmt(filed, '.2f')} |"
        lines.append(row)
    return "\n".join(lines)


def souplm_revision() -> str:
    """souplm's version and the git commit of the checkout this script sits in (if any)."""
    try:
        from souplm import __version__ as version
    except ImportError:
        version = "not importable"
    res = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
        check=False,
        capture_output=True,
        text=True,
    )
    commit = res.stdout.strip() if res.returncode == 0 else "unknown"
    return f"souplm {version} (git {commit})"


def machine_info() -> str:
    """One line describing the CPU, core count, memory and key versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, torch {torch.__version__}"
    )


# --------------------------------------------------------------------------------------------
# Profiling mergekit
# --------------------------------------------------------------------------------------------


def profile_mergekit(bench: Bench, method: str, recipe: Path, top: int = 25) -> str:
    """Run mergekit once under cProfile and return the top functions by own time."""
    assert bench.mergekit_exe is not None
    py = bench.mergekit_exe.parent / "python"
    out = bench.out_dir("mergekit", method + "-profile")
    if out.exists():
        shutil.rmtree(out)
    prof = bench.workdir / "runs" / bench.tag / f"mergekit-{method}.prof"
    cmd = [str(py), "-m", "cProfile", "-o", str(prof), str(bench.mergekit_exe), str(recipe), str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=bench.env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import pstats, sys\n"
        "s = pstats.Stats(sys.argv[1]); s.sort_stats('tottime').print_stats(int(sys.argv[2]))\n"
    )
    res = subprocess.run(
        [str(py), "-c", code, str(prof), str(top)], capture_output=True, text=True, check=True
    )
    return f"mergekit {method} under cProfile: {wall:.1f}s wall (profile: {prof})\n{res.stdout}"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Time whole-process merges: `souplm merge` vs mergekit 0.1.5 on a random Llama trio.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_CACHE / "bench",
        help="cache for generated models, recipes and outputs",
    )
    p.add_argument(
        "--mergekit-venv",
        type=Path,
        default=DEFAULT_CACHE / "mergekit-venv",
        help="virtual environment for mergekit (created once)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model (4 layers, hidden 256, vocab 4096, no warm-up) to check the script itself",
    )
    p.add_argument("--layers", type=int, default=None, help="decoder layers (48 doubles the model)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size")
    p.add_argument(
        "--methods", default=",".join(METHODS),
        help="comma-separated subset of " + ",".join(METHODS + OPTIONAL_METHODS)
    )
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of souplm,mergekit")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per tool and method (median reported)")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed warm-up run of each tool (linear) before timing",
    )
    p.add_argument("--density", type=float, default=0.5, help="density for ties, dare_ties, breadcrumbs*, della* (select_topk for sce)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random models")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--json", type=Path, default=None, help="also write raw per-run results as JSON")
    p.add_argument(
        "--build-only", action="store_true", help="build the models and the mergekit venv, then stop"
    )
    p.add_argument("--keep-outputs", action="store_true", help="keep merged outputs (default: delete)")
    p.add_argument(
        "--outputs", type=Path, default=None,
        help="write both tools' merged outputs (and logs) under this folder, e.g. /dev/shm/bench: a tmpfs takes "
             "the disk's write-back noise out of the ratios (default: WORKDIR/runs)",
    )
    p.add_argument(
        "--profile-mergekit",
        metavar="METHOD",
        default=None,
        help="instead of timing, run mergekit once under cProfile for METHOD and print the top",
    )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for m in args.methods:
        if m not in METHODS + OPTIONAL_METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS + OPTIONAL_METHODS)}")
    for t in args.tools:
        if t not in TOOLS:
            p.error(f"unknown tool {t!r}; choose from {', '.join(TOOLS)}")
    if args.profile_mergekit and args.profile_mergekit not in METHODS:
        p.error(f"--profile-mergekit: unknown method {args.profile_mergekit!r}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def make_spec(args: argparse.Namespace) -> ModelSpec:
    """Model spec from the options (issue-2 defaults, or the tiny --quick model)."""
    if args.quick:
        spec = ModelSpec(hidden=256, layers=4, intermediate=704, vocab=4096, heads=4, seed=args.seed)
    else:
        spec = ModelSpec(seed=args.seed)
    changes = {}
    if args.layers is not None:
        changes["layers"] = args.layers
    if args.hidden is not None:
        changes["hidden"] = args.hidden
    if changes:
        spec = ModelSpec(**{**asdict(spec), **changes})
    return spec


def _orders(tools: Sequence[str], k: int) -> Iterator[str]:
    """Alternate which tool goes first from one (repeat, method) pair to the next."""
    seq = list(tools)
    return iter(seq if k % 2 == 0 else seq[::-1])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    workdir = args.workdir.expanduser().resolve()
    spec = make_spec(args)
    started = _dt.datetime.now().astimezone()
    print(f"model: {spec.tag}, {spec.num_params() / 1e6:.1f}M params per model, bf16", flush=True)
    dirs = elsewhere(build_trio, spec, workdir)
    mk_exe = (
        ensure_mergekit(args.mergekit_venv.expanduser())
        if ("mergekit" in args.tools or args.profile_mergekit)
        else None
    )
    if args.build_only:
        print(f"models: {dirs['base'].parent}\nmergekit: {mk_exe}")
        return 0

    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    recipes = {
        m: write_recipe(m, dirs, workdir / "recipes" / spec.tag / f"{m}.yaml", args.density)
        for m in METHODS + OPTIONAL_METHODS
    }
    bench = Bench(dirs, workdir, find_souplm(), mk_exe, env, spec.tag, outputs=args.outputs)

    if args.profile_mergekit:
        preread([f for m in MODEL_NAMES for f in sorted(dirs[m].glob("*.safetensors"))])
        print(profile_mergekit(bench, args.profile_mergekit, recipes[args.profile_mergekit]))
        return 0

    load_before = os.getloadavg()
    input_bytes = {m: sum(safetensors_bytes(dirs[n]) for n in input_models(m)) for m in METHODS + OPTIONAL_METHODS}
    all_inputs = [f for m in MODEL_NAMES for f in sorted(dirs[m].glob("*.safetensors"))]
    print(byte_compile_souplm(), flush=True)
    print(f"pre-reading {preread(all_inputs) / 1e9:.2f} GB of inputs into the page cache", flush=True)

    warmup = not (args.no_warmup or args.quick)
    if warmup:
        for t in args.tools:
            bench.run(t, args.methods[0], recipes[args.methods[0]], record=False)

    verification: dict[str, object] | None = None
    k = 0
    for r in range(args.repeats):
        for m in args.methods:
            for t in _orders(args.tools, k):
                bench.run(t, m, recipes[m])
            k += 1
            last = r == args.repeats - 1
            if last and m == "linear" and set(TOOLS) <= set(args.tools):
                s_out, m_out = bench.out_dir("souplm", m), bench.out_dir("mergekit", m)
                if s_out.is_dir() and m_out.is_dir():
                    verification = elsewhere(compare_outputs, s_out, m_out)
                    print(f"  linear outputs: {verification}", flush=True)
            if last and m in GEOMETRIC_INPUTS and set(TOOLS) <= set(args.tools):  # the same merge, bf16 rounding
                s_out, m_out = bench.out_dir("souplm", m), bench.out_dir("mergekit", m)
                if s_out.is_dir() and m_out.is_dir():
                    print(f"  {m} outputs: {elsewhere(compare_outputs, s_out, m_out)}", flush=True)
            if not args.keep_outputs:
                for t in args.tools:
                    shutil.rmtree(bench.out_dir(t, m), ignore_errors=True)

    table = markdown_table(bench.results, input_bytes, args.methods, args.tools)
    load_after = os.getloadavg()
    load = (
        f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"(the machine has {os.cpu_count()} cores; other processes running during the benchmark skew both tools)"
    )
    cmd = " ".join(["python", "benchmarks/merge_bench.py", *(sys.argv[1:] if argv is None else argv)])
    report = [
        f"Command: `{cmd}`",
        f"Date: {started.strftime('%Y-%m-%d %H:%M %Z')}",
        f"Machine: {machine_info()}; {load}",
        (
            f"Model: random Llama, {spec.layers} layers, hidden {spec.hidden}, intermediate {spec.intermediate}, "
            f"vocab {spec.vocab}, untied, bf16, {spec.num_params() / 1e6:.1f}M params "
            f"({safetensors_bytes(dirs['base']) / 1e9:.2f} GB per model, {spec.shards} shards)"
        ),
        (
            f"Tools: `souplm merge RECIPE -o OUT` ({souplm_revision()}) vs `mergekit-yaml RECIPE OUT` "
            f"(mergekit {MERGEKIT_VERSION}, default options, CPU); same recipe file, `dtype: bfloat16`; "
            f"median of {args.repeats} run(s), inputs pre-read into the page cache, "
            f"{'one untimed warm-up per tool, ' if warmup else ''}tool order alternated; outputs written under "
            f"{args.outputs or workdir / 'runs'}."
        ),
        "",
        table,
        "",
        (
            "Peak RSS split (sampled every 50 ms from /proc/PID/status): anonymous memory vs file-backed "
            "pages of memory-mapped inputs; both count in peak RSS."
        ),
        "",
        memory_table(bench.results, args.methods, args.tools),
        "",
    ]
    if verification is not None:
        verdict = "agree" if verification["agree"] else "DISAGREE"
        report.append(
            f"linear outputs {verdict}: max |souplm - mergekit| = {verification['max_abs_diff']:.3g} over "
            f"{verification['tensors_compared']} sampled tensors (worst: {verification['worst_tensor']}; "
            f"tensor names only in one output: {verification['names_only_in_one']})."
        )
    failed = [r for r in bench.results if not r.ok]
    for r in failed:
        report.append(
            f"\n{r.tool} {r.method} failed (rc={r.returncode}); log tail:\n```\n{r.stderr_tail}\n```"
        )
    text = "\n".join(report).rstrip() + "\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "spec": asdict(spec),
                    "input_bytes": input_bytes,
                    "verification": verification,
                    "runs": [asdict(r) for r in bench.results],
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

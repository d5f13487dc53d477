"""The merge engine: recipe -> plan -> stream tensors -> write.

Every soup in souplm ends here: hand-written recipes, learned coefficient tables and searched alphas
all become a `Recipe` (+ optional `CoefficientTable`) and run through `merged_tensors`. Two sinks:

- `merge(...)` streams into sharded safetensors in a temporary directory beside the target and
  renames it into place at the end (nothing half-written survives an error or Ctrl-C);
- `soup_into(model, ...)` writes into an existing torch model's parameters, for in-memory sweeps.

Memory is bounded by the largest tensor times the number of inputs (plus one prefetched tensor),
independent of model size.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .arch.layouts import GENERIC, detect_layout
from .coefficients import CoefficientTable
from .errors import SoupError, input_not_finite, output_not_finite
from .io.checkpoint import WEIGHT_SUFFIXES, Checkpoint, file_sha256, open_checkpoint
from .io.output import AtomicDir, check_output, fault, os_error
from .io.pool import BufferPool
from .io.safetensors_file import SafetensorsWriter
from .methods.dare import draw_keys
from .plan import Item, Plan, build_plan
from .recipe import Recipe

if TYPE_CHECKING:
    import torch

# Files copied from the output model besides the weights (those present).
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
)


@dataclass
class MergeReport:
    out_dir: Path | None
    plan: Plan
    seconds: float
    bytes_read: int
    bytes_written: int
    executor: str = ""  # "fused" (C kernels) or "torch"

    def __str__(self) -> str:
        where = self.out_dir if self.out_dir else "(dry run: nothing written)"
        how = f", {self.executor} executor" if self.executor else ""
        return (f"merged {len(self.plan.items)} tensors in {self.seconds:.1f}s "
                f"({self.bytes_read / 1e9:.2f} GB read, {self.bytes_written / 1e9:.2f} GB written{how}) -> {where}")


class Sources:
    """The recipe's input checkpoints (models in order, then the base); optionally held in memory."""

    def __init__(self, recipe: Recipe, in_memory: bool = False):
        self.paths = recipe.all_paths()
        self.mapping = recipe.mapping
        self.notes: list[str] = []
        # A mapping names every tensor of a custom architecture, so an unknown layout is allowed there.
        mapped = recipe.mapping is not None
        self.checkpoints: list[Checkpoint] = [
            open_checkpoint(p, allow_pickle=recipe.allow_pickle, generic_layout=mapped) for p in self.paths
        ]
        if mapped:
            from .arch.mapping import apply_mapping

            # The source (and base) are presented under the target's names, joined or cut on read.
            self.checkpoints, self.notes = apply_mapping(recipe.mapping, self.checkpoints)
        self._memory: dict[tuple[int, str], torch.Tensor] | None = None
        if in_memory:
            self._memory = {(k, n): c.get(n) for k, c in enumerate(self.checkpoints) for n in c.names}

    def get(self, k: int, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """A fresh fp32 copy (methods may work in place on it), on a pooled buffer when `pool` is given."""
        import torch

        ck = self.checkpoints[k]
        if pool is not None and (self._memory is not None or isinstance(ck, Checkpoint)):
            out = pool.empty(ck.shape(name), torch.float32)
            if self._memory is not None:
                return out.copy_(self._memory[(k, name)])
            return ck.read_into(name, out)
        if self._memory is not None:
            return self._memory[(k, name)].clone()
        return ck.get(name)

    def index_for(self, recipe: Recipe) -> list[Checkpoint]:
        paths = recipe.all_paths()
        if paths != self.paths or recipe.mapping != self.mapping:
            raise SoupError("the sources were opened for other models (or another mapping) than this recipe's")
        return self.checkpoints


def open_sources(recipe: Recipe, in_memory: bool = False) -> Sources:
    return Sources(recipe, in_memory=in_memory)


def _load_coefficients(recipe: Recipe, coefficients) -> CoefficientTable | None:
    if coefficients is None and recipe.coefficients:
        coefficients = recipe.coefficients
    if coefficients is None or isinstance(coefficients, CoefficientTable):
        return coefficients
    return CoefficientTable.load(coefficients)


def prepare(recipe: Recipe | str | os.PathLike | dict, coefficients=None, sources: Sources | None = None) -> tuple[Plan, Sources]:
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    table = _load_coefficients(recipe, coefficients)
    sources = sources or open_sources(recipe)
    plan = build_plan(recipe, sources.index_for(recipe), table)
    plan.notes.extend(sources.notes)
    return plan, sources


# -- computing one output tensor ------------------------------------------------------------------
def _finite(t: torch.Tensor, name: str, where: Path) -> torch.Tensor:
    # A finite sum proves every entry finite; only a non-finite sum pays for the exact check.
    import torch

    if t.is_floating_point() and not torch.isfinite(t.sum()) and not bool(torch.isfinite(t).all()):
        raise input_not_finite(name, where)
    return t


def _load_inputs(plan: Plan, sources: Sources, item: Item, pool: BufferPool | None = None):
    if item.copy_from is not None:
        return None
    ck = plan.checkpoints
    tensors = [_finite(sources.get(k, n, pool), n, ck[k].path) for k, n in enumerate(item.inputs)]
    base = None
    if item.base is not None:
        base = _finite(sources.get(plan.base_index, item.base, pool), item.base, ck[plan.base_index].path)
    if item.common_rows is not None:
        tensors = [t[: item.common_rows] for t in tensors]
        base = base[: item.common_rows] if base is not None else None
    return tensors, base


def _compute(plan: Plan, sources: Sources, item: Item, loaded, device: torch.device | None = None) -> torch.Tensor:
    if item.copy_from is not None:  # copied unchanged: finite too
        k, name = item.copy_from
        return _finite(plan.checkpoints[k].get(name, dtype=None), name, plan.checkpoints[k].path)
    tensors, base = loaded
    if device is not None:  # (on "cpu" the moves are no-ops, which is how CI runs this path)
        # The inputs stay on the host's pooled buffers; the method runs on the device and its result comes back.
        tensors = [t.to(device, non_blocking=True) for t in tensors]
        base = base.to(device, non_blocking=True) if base is not None else None
        return _compute_on(plan, sources, item, tensors, base).to("cpu")
    return _compute_on(plan, sources, item, tensors, base)


def _compute_on(plan: Plan, sources: Sources, item: Item, tensors, base) -> torch.Tensor:
    import torch

    dev = tensors[0].device
    kwargs = {k: torch.tensor(v, device=dev) for k, v in item.model_params.items()}
    kwargs.update({k: v for k, v in item.global_params.items() if v is not None})
    if plan.method.random:
        kwargs["keys"] = draw_keys(plan.recipe.seed, item.canonical, len(item.inputs))
    out = plan.method.fn(tensors, base, **kwargs)
    if item.extra_from is not None:
        k, name = item.extra_from
        extra = sources.get(k, name)[item.common_rows :]
        out = torch.cat([out, extra.to(device=out.device, dtype=out.dtype)])
    out = out.to(item.dtype.torch)
    if not bool(torch.isfinite(out.sum(dtype=torch.float32))) and not bool(torch.isfinite(out).all()):
        raise output_not_finite(item.out_name, item.dtype.torch_name)  # overflow or the final cast
    return out


def merged_tensors(
    recipe: Recipe | str | os.PathLike | dict,
    *,
    coefficients=None,
    sources: Sources | None = None,
    plan: Plan | None = None,
    progress=None,
    device: str | None = None,
) -> Iterator[tuple[Item, torch.Tensor]]:
    """Yield (plan item, merged tensor) in plan order; the next item's inputs load in a thread meanwhile.

    `device` (e.g. "cuda") runs each method on that device, one tensor at a time; the yielded tensors are on the CPU.
    """
    dev = resolve_device(device)
    if plan is None:
        plan, sources = prepare(recipe, coefficients, sources)
    # Input copies and the methods' temporaries live on reused buffers (io/pool.py): fresh pages for
    # every tensor cost about as much CPU time as the merge arithmetic itself.
    buffers = BufferPool()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="souplm-read") as pool:
        pending: Future | None = None
        items = plan.items
        for idx, item in enumerate(items):
            loaded = pending.result() if pending is not None else _load_inputs(plan, sources, item, buffers)
            pending = (pool.submit(_load_inputs, plan, sources, items[idx + 1], buffers)
                       if idx + 1 < len(items) else None)
            with buffers.scope() as temporaries:
                out = _compute(plan, sources, item, loaded, dev)
            if loaded is not None:
                for t in [*loaded[0], loaded[1], *temporaries]:
                    if t is not None:
                        buffers.give(t, keep_alive=out)
            if progress is not None:
                progress.update(item.read_bytes)
            yield item, out


def resolve_device(device: str | None) -> torch.device | None:
    """The torch device for `--device`, checked before any tensor is read (None: the host, any executor)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SoupError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SoupError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SoupError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise SoupError(f"--device {device}: only cpu and cuda are supported")
    return dev


# -- sink 1: a checkpoint directory ---------------------------------------------------------------
def merge(
    recipe: Recipe | str | os.PathLike | dict,
    out_dir: str | os.PathLike,
    *,
    coefficients: CoefficientTable | str | os.PathLike | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    hash_inputs: bool = True,
    device: str | None = None,
    protect: Sequence[str | os.PathLike] = (),
) -> MergeReport:
    """Merge per `recipe` into `out_dir` (a model directory transformers loads).

    `device` ("cuda", "cuda:1", "cpu"): run the methods there with the torch executor, streaming one tensor at a
    time as on the host (mergekit's `--cuda`); None picks the fused C kernels when they cover the plan.

    The output is built beside `out_dir` and put in place atomically (souplm/io/output.py); it may not be,
    hold or lie inside an input (`protect`: more input files, e.g. the recipe file, whose folder is kept
    too). `force` replaces a non-empty `out_dir` (exchanged, then the old one removed). Every input file's
    sha256 goes into the model card, and an input that changes while the merge runs fails it.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if not isinstance(recipe, Recipe):
        if not isinstance(recipe, dict):
            protect = [*protect, recipe]
        recipe = Recipe.load(recipe)
    out_dir = Path(out_dir)
    # No output may overwrite an input (with or without --force): models, tables, specs, the recipe's folder.
    protected = [p for p in (coefficients, recipe.coefficients, recipe.mapping) if isinstance(p, (str, os.PathLike))
                 and Path(p).exists()]
    recipe_files = [Path(p) for p in protect]
    check_output(out_dir, inputs=recipe.all_paths(), files=[*protected, *recipe_files],
                 folders=[p.parent for p in recipe_files], what="output directory")
    target = AtomicDir(out_dir, force=force)
    if not dry_run:
        target.check()
    inputs = _input_files(recipe, [*protected, *recipe_files])
    before = {f: _fingerprint(f) for f in inputs}
    plan, sources = prepare(recipe, coefficients)
    if dry_run:
        return MergeReport(None, plan, time.perf_counter() - t0, 0, 0)
    if not plan.output.config:
        print(f"souplm: warning: the output model {plan.output.path} has no config.json, so neither has "
              f"{out_dir}: transformers will not load it until you add one", file=sys.stderr)

    hasher = ThreadPoolExecutor(max_workers=1) if hash_inputs else None
    hashes = {f: hasher.submit(file_sha256, f) for f in inputs} if hasher else {}
    previous = _sigterm_as_interrupt()
    try:
        tmp = target.open()
        try:
            written, executor = _write_shards(plan, sources, tmp, progress, dev)
            fault("write")  # (tests: a disk-full error, which names no file, as a real one would)
            _write_side_files(plan, tmp, {f: h.result() for f, h in hashes.items()})
            _check_unchanged(before)
        except OSError as e:
            raise os_error(e, path=out_dir) from None
        target.commit()
    except BaseException:
        target.abort()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if hasher:
            hasher.shutdown(cancel_futures=True)
        for c in sources.checkpoints:
            c.close()
    return MergeReport(out_dir, plan, time.perf_counter() - t0, plan.read_bytes, written, executor)


def _input_files(recipe: Recipe, extra: Sequence[Path]) -> list[Path]:
    """Every file the merge reads: each model's weights, index and config, then tables, specs, the recipe."""
    files: list[Path] = []
    for p in dict.fromkeys(recipe.all_paths()):
        path = Path(p).absolute()
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.is_file() and (
                f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json") or f.name == "config.json"))
        elif path.is_file():
            files.append(path)
    files += [Path(f).absolute() for f in extra]
    return list(dict.fromkeys(files))


def _fingerprint(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _check_unchanged(before: dict[Path, tuple[int, ...] | None]) -> None:
    """Fail when an input was rewritten, replaced or removed while the merge read it (ctime cannot be faked)."""
    for f, fp in before.items():
        if _fingerprint(f) != fp:
            raise SoupError(f"input {f} changed while the merge was reading it (rewritten, replaced or removed); "
                            "nothing was written: run the merge again once the inputs are stable")


def _sigterm_as_interrupt():
    """Treat SIGTERM like Ctrl-C so the temp directory is cleaned up (main thread only)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_shards(plan: Plan, sources: Sources, tmp: Path, progress: bool,
                  device: torch.device | None = None) -> tuple[int, str]:
    """Stream the merged tensors into shards; returns the bytes written and the executor that ran."""
    from tqdm.auto import tqdm

    from . import fused

    by_shard: dict[int, list[Item]] = {}
    for it in plan.items:
        by_shard.setdefault(it.shard, []).append(it)
    writers = {
        s: SafetensorsWriter(tmp / _shard_name(s, plan.n_shards), [(i.out_name, i.dtype, i.shape) for i in items],
                             metadata={"format": "pt", "souplm": __version__})
        for s, items in by_shard.items()
    }
    bar = tqdm(total=plan.read_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress, leave=False)
    # The fused kernels when they cover the plan (no torch import at all), else the torch executor.
    executor = "torch" if device is not None or fused.covers(plan) else "fused"
    try:
        if executor == "fused":
            # Each tensor is written in a thread while the next one is computed (the fused stream keeps a
            # buffer valid for one more item); one write at a time keeps the shards in order.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="souplm-write") as writer:
                written: Future | None = None
                for item, data in fused.merged_buffers(plan, progress=bar):
                    if written is not None:
                        written.result()
                    written = writer.submit(writers[item.shard].write_bytes, item.out_name, data)
                if written is not None:
                    written.result()
        else:
            for item, tensor in merged_tensors(plan.recipe, plan=plan, sources=sources, progress=bar,
                                               device=None if device is None else str(device)):
                writers[item.shard].write(item.out_name, tensor)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    if plan.n_shards > 1:
        index = {
            "metadata": {"total_size": plan.write_bytes},
            "weight_map": {i.out_name: _shard_name(i.shard, plan.n_shards) for i in plan.items},
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(w.total_bytes for w in writers.values()), executor


def _write_side_files(plan: Plan, tmp: Path, hashes: dict[Path, str]) -> None:
    src_dir = plan.output.path if plan.output.path.is_dir() else plan.output.path.parent
    for name in SIDE_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, tmp / name)
    config = dict(plan.output.config)
    if config:
        _patch_config(config, plan)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "souplm_recipe.yaml").write_text(plan.saved_recipe.to_yaml())
    if plan.recipe.mapping is not None:
        from .arch.mapping import load_mapping

        # The spec as used, beside the recipe that names it (a spec file may change or move later).
        (tmp / "souplm_mapping.yaml").write_text(load_mapping(plan.recipe.mapping).text)
    if plan.coefficients is not None:
        plan.coefficients.save(tmp / "souplm_coefficients.json")
    (tmp / "README.md").write_text(_model_card(plan, hashes))


def _patch_config(config: dict, plan: Plan) -> None:
    """Keep config.json true to the written weights: dtype and (after extend/truncate) vocab size."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for it in plan.items:
        if it.canonical == "model.embed_tokens.weight" and text.get("vocab_size") not in (None, it.shape[0]):
            text["vocab_size"] = it.shape[0]
    if plan.recipe.dtype:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "dtype":
                config[key] = plan.recipe.dtype


def _model_card(plan: Plan, hashes: dict[Path, str]) -> str:
    r = plan.recipe
    lines = [*_front_matter(plan), "",
        f"# Merged with souplm {__version__}", "",
        f"Method: `{r.merge_method}` ({plan.method.reference or 'souplm'}).", "",
        "| role | model | parameters |", "|---|---|---|",
    ]
    for i, s in enumerate(r.models):
        lines.append(f"| model {i} | `{s.model}` | {_params_text(s.parameters)} |")
    if r.base_model:
        lines.append(f"| base | `{r.base_model}` | |")
    lines += ["", f"Output layout, config and tokenizer from `{plan.output.path}`.", ""]
    if plan.coefficients is not None:
        lines.append(f"Per-unit coefficients: {len(plan.coefficients.coefficients)} entries, in `souplm_coefficients.json`.\n")
    lines += [f"- {n}" for n in plan.notes]
    lines += ["", "## Input files", ""]
    if hashes:
        lines += [("The sha256 of every file the merge read, as `sha256sum` prints it (the merge checked that "
                   "none changed while it ran); check them with `sha256sum -c`:"), "", "```"]
        lines += [f"{h}  {f}" for f, h in hashes.items()]
        lines += ["```"]
    else:
        lines.append("Not hashed (merged with --no-hash).")
    lines += ["", ("Recipe (`souplm_recipe.yaml`), to reproduce: `souplm merge path/to/this/folder/souplm_recipe.yaml "
                   "-o OUT` (from any directory: its model paths are absolute, its other files beside it)"), "",
              "```yaml", plan.saved_recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def _front_matter(plan: Plan) -> list[str]:
    """The Hub's model-card metadata: the inputs as `base_model`, souplm as the library, merge tags."""
    import json

    r = plan.recipe
    inputs = list(dict.fromkeys([*(s.model for s in r.models), *([r.base_model] if r.base_model else [])]))
    tags = list(dict.fromkeys(["merge", "souplm", r.merge_method]))
    # JSON strings are YAML strings: paths and Hub ids with ':' or '#' stay one scalar each.
    return ["---", "base_model:", *(f"- {json.dumps(str(m))}" for m in inputs), "library_name: souplm",
            "tags:", *(f"- {json.dumps(t)}" for t in tags), "---"]


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


# -- sink 2: an in-memory model ---------------------------------------------------------------------
def soup_into(model: torch.nn.Module, recipe, *, coefficients=None, sources: Sources | None = None) -> Plan:
    """Write the merged weights into `model`'s parameters in place (no checkpoint, no reallocation).

    Names are matched through layouts, so the LM of a transformers-5 LLaVA in memory
    (`model.language_model.*`) receives the tensors the plan names in the checkpoint's own layout.
    """
    import torch

    state = model.state_dict(keep_vars=True)
    plan, sources = prepare(recipe, coefficients, sources)
    # A mapped merge may target a custom architecture: its parameters carry the checkpoint's names.
    layout = detect_layout(state, where=type(model).__name__, fallback=GENERIC if plan.recipe.mapping else None)
    with torch.no_grad():
        for item, tensor in merged_tensors(recipe, plan=plan, sources=sources):
            key = _param_key(item, layout, state)
            if key not in state:
                raise SoupError(f"model {type(model).__name__} has no parameter for {item.out_name} (looked for {key})")
            target = state[key]
            if tuple(target.shape) != tuple(tensor.shape):
                raise SoupError(f"{key}: model has shape {list(target.shape)}, merge gives {list(tensor.shape)}")
            target.data.copy_(tensor)
    return plan


def _param_key(item: Item, layout, state: dict) -> str:
    """The model's parameter for a plan item: through the layout for LM tensors, else by name."""
    if item.canonical:
        try:
            key = layout.from_canonical(item.canonical)
        except SoupError:  # a mapped tensor outside the model's LM (canonical = its stored name)
            key = None
        if key in state:
            return key
    return _extra_key(item.out_name, state)


def _extra_key(name: str, state: dict) -> str:
    """Non-LM tensors: checkpoints may use the older LLaVA names (`vision_tower.*`), models the newer."""
    for cand in (name, f"model.{name}", name.removeprefix("model.")):
        if cand in state:
            return cand
    return name

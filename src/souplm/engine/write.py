"""Step 4, the sinks: merged tensors written as a checkpoint directory, or into an in-memory model.

Two sinks for the tensors an executor yields:

- `merge(...)` streams into sharded safetensors in a temporary directory beside the target and
  renames it into place at the end (nothing half-written survives an error or Ctrl-C);
- `soup_into(model, ...)` writes into an existing torch model's parameters, for in-memory sweeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..arch.layouts import GENERIC, detect_layout
from ..errors import SoupError
from ..io.checkpoint import WEIGHT_SUFFIXES, file_sha256
from ..io.output import AtomicDir, check_output, fault, os_error
from ..io.safetensors_file import SafetensorsWriter, tensor_bytes
from . import execute_fused
from .coefficients import CoefficientTable
from .execute_torch import merged_tensors, resolve_device
from .plan import Item, Plan
from .recipe import Recipe
from .sources import Sources, prepare
from .tokenizer import wants_tokenizer, write_tokenizer

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

    by_shard: dict[int, list[Item]] = {}
    for it in plan.items:
        by_shard.setdefault(it.shard, []).append(it)
    writers = {
        s: SafetensorsWriter(tmp / _shard_name(s, plan.n_shards), [(i.out_name, i.dtype, i.shape) for i in items],
                             metadata={"format": "pt", "souplm": __version__})
        for s, items in by_shard.items()
    }
    bar = tqdm(total=plan.read_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress, leave=False)
    executor, _ = executor_for(plan, device)
    if executor == "fused":
        stream = execute_fused.merged_buffers(plan, progress=bar)
    else:
        stream = ((item, tensor_bytes(tensor)) for item, tensor in merged_tensors(
            plan.recipe, plan=plan, sources=sources, progress=bar, device=None if device is None else str(device)))
    try:
        # Each tensor is written in a thread while the next one is computed (the fused stream keeps a buffer
        # valid for one more item; the torch stream's outputs are not pooled); one write at a time keeps the
        # shards in order.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="souplm-write") as writer:
            written: Future | None = None
            for item, data in stream:
                if written is not None:
                    written.result()
                written = writer.submit(writers[item.shard].write_bytes, item.out_name, data)
            if written is not None:
                written.result()
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


def executor_for(plan: Plan, device=None) -> tuple[str, str]:
    """Which executor runs the plan ("fused" or "torch") and a line saying why: the fused C kernels when
    nothing blocks them (no torch import at all), else torch; a `device` always means torch."""
    if device is not None:
        return "torch", f"torch (on {device})"
    blocker = execute_fused.fused_blocker(plan)
    return ("fused", "fused C kernels") if blocker is None else ("torch", f"torch ({blocker})")


def _write_side_files(plan: Plan, tmp: Path, hashes: dict[Path, str]) -> None:
    src_dir = plan.output.path if plan.output.path.is_dir() else plan.output.path.parent
    for name in SIDE_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, tmp / name)
    write_tokenizer(plan, tmp)  # a built tokenizer or a chat_template replaces the copied tokenizer files
    config = json.loads(json.dumps(plan.output.config))  # a deep copy: the checkpoint's own stays as read
    if config:
        _patch_config(config, plan)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "souplm_recipe.yaml").write_text(plan.saved_recipe.to_yaml())
    if plan.recipe.mapping is not None:
        from ..arch.mapping import load_mapping

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
    text.update(plan.config_updates)  # slices: the stacked layers' count and per-layer lists (layer_types, ...)
    written = plan.recipe.out_dtype or plan.recipe.dtype  # (mergekit's config: out_dtype, else dtype)
    if written:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "dtype":
                config[key] = written


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
    tok = ("tokenizer as the recipe's tokenizer keys built it (notes below)" if wants_tokenizer(r)
           else "tokenizer" + (" with the recipe's chat_template" if r.chat_template else ""))
    lines += ["", f"Output layout and config from `{plan.output.path}`; {tok}.", ""]
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

"""`--backend lm-eval`: run lm-evaluation-harness tasks on a local model dir through its Python API.

lm-eval is optional (`pip install lm-eval==0.4.13`). A `--task` value is either a task name lm-eval
knows, or a path to an lm-eval task YAML; the YAML's folder becomes an include path, so a task can
point at local jsonl files (`dataset_path: json`, `dataset_kwargs: {data_files: {test: ...}}`) and
run with no network. Results come back in the same shape as the native runner's and go through
the same cache, keyed by (model content hash, task, lm-eval version + task file hash, limit).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import SoupError
from ..yamlfile import BoundedSafeLoader, load_yaml, read_text_bounded
from .cache import ResultCache, as_cache, model_hash

LM_EVAL_PIN = "lm-eval==0.4.13"
# lm-eval metrics where lower is better; everything else it reports is higher-is-better.
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity", "ter"}


def _missing() -> SoupError:
    return SoupError(f"--backend lm-eval needs lm-evaluation-harness: pip install {LM_EVAL_PIN} (or souplm[lm-eval])")


def import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise _missing() from None
    return lm_eval


def quiet_git_hash() -> str | None:
    """lm-eval's record of the git commit it runs from (`git describe --always` in the working directory),
    with git's own stderr dropped: outside a repository git prints "fatal: not a git repository", which
    tells a souplm user nothing. Outside a repository (or without git) the hash is None, as lm-eval's
    fallback then finds none either."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return out.stdout.decode().strip()


@contextmanager
def quiet_lm_eval_git() -> Iterator[None]:
    """While lm-eval evaluates, its git-hash lookup is `quiet_git_hash` (its other output is untouched)."""
    import importlib

    try:
        evaluator = importlib.import_module("lm_eval.evaluator")
    except ImportError:
        evaluator = None
    old = getattr(evaluator, "get_git_commit_hash", None)
    if old is None:
        yield
        return
    evaluator.get_git_commit_hash = quiet_git_hash  # type: ignore[union-attr]
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = old  # type: ignore[union-attr]


def lm_eval_version() -> str:
    """Installed lm-eval version, read from package metadata: importing lm-eval takes seconds."""
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise _missing() from None


def resolve_task(spec: str) -> tuple[str, Path | None, str]:
    """(lm-eval task name, include path or None, version fingerprint) for a name or a task YAML."""
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise SoupError(f"lm-eval task file not found: {path}")
        text = read_text_bounded(path, "lm-eval task file")
        # lm-eval YAMLs may use `!function` tags; a plain safe_load would fail on them.
        data = load_yaml(text, str(path), loader=_LenientLoader)
        if not isinstance(data, dict) or not data.get("task"):
            raise SoupError(f"{path}: an lm-eval task YAML needs a 'task:' name")
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return str(data["task"]), path.resolve().parent, digest
    return spec, None, "registry"


class _LenientLoader(BoundedSafeLoader):
    """SafeLoader that reads unknown tags (lm-eval's `!function`) as plain strings."""


_LenientLoader.add_multi_constructor("!", lambda loader, suffix, node: str(getattr(node, "value", "")))


def _metrics(raw: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": ...} -> {"acc": 0.5, "acc_stderr": ...}."""
    out: dict[str, float] = {}
    for k, v in raw.items():
        if k in ("alias", "sample_len") or k.startswith("sample_len,") or not isinstance(v, (int, float)):
            continue
        name, _, filt = k.partition(",")
        out[name if filt in ("", "none") else f"{name}[{filt}]"] = float(v)
    return out


def headline(metrics: dict[str, float], config: Any) -> str | None:
    """The task's first listed metric (its `metric_list` order), else lm-eval's first reported one."""
    listed = config.get("metric_list") if isinstance(config, dict) else None
    for entry in listed or []:
        name = entry.get("metric") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in metrics:
            return name
    return next((m for m in metrics if "stderr" not in m), None)


def evaluate_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    cache: ResultCache | str | Path | bool | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run lm-eval tasks on a local model dir; returns the native runner's report shape."""
    version = lm_eval_version()  # fails early, with the install command, when lm-eval is missing
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SoupError(f"{model_dir}: not a model directory (no config.json)")
    store = as_cache(cache)
    key = model_hash(model_dir) if store else str(model_dir)
    resolved = [resolve_task(t) for t in tasks]
    results: dict[str, Any] = {}
    todo = []
    for name, include, digest in resolved:
        v = f"lm-eval{version}+{digest}"
        hit = store.get(key, name, v, limit) if store else None
        if hit is not None:
            results[name] = {**hit, "cached": True}
        else:
            todo.append((name, include, v))
    if todo:
        lm_eval = import_lm_eval()  # only now: a fully cached rerun never pays for the import
        from lm_eval.tasks import TaskManager

        includes = sorted({str(inc) for _, inc, _ in todo if inc is not None})
        manager = TaskManager(include_path=includes or None)
        import torch

        with quiet_lm_eval_git():
            out = lm_eval.simple_evaluate(
                model="hf",
                model_args=f"pretrained={model_dir},dtype={dtype}",
                tasks=[n for n, _, _ in todo],
                limit=limit,
                batch_size=batch_size,
                device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                task_manager=manager,
            )
        for name, _, v in todo:
            raw = out["results"].get(name)
            if raw is None:
                raise SoupError(f"lm-eval returned no result for task {name}")
            metrics = _metrics(raw)
            primary = headline(metrics, out.get("configs", {}).get(name))
            if primary is None:
                raise SoupError(f"lm-eval task {name} reported no metric")
            n = out.get("n-samples", {}).get(name, {})
            result = {
                "task": name, "kind": "lm-eval", "version": v, "limit": limit,
                "n": int(n.get("effective", 0)) if isinstance(n, dict) else 0,
                "metrics": metrics, "primary": primary,
                "higher_is_better": primary.split("[")[0] not in LOWER_IS_BETTER,
                "score": metrics[primary],
            }
            if store:
                store.put(key, name, v, limit, result)
            results[name] = {**result, "cached": False}
    return {"model": str(model_dir), "model_key": key, "results": results}

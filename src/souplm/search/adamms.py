"""AdaMMS search (Du et al., CVPR 2025): choose the mixing coefficient of a heterogeneous merge without labels.

    soup(alpha) = (1 - alpha) * target + alpha * source      (source read through a mapping spec)

For every alpha of a grid the merged weights are written into one in-memory copy of the target
(`souplm.engine.soup_into`, the bases read once), the model answers a sample of unlabeled inputs
greedily (text, or image + text for LLaVA-style models), and each interior alpha is scored by how much
its answers differ from its neighbours' (`consistency.py`). The alpha of least difference is chosen and
written through `souplm.engine.merge`. With a labelled check task, every alpha is also evaluated with
`souplm.evaluate`, and the report says how close the unsupervised choice came to the supervised best.

    from souplm.search.adamms import adamms_search
    res = adamms_search("cogvlm", "llava", "0.4:1.0:0.1", "unlabeled.jsonl", mapping="llama-to-cogvlm",
                        out_dir="out/adamms")
    res.chosen
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed as D
from ..errors import SoupError
from .consistency import (
    CHANGED,
    CRITERIA,
    METRICS,
    changed_count_curve,
    choose_alpha,
    chooser,
    difference_curve,
    minilm_embedder,
    minima,
)

PROMPT_FIELDS = ("prompt", "question", "text", "input")


# -- recipes ---------------------------------------------------------------------------------------------
def adamms_recipe(
    target: str | Path, source: str | Path, alpha: float, mapping: str | dict | None = None, *,
    method: str = "linear", base_model: str | Path | None = None, **fields: Any,
) -> Any:
    """The recipe of one candidate: weights (1 - alpha) for the target and alpha for the source."""
    from ..engine.recipe import Recipe

    return Recipe.from_models([str(target), str(source)], method, [1.0 - alpha, alpha],
                              base_model=None if base_model is None else str(base_model), mapping=mapping, **fields)


# -- unlabeled inputs -------------------------------------------------------------------------------------
def load_inputs(
    path: str | Path, *, template: str | None = None, image_field: str = "image", sample: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of a jsonl file as {"prompt", "image" (a Path or None)}, optionally a seeded sample of them.

    The prompt is `template` formatted with the row, else the first of prompt/question/text/input; an
    image row with only a question gets LLaVA's `<image>` placeholder in front, as souplm's vqa tasks do.
    Image paths are relative to the jsonl file.
    """
    path = Path(path)
    if not path.is_file():
        raise SoupError(f"inputs file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SoupError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SoupError(f"{path}:{n}: a row must be a JSON object")
        rows.append((n, row))
    if not rows:
        raise SoupError(f"{path}: no inputs")
    if sample is not None and sample < len(rows):
        if sample < 1:
            raise SoupError(f"--sample must be at least 1, not {sample}")
        keep = sorted(random.Random(seed).sample(range(len(rows)), sample))
        rows = [rows[i] for i in keep]
    return [_input(path, n, row, template, image_field) for n, row in rows]


def _input(path: Path, n: int, row: dict, template: str | None, image_field: str) -> dict[str, Any]:
    image = row.get(image_field)
    image_path = None
    if image:
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
    if template is not None:
        try:
            prompt = template.format(**row)
        except (KeyError, IndexError, ValueError) as e:
            raise SoupError(f"{path}:{n}: prompt template {template!r} does not fit the row ({e})") from None
    else:
        key = next((k for k in PROMPT_FIELDS if k in row), None)
        if key is None:
            raise SoupError(f"{path}:{n}: no prompt field (one of {', '.join(PROMPT_FIELDS)}); or pass a template")
        prompt = str(row[key])
        if image_path is not None and key != "prompt" and "<image>" not in prompt:
            prompt = "<image>\n" + prompt
    return {"prompt": prompt, "image": image_path}


# -- the model being re-souped ---------------------------------------------------------------------------
def hf_loader(path: str | Path, *, device: str | None = None, dtype: str = "float32", batch_size: int = 8,
              progress: bool = False) -> Any:
    """A transformers model dir (causal LM or LLaVA) behind souplm's LanguageModel interface."""
    from ..evaluate.lm import HFModel, load_model

    model, tok, proc = load_model(path, device=device, dtype=dtype)
    return HFModel(model, tok, proc, batch_size=batch_size, progress=progress)


def resolve_loader(loader: str | Callable | None) -> Callable[..., Any]:
    """A loader callable, `module:function`, or None for transformers models.

    A loader takes the model dir plus keyword options (device, dtype, batch_size, progress) and returns
    an object with `.model` (the torch module souped into) and `generate` / `generate_vqa` as in
    `souplm.evaluate.lm.LanguageModel`; custom architectures (a CogVLM-style model) bring their own.
    """
    if loader is None:
        return hf_loader
    if callable(loader):
        return loader
    mod, _, fn = str(loader).partition(":")
    if not mod or not fn:
        raise SoupError(f"--loader {loader!r}: expected module:function")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise SoupError(f"--loader {loader!r}: {e}") from None


def generate_responses(lm: Any, inputs: Sequence[dict[str, Any]], images: dict[Path, Any], *, max_new_tokens: int,
                       stop: Sequence[str], chat_template: bool) -> list[str]:
    """Greedy answers in input order: text rows in one batched call, image rows in another."""
    out: list[str] = [""] * len(inputs)
    text = [i for i, r in enumerate(inputs) if r["image"] is None]
    vis = [i for i, r in enumerate(inputs) if r["image"] is not None]
    if text:
        got = lm.generate([inputs[i]["prompt"] for i in text], max_new_tokens, list(stop), chat_template=chat_template)
        for i, g in zip(text, got, strict=True):
            out[i] = g
    if vis:
        got = lm.generate_vqa([inputs[i]["prompt"] for i in vis], [images[inputs[i]["image"]] for i in vis],
                              max_new_tokens, list(stop), chat_template=chat_template)
        for i, g in zip(vis, got, strict=True):
            out[i] = g
    return out


def _read_images(inputs: Sequence[dict[str, Any]]) -> dict[Path, Any]:
    paths = {r["image"] for r in inputs if r["image"] is not None}
    if not paths:
        return {}
    from PIL import Image

    images = {}
    for p in sorted(paths):
        try:
            with Image.open(p) as im:
                images[p] = im.convert("RGB")
        except OSError:
            raise SoupError(f"cannot read image {p}") from None
    return images


# -- the result ------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """The difference curve, the chosen alpha and, with a check task, the supervised comparison."""

    target: str
    source: str
    mapping: str | dict | None
    alphas: list[float]
    metric: str
    smooth: int
    differences: dict[str, dict[float, float]]  # metric -> interior alpha -> D
    chosen: float
    responses: dict[float, list[str]]
    prompts: list[str]
    check: dict[str, Any] | None = None
    model_dir: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    criterion: str = "mean"  # "adamms" (the authors' count) or "mean" (souplm's first criterion)
    minima: list[float] = field(default_factory=list)  # every alpha at the least (smoothed) value
    alternatives: dict[str, float] = field(default_factory=dict)  # the choice of each criterion, same answers

    @property
    def chooser(self) -> str:
        """The key of the curve that chose alpha (`differences[chooser]`)."""
        return chooser(self.criterion, self.metric)

    @property
    def interior(self) -> list[float]:
        return self.alphas[1:-1]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for a in self.alphas:
            row: dict[str, Any] = {"alpha": a}
            for m, curve in self.differences.items():
                row[f"D_{m}"] = curve.get(a, float("nan"))
            if self.check:
                row[self.check["task"]] = self.check["scores"][a]
            row["chosen"] = int(a == self.chosen)
            out.append(row)
        return out

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        rows = self.rows()
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path

    def summary(self) -> list[str]:
        what = ("inputs whose answer differs from either neighbour's (AdaMMS's criterion, exact match)"
                if self.chooser == CHANGED else f"{self.metric} difference"
                + (" (AdaMMS's criterion)" if self.criterion == "adamms" else " (mean of the two neighbours)"))
        how = f"least {what}" + (f", smoothed over ±{self.smooth}" if self.smooth else "")
        lines = [(f"chosen alpha (weight of the source): {self.chosen:g} ({how}); "
                 f"as a merge: souplm merge --model TARGET --model SOURCE --alpha {round(1 - self.chosen, 10):g} "
                 "(merge --alpha is the FIRST model's share, here the target's)")]
        if len(self.minima) > 1:
            lines.append("every alpha at the minimum: " + ", ".join(f"{a:g}" for a in self.minima)
                         + " (the chosen one is the middle of the longest run of them)")
        if self.alternatives:
            lines.append("choice of each criterion on the same answers: "
                         + ", ".join(f"{k} {v:g}" for k, v in self.alternatives.items()))
        c = self.check
        if c:
            arrow = "higher" if c["higher_is_better"] else "lower"
            lines.append(
                f"check task {c['task']} ({c['primary']}, {arrow} is better): the chosen alpha scores "
                f"{c['chosen_score']:.4f}; the best interior alpha {c['best_interior_alpha']:g} scores "
                f"{c['best_interior_score']:.4f} (gap {c['gap']:.4f}, rank {c['rank']} of {len(self.interior)}); "
                f"best over the whole grid: alpha {c['best_alpha']:g} = {c['best_score']:.4f}. "
                + ("The unsupervised choice agrees with the supervised best." if c["agree"]
                   else "The unsupervised choice differs from the supervised best.")
            )
        return lines

    def to_markdown(self) -> str:
        metrics = list(self.differences)
        head = ["alpha (source weight)"] + [f"D {m} ↓" for m in metrics]
        if self.check:
            head.append(f"{self.check['task']} ({self.check['primary']} {'↑' if self.check['higher_is_better'] else '↓'})")
        lines = ["| " + " | ".join(head) + " |", "|---:" * len(head) + "|"]
        for a in self.alphas:
            cells = [f"**{a:g}** (chosen)" if a == self.chosen else f"{a:g}"]
            for m in metrics:
                d = self.differences[m].get(a)
                cells.append("–" if d is None else f"{d:g}" if m == CHANGED else f"{d:.4f}")
            if self.check:
                s = self.check["scores"][a]
                cells.append(f"**{s:.4f}**" if a == self.check["best_alpha"] else f"{s:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Target `{self.target}`, source `{self.source}`"
                  + (f", mapping `{_spec_name(self.mapping)}`" if self.mapping else "")
                  + f"; soup = (1 - alpha) * target + alpha * source; {len(self.prompts)} unlabeled inputs. "
                  "D: mean difference of an alpha's answers from its two neighbours' (endpoints have none); "
                  f"D {CHANGED}: how many inputs' answers differ from either neighbour's."
                  + (" Bold score: best alpha with labels." if self.check else ""), ""]
        lines += [f"- {s}" for s in self.summary()]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target, "source": self.source, "mapping": self.mapping, "alphas": self.alphas,
            "metric": self.metric, "smooth": self.smooth, "chosen": self.chosen, "criterion": self.criterion,
            "minima": self.minima, "alternatives": self.alternatives,
            "differences": {m: {str(a): d for a, d in c.items()} for m, c in self.differences.items()},
            "check": None if self.check is None else {
                **self.check, "scores": {str(a): s for a, s in self.check["scores"].items()}},
            "model_dir": self.model_dir, "n_inputs": len(self.prompts), "timings": self.timings,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SearchResult:
        """The result `to_json` wrote (answers and prompts are kept in responses.jsonl, not here)."""
        check = d.get("check")
        if check is not None:
            check = {**check, "scores": {float(a): v for a, v in check["scores"].items()}}
        return cls(target=d["target"], source=d["source"], mapping=d["mapping"],
                   alphas=[float(a) for a in d["alphas"]], metric=d["metric"], smooth=d["smooth"],
                   differences={m: {float(a): v for a, v in c.items()} for m, c in d["differences"].items()},
                   chosen=float(d["chosen"]), responses={}, prompts=[], check=check,
                   model_dir=d.get("model_dir"), timings=d.get("timings", {}),
                   criterion=d.get("criterion", "mean"), minima=[float(a) for a in d.get("minima", [])],
                   alternatives={k: float(v) for k, v in d.get("alternatives", {}).items()})


def _spec_name(mapping: str | dict) -> str:
    return str(mapping.get("name", "inline spec")) if isinstance(mapping, dict) else str(mapping)


def compare_with_labels(task: str, primary: str, higher_is_better: bool, scores: dict[float, float],
                        chosen: float) -> dict[str, Any]:
    """How the unsupervised choice fares on a labelled task: gap to the best and rank among candidates."""
    sign = 1.0 if higher_is_better else -1.0
    alphas = sorted(scores)
    interior = alphas[1:-1]

    def key(a: float) -> float:
        s = scores[a]
        return -math.inf if math.isnan(s) else sign * s

    best = max(alphas, key=key)
    best_in = max(interior, key=key)
    ranked = sorted(interior, key=key, reverse=True)
    return {
        "task": task, "primary": primary, "higher_is_better": higher_is_better, "scores": scores,
        "best_alpha": best, "best_score": scores[best], "best_interior_alpha": best_in,
        "best_interior_score": scores[best_in], "chosen_score": scores[chosen],
        "gap": sign * (scores[best_in] - scores[chosen]),  # >= 0: how much the unsupervised choice lost
        "rank": 1 + sum(1 for a in ranked if key(a) > key(chosen)),  # ties share the better rank
        "agree": key(chosen) == key(best_in),
    }


# -- the search ------------------------------------------------------------------------------------------
def adamms_search(
    target: str | Path,
    source: str | Path,
    alphas: Sequence[float] | str,
    inputs: str | Path | Sequence[dict[str, Any]],
    *,
    mapping: str | dict | None = None,
    method: str = "linear",
    base_model: str | Path | None = None,
    vocab_policy: str = "error",
    metric: str = "exact",
    criterion: str = "adamms",
    smooth: int = 0,
    embed: bool = False,
    sample: int | None = 100,
    seed: int = 0,
    template: str | None = None,
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
    chat_template: bool = False,
    check_task: str | Path | None = None,
    check_limit: int | None = None,
    cache: Any = None,
    loader: str | Callable | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "float32",
    in_memory: bool = True,
    out_dir: str | Path | None = None,
    write_model: bool = True,
    force: bool = False,
    progress: bool = True,
) -> SearchResult:
    """Score every alpha by generation consistency, choose one, and (with `out_dir`) write the report and
    the chosen merged model (`out_dir/model`)."""
    from tqdm.auto import tqdm

    from ..engine import merge, open_sources, soup_into
    from .sweep import parse_alphas

    grid = parse_alphas(alphas) if isinstance(alphas, str) else sorted({float(a) for a in alphas})
    if len(grid) < 3:
        raise SoupError(f"generation consistency needs at least 3 alphas, got {grid}")
    if metric not in METRICS:
        raise SoupError(f"unknown consistency metric {metric!r} (known: {', '.join(METRICS)})")
    if criterion not in CRITERIA:
        raise SoupError(f"unknown criterion {criterion!r} (known: {', '.join(CRITERIA)})")
    chooser(criterion, metric)  # a metric the criterion has no form for fails here, before any model loads
    metrics = ["exact", "token_f1", "edit"] + (["embedding"] if embed or metric == "embedding" else [])
    rows = list(inputs) if not isinstance(inputs, (str, Path)) else load_inputs(
        inputs, template=template, sample=sample, seed=seed)
    out = Path(out_dir) if out_dir is not None else None
    model_dir = out / "model" if out is not None and write_model else None
    if out is not None:  # a bad output fails before the search, not after it
        from ..io.output import AtomicDir, check_output

        inputs = [str(target), str(source), *([str(base_model)] if base_model else [])]
        check_output(out, inputs=inputs, what="output folder", report=True)
        if model_dir is not None:
            AtomicDir(model_dir, force=force).check()
    # Every recipe is validated (models, method, mapping spec) before any model is loaded.
    recipes = {a: adamms_recipe(target, source, a, mapping, method=method, base_model=base_model,
                                vocab_policy=vocab_policy) for a in grid}
    task = None
    if check_task is not None:
        from ..evaluate.tasks import load_task

        task = load_task(check_task)
    images = _read_images(rows)

    # Rank 0 hashes the inputs (cache keys) and tells the other ranks.
    keyer = D.on_main(lambda: _key_parts(target, source, base_model, mapping, method)) \
        if (task is not None and cache) else None
    held: dict[str, Any] = {}  # the model and the bases, loaded on first use (a rank may get no alpha)

    def run_alpha(a: float) -> tuple[list[str], float | None, list[float]]:
        """Responses, check score and (load, soup, generate, check) seconds of one alpha."""
        t = time.perf_counter()
        if not held:
            held["lm"] = resolve_loader(loader)(str(target), device=device, dtype=dtype, batch_size=batch_size,
                                                progress=False)
            held["sources"] = open_sources(recipes[grid[0]], in_memory=in_memory)
        lm = held["lm"]
        t0 = time.perf_counter()
        soup_into(lm.model, recipes[a], sources=held["sources"])
        t1 = time.perf_counter()
        answers = generate_responses(lm, rows, images, max_new_tokens=max_new_tokens, stop=stop,
                                     chat_template=chat_template)
        t2 = time.perf_counter()
        score = None
        if task is not None:
            from ..evaluate.runner import evaluate

            key = _alpha_key(keyer, a) if keyer else None
            # A factory, so any loader's model is accepted (the runner only calls what the task needs).
            report = evaluate(lambda: lm, [task], limit=check_limit, cache=cache if key else None, model_key=key,
                              progress=False)
            score = float(report["results"][task.name]["score"])
        return answers, score, [t0 - t, t1 - t0, t2 - t1, time.perf_counter() - t2]

    # Under torchrun the alphas are dealt out over ranks and every rank gets every answer.
    bar = tqdm(total=len(grid), desc="adamms", unit="alpha", disable=not progress or not D.is_main())
    outcomes = D.parallel_map(run_alpha, grid, on_result=lambda a, _: (bar.set_postfix(alpha=a), bar.update(1)))
    bar.close()
    if held:
        for c in held["sources"].checkpoints:
            c.close()
    responses = {a: o[0] for a, o in zip(grid, outcomes, strict=True)}
    scores = {a: o[1] for a, o in zip(grid, outcomes, strict=True) if o[1] is not None}
    load_s, soup_s, gen_s, eval_s = (sum(o[2][i] for o in outcomes) for i in range(4))

    # The embedding model is loaded once, on rank 0, and the curves sent to the others.
    embedder = (lambda: minilm_embedder(device=device)) if "embedding" in metrics else None
    curves = D.on_main(lambda: difference_curve(responses, metrics, embed=embedder() if embedder else None))
    curves[CHANGED] = changed_count_curve(responses)  # the authors' count, always reported
    key = chooser(criterion, metric)
    chosen = choose_alpha(curves[key], smooth)
    alternatives = {"adamms (changed answers)": choose_alpha(curves[CHANGED], smooth),
                    "mean token_f1": choose_alpha(curves["token_f1"], smooth)}
    check = None
    if task is not None:
        check = compare_with_labels(task.name, task.primary, task.higher_is_better, scores, chosen)
    result = SearchResult(
        target=str(target), source=str(source), mapping=mapping, alphas=grid, metric=metric, smooth=smooth,
        differences=curves, chosen=chosen, responses=responses, prompts=[r["prompt"] for r in rows], check=check,
        criterion=criterion, minima=minima(curves[key], smooth), alternatives=alternatives,
        timings={"load_s": round(load_s, 3), "soup_s": round(soup_s, 3), "generate_s": round(gen_s, 3),
                 "check_s": round(eval_s, 3)},
    )
    if out is not None:
        from ..io.output import write_text

        def write() -> None:
            write_outputs(result, out)
            if model_dir is not None:
                merge(recipes[chosen], model_dir, force=force, progress=progress)
                result.model_dir = str(model_dir)
                write_text(out / "search.json", json.dumps(result.to_json(), indent=1))

        D.on_main(write)  # one writer; the others wait for it
        result.model_dir = str(model_dir) if model_dir is not None else None
    return result


def _key_parts(target, source, base_model, mapping, method) -> dict[str, Any]:
    """The alpha-free part of each candidate's cache identity: input contents, method, the spec's text.

    Plain data, so rank 0 can compute it (hashing reads every weight) and send it to the others.
    """
    from ..arch.mapping import load_mapping
    from ..evaluate.cache import model_hash

    hashes = [model_hash(target), model_hash(source)] + ([model_hash(base_model)] if base_model else [])
    spec = hashlib.sha256(load_mapping(mapping).text.encode()).hexdigest() if mapping else None
    return {"hashes": hashes, "method": method, "mapping": spec}


def _alpha_key(parts: dict[str, Any], alpha: float) -> str:
    """Cache identity of the soup at `alpha`."""
    from ..evaluate.cache import soup_key

    return soup_key(parts["hashes"], f"adamms-{parts['method']}",
                    {"weights": [1.0 - alpha, alpha], "mapping": parts["mapping"]})


def write_outputs(result: SearchResult, out_dir: str | Path) -> list[Path]:
    """search.csv, search.md, search.json, responses.jsonl and the curve (search.png, search.svg), written
    beside `out_dir` and moved in at the end (souplm/io/output.py)."""
    from ..io.output import staged_dir

    with staged_dir(out_dir) as staged:
        paths = _write_outputs_into(result, staged)
    return [Path(out_dir) / p.relative_to(staged) for p in paths]


def _write_outputs_into(result: SearchResult, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [result.to_csv(out / "search.csv")]
    (out / "search.md").write_text(result.to_markdown())
    (out / "search.json").write_text(json.dumps(result.to_json(), indent=1))
    lines = [json.dumps({"prompt": p, **{f"{a:g}": result.responses[a][i] for a in result.alphas}}) + "\n"
             for i, p in enumerate(result.prompts)]
    (out / "responses.jsonl").write_text("".join(lines))
    paths += [out / "search.md", out / "search.json", out / "responses.jsonl"]
    paths += plot_search(result, out / "search")
    return paths


def plot_search(result: SearchResult, out_prefix: str | Path) -> list[Path]:
    """Difference curves against alpha, the chosen alpha marked; the check task's score on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m, curve in result.differences.items():
        xs = sorted(curve)
        main = m == result.chooser
        ax.plot(xs, [curve[a] for a in xs], "o-" if main else ".--", lw=2 if main else 1, alpha=1 if main else 0.6,
                label=f"D {m}" + (" (chooses)" if main else ""))
    ax.axvline(result.chosen, color="tab:red", ls=":", label=f"chosen alpha {result.chosen:g}")
    ax.set_xlabel("alpha (weight of the source)")
    ax.set_ylabel("difference from neighbours (lower = more consistent)")
    ax.set_xlim(min(result.alphas) - 0.02, max(result.alphas) + 0.02)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if result.check:
        c = result.check
        ax2 = ax.twinx()
        xs = result.alphas
        ax2.plot(xs, [c["scores"][a] for a in xs], "s-", color="tab:gray", label=f"{c['task']} {c['primary']}")
        ax2.plot([c["best_alpha"]], [c["best_score"]], marker="*", ms=15, color="tab:orange", ls="",
                 label=f"best with labels {c['best_alpha']:g}")
        ax2.set_ylabel(f"{c['task']} {c['primary']} ({'higher' if c['higher_is_better'] else 'lower'} is better)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7, loc="best")
    ax.set_title(f"AdaMMS: {Path(result.source).name} into {Path(result.target).name}", fontsize=10)
    fig.tight_layout()
    out_prefix = Path(out_prefix)
    paths = [out_prefix.with_suffix(".png"), out_prefix.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths

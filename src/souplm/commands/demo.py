"""`souplm demo`: the README's main job, showing what a soup is for.

Default: a toy world built in about a minute on two cores (souplm/demo): a tiny base that copies
strings, specialist A fine-tuned to count digits up, specialist B fine-tuned to mirror letters. Each
specialist fails the other's skill; the soups (vanilla, learnable, task arithmetic, TIES; made by
`souplm.merge` and `souplm.learn`, reloaded with transformers) are scored on both skills, with a table
and decoded answers.
`--real`: the real SmolLM2-135M family of the experiment (built by `python -m souplm.experiment.family
build [--quick]`): merges SmolLM2-Instruct with its math variant and prints their chat answers.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

DESCRIPTION = (
    "Show what a model soup does, in about a minute on a laptop CPU and without downloads: a tiny base "
    "model, specialist A fine-tuned on one skill (count digits up) and specialist B on another (mirror "
    "letters), then souplm's soups of A and B (vanilla, learnable, task arithmetic, TIES) scored on both "
    "skills, with decoded answers. --real merges the experiment's SmolLM2 family instead (build it first: "
    "python -m souplm.experiment.family build --quick)."
)


def register(sub) -> None:
    p = sub.add_parser("demo", help="show what a soup does: two toy specialists and their soups, scored on both skills",
                       description=DESCRIPTION)
    p.add_argument("-o", "--out", default="souplm-demo", help="where the demo writes (default ./souplm-demo)")
    p.add_argument("--real", action="store_true",
                   help="merge the experiment's SmolLM2 family (the full one, else the --quick one) and chat with it")
    p.add_argument("--cache", help="--real: the family folder (default $SOUPLM_CACHE/family, else ~/.cache/souplm/family)")
    p.add_argument("--quick", action="store_true", help="fewer training steps and test rows (for tests)")
    p.set_defaults(handler=run)


def _say(msg: str) -> None:
    print(msg, flush=True)


MARKER = ".souplm-demo"  # a folder holding this was made by the demo, so the demo may rewrite it


def claim_demo_folder(root: Path) -> None:
    """The demo rewrites its own folder only: a non-empty folder without the demo's marker is refused, so
    `demo -o ~/somewhere` can never replace what a user keeps there."""
    from ..errors import SoupError
    from ..io.output import check_output, os_error

    check_output(root, what="demo folder")
    try:
        if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / MARKER).is_file())):
            raise SoupError(f"demo folder {root} exists and was not made by souplm demo; choose another -o")
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER).write_text("made by souplm demo; the demo may rewrite this folder\n")
    except OSError as e:
        raise os_error(e, "cannot write the demo folder", root) from None


def run(args: argparse.Namespace) -> int:
    root = Path(args.out).resolve()
    claim_demo_folder(root)
    if args.real:
        return _real(root, args.cache)
    return _toy(root, quick=args.quick)


# -- the toy world ----------------------------------------------------------------------------------


def _toy(root: Path, quick: bool = False) -> int:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import souplm

    from .. import demo as toy

    hf_logging.disable_progress_bar()
    steps = toy.QUICK if quick else toy.Steps()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide matrices: a second thread only adds contention (measured 40x slower when shared)
    t0 = time.perf_counter()
    models = root / "models"
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)

    def save(model, name: str) -> Path:
        model.save_pretrained(models / name)
        toy.save_tokenizer(models / name)
        return models / name

    _say("souplm demo: what a soup does, on a toy world of two skills (all models built here, seeded)\n")
    _say("  skill A  count digits up (each + 1, mod 8)   3107>4210.")
    _say("  skill B  mirror letters (a<->h, b<->g, ...)   cafe>fhcb.\n")
    _say(f"[1/4] base: a 2-layer Llama learns to copy 4 characters ({steps.base} steps)")
    base_model = toy.new_model(seed=0)
    toy.train(base_model, [toy.COPY_DIGITS, toy.COPY_LETTERS], steps.base, lr=3e-3, seed=0)
    base = save(base_model, "base")
    _say(f"[2/4] specialists fine-tuned from the base ({steps.specialist} steps each): "
         "A on skill A (still copying letters), B on skill B (still copying digits)")
    spec = {}
    for name, skill, keep, seed in [("specialist_A", toy.SKILL_A, toy.COPY_LETTERS, 1),
                                    ("specialist_B", toy.SKILL_B, toy.COPY_DIGITS, 2)]:
        m = copy.deepcopy(base_model)
        toy.train(m, [skill, keep], steps.specialist, lr=5e-4, seed=seed)
        spec[name] = save(m, name)
    a, b = str(spec["specialist_A"]), str(spec["specialist_B"])

    _say("[3/4] soups of A and B, by souplm.merge and souplm.learn")
    recipes = {
        "task arithmetic": souplm.Recipe.from_models([a, b], "task_arithmetic", base_model=str(base), weight=1.0,
                                                     **{"lambda": 1.0}),
        "TIES": souplm.Recipe.from_models([a, b], "ties", base_model=str(base), weight=1.0, density=0.5,
                                          normalize=False),
    }
    dirs: dict[str, Path] = {"base": base, "specialist A": spec["specialist_A"], "specialist B": spec["specialist_B"]}
    for label, recipe in recipes.items():
        dirs[label] = souplm.merge(recipe, root / label.split()[0].lower(), force=True, progress=False,
                                   hash_inputs=False).out_dir
    # The vanilla soup's best alpha (A's share), chosen on dev strings (not the test strings) by its weaker skill.
    dev_rows = {s: toy.test_rows(s, steps.test_rows, seed=77) for s in (toy.SKILL_A, toy.SKILL_B)}
    best = (-1.0, 0.5)
    for alpha in [i / 10 for i in range(1, 10)]:
        d = souplm.merge(souplm.Recipe.vanilla(a, b, alpha), root / "sweep" / f"alpha_{alpha:.1f}", force=True,
                         progress=False, hash_inputs=False).out_dir
        m = AutoModelForCausalLM.from_pretrained(d).eval()
        best = max(best, (min(toy.accuracy(m, rows) for rows in dev_rows.values()), alpha))
    dirs[f"vanilla a={best[1]:.1f}"] = root / "sweep" / f"alpha_{best[1]:.1f}"
    dev = toy.write_dev_set(root / "dev.jsonl", steps.learn_samples)
    learned = souplm.learn({
        "models": [a, b], "meta_sets": [{"path": str(dev), "format": "text", "samples": "all"}],
        "training": {"epochs": steps.learn_epochs, "batch_size": 8}, "output": str(root / "learnable"),
        "seed": 0,
    }, force=True, progress=False)
    dirs["learnable soup"] = learned.merged_dir
    order = ["base", "specialist A", "specialist B", f"vanilla a={best[1]:.1f}", "learnable soup", "task arithmetic",
             "TIES"]
    dirs = {k: dirs[k] for k in order}

    _say(f"[4/4] scoring: exact match of greedy answers on {steps.test_rows} held-out strings per skill\n")
    tests = {s: toy.test_rows(s, steps.test_rows) for s in (toy.SKILL_A, toy.SKILL_B)}
    show = {s: rows[:2] for s, rows in tests.items()}
    scores: dict[str, tuple[float, float]] = {}
    samples: dict[str, list[str]] = {}
    for label, d in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        scores[label] = (toy.accuracy(model, tests[toy.SKILL_A]), toy.accuracy(model, tests[toy.SKILL_B]))
        samples[label] = [g for s in show for g in toy.answers(model, [q for q, _ in show[s]])]
    print(render_table(scores, samples, [q + a for s in show for q, a in show[s]]))
    both = [k for k, (x, y) in scores.items() if min(x, y) >= 0.8]
    _say("")
    if both:
        _say(f"{', '.join(both)}: both skills in one model, which neither specialist has.")
    _say(f"The vanilla soup a*A + (1-a)*B (a={best[1]:.1f}: the best of a 0.1..0.9 sweep, chosen on dev strings) keeps\n"
         "only a of A's change to the base and 1-a of B's, so it loses one skill or both. Task arithmetic\n"
         "adds both changes to the base; TIES adds them after dropping the small and the sign-conflicting ones.\n"
         f"The learnable soup fits one weight pair per layer and mapping on {2 * steps.learn_samples} dev rows; "
         "its weights sum to 1,\nas the vanilla soup's do.")
    _say(f"\nDone in {time.perf_counter() - t0:.0f} s. Models in {root}: each soup has a README.md model card "
         "and souplm_recipe.yaml (learnable/ also coefficients.json).")
    torch.set_num_threads(threads)
    return 0


def render_table(scores: dict[str, tuple[float, float]], samples: dict[str, list[str]], truth: list[str]) -> str:
    qs = [t.split(">")[0] + ">" for t in truth]
    head = f"{'model':18s} {'skill A':>8s} {'skill B':>8s}   " + "  ".join(f"{q:10s}" for q in qs)
    lines = [head, f"{'(answer)':18s} {'':8s} {'':8s}   " + "  ".join(f"{t.split('>')[1]:10s}" for t in truth),
             "-" * len(head)]
    for label, (x, y) in scores.items():
        lines.append(f"{label:18s} {x:8.0%} {y:8.0%}   " + "  ".join(f"{s:10s}" for s in samples[label]))
    return "\n".join(lines)


# -- the real family ----------------------------------------------------------------------------------

_CHATS = ["What is 12 + 7? Answer with a number.", "Write one sentence about the sea."]


def _real(root: Path, cache: str | None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import souplm

    from ..errors import SoupError
    from ..experiment.family import family_paths
    from ..experiment.prompts import chat_prompt, encode_text

    hf_logging.disable_progress_bar()
    stages = ("smollm2", "math")  # only what the demo merges
    try:
        fam = family_paths(cache, stages=stages)
    except SoupError:
        try:  # the README's `build --quick` family lands in the cache's quick/ folder
            fam = family_paths(cache, quick=True, stages=stages)
        except SoupError as e:
            raise SoupError(f"demo --real: {e} (or the full family without --quick)") from None
    models = {"SmolLM2-Instruct": fam["smollm2"], "math fine-tune": fam["math"]}
    for label, path in models.items():
        _say(f"{label:18s} {path}")
    soup = souplm.merge(souplm.Recipe.vanilla(str(fam["smollm2"]), str(fam["math"]), 0.5), root / "smollm2_math_soup",
                        force=True, progress=False).out_dir
    _say(f"{'vanilla soup 0.5':18s} {soup}\n")
    tok = AutoTokenizer.from_pretrained(soup)
    for label, path in [*models.items(), ("vanilla soup 0.5", soup)]:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        _say(f"== {label}")
        for q in _CHATS:
            ids = torch.tensor([encode_text(tok, chat_prompt(tok, q))])
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")
            _say(f"  user: {q}\n  assistant: {text}")
    _say(f"\nDone. The soup is in {soup}, with a README.md model card and souplm_recipe.yaml.")
    sys.stdout.flush()
    return 0

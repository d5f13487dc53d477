"""`souplm demo`: the README's main job. Builds a small model family itself and merges it.

Default: a tiny random Llama "base" and two fine-tunes of it (a few seconds), merged three ways
(vanilla soup, TIES, task arithmetic); each output is reloaded with transformers and generates.
`--real`: the real SmolLM2-135M family of the experiment (built by `python -m souplm.experiment.family
build`), merging SmolLM2-Instruct with its math variant.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="build a small model family and merge it (the README's first command)")
    p.add_argument("-o", "--out", default="souplm-demo", help="where the demo writes (default ./souplm-demo)")
    p.add_argument("--real", action="store_true", help="merge the real SmolLM2 family (must be built first)")
    p.set_defaults(handler=run)


def _tiny_family(root):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for seed, name in [(1, "finetune_a"), (2, "finetune_b")]:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            ft = LlamaForCausalLM(cfg)
            for p, q in zip(ft.parameters(), base.parameters()):
                p.copy_(q + 0.02 * torch.randn(q.shape, generator=g))
        ft.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from ..engine import merge
    from ..recipe import Recipe

    root = Path(args.out).resolve()
    if args.real:
        from ..experiment.family import family_paths

        fam = family_paths()
        recipes = {"smollm2_math_soup": Recipe.vanilla(fam["smollm2"], fam["math"], 0.5)}
    else:
        if root.exists():
            shutil.rmtree(root / "models", ignore_errors=True)
        fam = _tiny_family(root / "models")
        a, b, base = fam["finetune_a"], fam["finetune_b"], fam["base"]
        recipes = {
            "vanilla_soup": Recipe.vanilla(a, b, 0.3),
            "ties": Recipe.from_models([a, b], "ties", base_model=base, density=0.5),
            "task_arithmetic": Recipe.from_models([a, b], "task_arithmetic", base_model=base, **{"lambda": 0.7}),
        }
    print(f"models: {', '.join(str(p) for p in fam.values())}")
    prompt = torch.tensor([[1, 2, 3, 4]])
    for name, recipe in recipes.items():
        report = merge(recipe, root / name, force=True)
        model = AutoModelForCausalLM.from_pretrained(root / name)
        tokens = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, 4:].tolist()
        print(f"{name:16s} {report}\n{'':16s} reloaded with transformers; greedy tokens {tokens}")
    print(f"\nDone. Merged models are in {root}; each has a README.md model card and souplm_recipe.yaml.")
    return 0

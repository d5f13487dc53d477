"""Build souplm's golden fixtures from mergekit 0.1.5 itself (not run by CI; see docs/GOLDEN.md).

    python scripts/golden/build.py [--work DIR] [--only SUBSTRING ...]

1. builds tiny seeded models of every architecture in archs.py with transformers (`save_pretrained`,
   safetensors), their values replaced by tests/golden/inputs.py's seeded ones, and checks that
   `inputs.materialize` rebuilds every weight file bit for bit (sha256 in the manifest);
2. writes one mergekit recipe per case (cases.py: mergekit's examples/, the recipes its tests build,
   issue 13 section 1's cases, one per merge method, slices, tokenizers, every architecture);
3. runs mergekit's own `mergekit-yaml` on each (its virtual environment, CPU, --random-seed 0) and records
   its success or its error text;
4. stores mergekit's output tensors under tests/golden/out/<case>.safetensors, and the manifest
   (tests/golden/manifest.json): recipe text, architecture, dtype, mergekit version, per-tensor sha256,
   output config and tokenizer facts, mergekit's error when it failed, whether the method is random.

Only mergekit's outputs and the inputs' side files (config.json, tokenizer files) are committed; the
input weights are rebuilt from their seeds by the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "golden"))
sys.path.insert(0, str(Path(__file__).parent))

import inputs as golden_inputs
from archs import ARCHS, AUTO_CLASS
from cases import CASES, MODELS

MERGEKIT_PY = Path(os.environ.get("MERGEKIT_PY", "/work/venvs/mergekit/bin/python"))
GOLDEN = ROOT / "tests" / "golden"
OUT = GOLDEN / "out"


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def make_tokenizer(vocab_size: int, added: list[str]):
    """A WordLevel-in-BPE tokenizer of `vocab_size` tokens plus `added` (the shape of mergekit's test tokenizers)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    toks = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(toks, range(vocab_size))), "merges": []},
            "added_tokens": []}
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens(added)
    return fast


def build_model(name: str, spec: dict, work: Path) -> dict:
    """Build model `name` with transformers, its values from `inputs.values`; return its manifest entry.

    The model's files are transformers' own (`save_pretrained`); the weights are the seeded ones, written by
    `inputs.materialize`, then loaded back with `from_pretrained` (no missing or unexpected key) and saved
    again with `save_pretrained`, which must give the same bytes: the tests' rebuild is transformers' file."""
    import transformers
    from transformers import AutoConfig

    arch = spec["arch"]
    auto = getattr(transformers, AUTO_CLASS.get(arch, "AutoModelForCausalLM"))
    kwargs = dict(ARCHS[arch], **spec.get("config", {}))
    dtype_name = spec.get("dtype", "float32")
    dtype = golden_inputs.DTYPES[dtype_name]
    cfg = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(0)
    model = auto.from_config(cfg).to(dtype)
    side = GOLDEN / "models" / name
    if side.exists():
        shutil.rmtree(side)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
            names = sorted(f.keys())
            shapes = {n: list(f.get_slice(n).get_shape()) for n in names}
        if spec.get("tokenizer") is not None:
            vocab, added = spec["tokenizer"]
            make_tokenizer(vocab, added).save_pretrained(tmp)
        side.mkdir(parents=True)
        for f in sorted(Path(tmp).iterdir()):
            if f.name != "model.safetensors":
                shutil.copyfile(f, side / f.name)
    entry = {"arch": arch, "dtype": dtype_name, "base_seed": spec["base_seed"],
             "deltas": spec.get("deltas", []), "tensors": [[n, shapes[n]] for n in names]}
    for key in ("sign", "grid", "scale"):
        if key in spec:
            entry[key] = spec[key]
    out = work / "models" / name
    if out.exists():
        shutil.rmtree(out)
    golden_inputs.materialize(name, entry, work / "models")
    entry["sha256"] = golden_inputs.file_sha256(out / "model.safetensors")
    loaded, info = auto.from_pretrained(out, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"golden: {name}: transformers does not load the seeded weights: {bad}")
    with tempfile.TemporaryDirectory() as tmp:
        loaded.save_pretrained(tmp)
        if golden_inputs.file_sha256(Path(tmp) / "model.safetensors") != entry["sha256"]:
            raise SystemExit(f"golden: {name}: save_pretrained of the seeded model differs from the seeded file")
    return entry


def output_facts(out: Path) -> tuple[dict, dict]:
    """mergekit's output: {tensor: tensor} and the facts the tests compare (config, tokenizer)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for n in list(h.keys()):
                tensors[n] = h.get_tensor(n)
    facts: dict = {}
    if (out / "config.json").exists():
        facts["config"] = json.loads((out / "config.json").read_text())
    if (out / "tokenizer.json").exists():
        tok = json.loads((out / "tokenizer.json").read_text())
        vocab = dict(tok["model"]["vocab"])
        for a in tok.get("added_tokens", []):
            vocab[a["content"]] = a["id"]
        facts["tokenizer"] = {"size": len(vocab), "added": sorted(a["content"] for a in tok.get("added_tokens", [])),
                              "vocab": vocab}
    template = None
    if (out / "chat_template.jinja").exists():
        template = (out / "chat_template.jinja").read_text()
    elif (out / "tokenizer_config.json").exists():
        template = json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")
    facts["chat_template"] = template
    return tensors, facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--only", nargs="*", default=None, help="rebuild only the cases whose name contains one of these")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="golden-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest_path = GOLDEN / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() and args.only else {"cases": {}}
    cases = {c["name"]: c for c in CASES if not args.only or any(s in c["name"] for s in args.only)}
    needed = sorted({m for c in cases.values() for m in c["models"]})
    print(f"golden: building {len(needed)} input models in {work}", flush=True)
    models = dict(old.get("models", {}))
    for name in needed:
        models[name] = build_model(name, MODELS[name], work)

    jobs = []
    (work / "recipes").mkdir(exist_ok=True)
    for c in cases.values():
        text = yaml.safe_dump(c["recipe"], sort_keys=False)
        c["recipe_text"] = text
        path = work / "recipes" / f"{c['name']}.yml"
        path.write_text(text)
        out = work / "out" / c["name"]
        if out.exists():
            shutil.rmtree(out)
        jobs.append({"name": c["name"], "recipe": str(path), "out": str(out), "cwd": str(work / "models"),
                     "args": ["--random-seed", "0", "--no-write-model-card", *c.get("args", [])]})
    (work / "jobs.json").write_text(json.dumps(jobs, indent=1))
    subprocess.run([str(MERGEKIT_PY), str(Path(__file__).parent / "run_mergekit.py"), str(work / "jobs.json"),
                    str(work / "results.json")], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    results = json.loads((work / "results.json").read_text())

    OUT.mkdir(exist_ok=True)
    manifest = {"mergekit_version": results["mergekit_version"], "models": models, "cases": dict(old["cases"])}
    for name, c in cases.items():
        res = results["results"][name]
        entry = {k: c[k] for k in ("group", "arch", "method", "random", "models") if k in c}
        entry.update(recipe=c["recipe_text"], args=c.get("args", []), mergekit_ok=res["ok"],
                     mergekit_error=res["error"], note=c.get("note"))
        fixture = OUT / f"{name}.safetensors"
        if fixture.exists():
            fixture.unlink()
        if res["ok"]:
            tensors, facts = output_facts(work / "out" / name)
            save_file(tensors, str(fixture), metadata={"format": "pt"})
            entry["file"] = f"out/{name}.safetensors"
            entry["dtype"] = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
            # per tensor: the first 16 hex digits of the sha256 of its bytes (shapes and dtypes are in the file)
            entry["tensors"] = {n: tensor_sha256(t)[:16] for n, t in sorted(tensors.items())}
            entry["sha256"] = golden_inputs.file_sha256(fixture)
            entry.update(facts)
        manifest["cases"][name] = entry
    manifest["models"] = {m: models[m] for m in sorted({m for c in manifest["cases"].values() for m in c["models"]})}
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    size = sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file())
    ok = sum(c["mergekit_ok"] for c in manifest["cases"].values())
    print(f"golden: {len(manifest['cases'])} cases ({ok} mergekit ok), tests/golden is {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

"""souplm on torch.distributed: 2 CPU processes (gloo) launched by torchrun, against one process.

What is checked, each against a single-process run of the same thing:
- `torchrun -m souplm learn` shards the bases with FSDP2 (no rank holds a whole base), splits the
  dev set, and learns the same alphas; its checkpoint resumes on a different number of processes;
- the custom autograd Functions see whole (unsharded) tensors in forward *and* backward, although
  FSDP2 reshards each layer between the two;
- `torchrun -m souplm sweep` spreads the alphas over ranks and writes the same table, and its cache
  serves a single-process rerun.

Models are tiny random Llamas made in the tests (tests/helpers_eval.py). Each torchrun launch costs
two fresh interpreters, so the file launches twice and checks several things per launch.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers_eval import CORPUS, make_model_dir, make_tokenizer, mc_task, text_task

from souplm.learn import learn
from souplm.search.sweep import sweep

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def torchrun(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """`torchrun --standalone --nproc_per_node 2 -m souplm ARGS`; returns its output, fails on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "souplm", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


# -- the helpers, in one process -------------------------------------------------------------------------
def test_split_deals_round_robin_and_unsplit_restores_the_order():
    from souplm.distributed import split, unsplit

    items = list(range(11))
    parts = [split(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert unsplit(parts) == items
    assert unsplit([split(items[:1], r, 4) for r in range(4)]) == [0]  # ranks with nothing


def test_single_process_helpers_are_the_identity():
    from souplm import distributed as D

    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    assert D.parallel_map(lambda x: x * x, [1, 2, 3], done=lambda x: x == 2) == [1, 4, 9]
    assert D.on_main(lambda: "x") == "x" and D.gather_results(lambda: 5) == [5]
    t = torch.ones(2)
    assert D.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]


def test_slurm_srun_step_becomes_a_torchrun_environment(monkeypatch):
    from souplm import distributed as D

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so what the code sets below is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "0")  # an sbatch script alone: one process, not a world
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert not D.launched()
    monkeypatch.setenv("SLURM_PROCID", "11")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[007-008]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert D.launched()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("11", "16", "3")
    assert os.environ["MASTER_ADDR"] == "gpu007" and os.environ["MASTER_PORT"] == str(20000 + 4242)
    assert D._slurm_master("a1,b2") == "a1" and D._slurm_master("n[1,3-5]") == "n1"


# -- 2 processes ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tok = make_tokenizer()
    a = make_model_dir(root / "a", seed=0, tokenizer=tok)
    b = make_model_dir(root / "b", seed=1, tokenizer=tok)
    # 19 rows, micro-batches of 6 with 2 per step: the last micro-batch has one example, so rank 1
    # runs an all-ignored stand-in there (its forward is needed for FSDP's all-gathers).
    rows = [{"text": f"{CORPUS[i % len(CORPUS)]} {i}"} for i in range(19)]
    dev = root / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"models": [str(a), str(b)], "meta_sets": [{"path": str(dev), "samples": "all"}],
           "training": {"epochs": 2, "batch_size": 6, "grad_accum": 2},
           "regularization": {"kind": "l2", "lambda": 0.01},  # added once, not once per rank
           "optimizer": {"lr": 0.05}, "seed": 3}
    env = {**os.environ, "SOUPLM_CACHE": str(root / "souplm-cache"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    variants = [make_model_dir(root / f"v{i}", seed=10 + i, tokenizer=tok, base=a, noise=0.05) for i in range(2)]
    tasks = [text_task(root / "tasks"), mc_task(root / "tasks")]
    return {"root": root, "a": a, "b": b, "variants": variants, "tasks": tasks, "cfg": cfg, "env": env}


@pytest.fixture(scope="module")
def learned(setup):
    """The same learnable soup on 2 processes (torchrun, CLI) and on 1 (in this process)."""
    root, cfg = setup["root"], setup["cfg"]
    cfg_file = root / "soup.yaml"
    cfg_file.write_text(yaml.safe_dump({**cfg, "merge": True}))
    # --resume on an empty dir: the checkpoint lookup (rank 0 reads, all ranks told) finds nothing.
    out = torchrun(["learn", str(cfg_file), "-o", str(root / "two"), "--quiet", "--resume"], setup["env"], root)
    one = learn({**cfg, "output": str(root / "one"), "merge": True}, progress=False)
    return {"one": one, "two_dir": root / "two", "stdout": out}


def table(path: Path) -> dict:
    return json.loads((path / "coefficients.json").read_text())


def assert_same_alphas(t1: dict, t2: dict, tol: float = 2e-5) -> None:
    assert t1["coefficients"].keys() == t2["coefficients"].keys()
    for key, v1 in t1["coefficients"].items():
        assert t2["coefficients"][key] == pytest.approx(v1, abs=tol), key


def test_two_processes_learn_the_single_process_alphas(learned):
    one, two = table(learned["one"].table_path.parent), table(learned["two_dir"])
    assert_same_alphas(one, two)
    # the alphas moved, so the comparison means something
    assert max(abs(v[0] - 0.5) for v in one["coefficients"].values()) > 0.01
    m1, m2 = one["meta"], two["meta"]
    assert m2["steps"] == m1["steps"] == 4  # 2 epochs of ceil(19 / 12) steps
    for k in ("initial_loss", "final_loss"):  # dev losses reduced over ranks = the whole-set loss
        assert m2[k] == pytest.approx(m1[k], rel=1e-5)
    assert m2["epoch_losses"] == pytest.approx(m1["epoch_losses"], rel=1e-5)
    assert learned["stdout"].count("coefficients:") == 1  # rank 0 alone reports


def test_no_rank_holds_a_whole_base(learned):
    log = [json.loads(x) for x in (learned["two_dir"] / "log.jsonl").read_text().splitlines()]
    ranks = next(e["ranks"] for e in log if e["event"] == "shards")
    assert [r["rank"] for r in ranks] == [0, 1]
    full = ranks[0]["full_base_bytes"]
    assert full > 0 and sum(r["local_base_bytes"] for r in ranks) == full  # shards partition the bases
    for r in ranks:
        assert r["local_base_bytes"] <= full // 2 + 1024  # about half each (odd row counts round)
        assert r["largest_local_fraction"] <= 0.51  # not even one base tensor is held whole
        assert r["groups"] == 5  # 2 decoder layers, embedding, lm_head, root


def test_rank0_writes_the_merged_model_once(learned):
    from safetensors.torch import load_file

    def weights(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    w1, w2 = weights(learned["one"].merged_dir), weights(learned["two_dir"] / "merged")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-5)


def test_resume_on_a_different_number_of_processes(learned, setup, tmp_path):
    """A 2-process checkpoint continued by 1 process equals a 1-process run continued by 1 process."""
    cfg = {**setup["cfg"], "training": {**setup["cfg"]["training"], "epochs": 3}, "merge": False}
    runs = {}
    for name, src in (("from_two", learned["two_dir"]), ("from_one", learned["one"].table_path.parent)):
        shutil.copytree(src, tmp_path / name)
        runs[name] = learn({**cfg, "output": str(tmp_path / name)}, resume=True, progress=False)
        assert runs[name].resumed_from_epoch == 2 and runs[name].steps == 6
    assert_same_alphas(table(tmp_path / "from_one"), table(tmp_path / "from_two"))


def test_backward_sees_whole_weights_although_layers_reshard(tmp_path):
    """One process with a 1-rank FSDP2 mesh (gloo): the gradient of the alphas equals the unsharded
    soup's, and between forward and backward each decoder layer is resharded, so backward had
    to all-gather the bases again for the custom Functions to rebuild the merged weights."""
    code = r'''
import os, torch, torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from souplm import distributed as D
from souplm.learn import sharding as S
from souplm.learn.soup_module import build_soup
from souplm.io.checkpoint import open_checkpoint
root = os.environ["ROOT"]
cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)
for i, name in enumerate("ab"):
    torch.manual_seed(i); LlamaForCausalLM(cfg).save_pretrained(f"{root}/{name}")
cks = [open_checkpoint(f"{root}/{n}") for n in "ab"]
ref = build_soup(LlamaForCausalLM.from_pretrained(f"{root}/a"), [cks[1]], granularity="row")
dist.init_process_group("gloo", rank=0, world_size=1)
soup = build_soup(S.meta_model(f"{root}/a", False, torch.float32), [S.ShapeOnly(cks[1])], granularity="row")
S.shard_soup(soup, torch.device("cpu"))
S.materialize(soup, cks, 0, torch.device("cpu"))
with torch.no_grad():
    r = torch.randn(soup.alphas.raw.shape, generator=torch.Generator().manual_seed(1))
    soup.alphas.raw.copy_(r); ref.alphas.raw.copy_(r)
ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2))
ref(input_ids=ids).logsumexp(-1).sum().backward()
out = soup(input_ids=ids)
layers = soup.model.model.layers
assert all(l._get_fsdp_state()._fsdp_param_group.is_sharded for l in layers), "not resharded after forward"
out.logsumexp(-1).sum().backward()
torch.testing.assert_close(soup.alphas.raw.grad, ref.alphas.raw.grad, atol=1e-6, rtol=1e-5)
assert type(layers[0].self_attn.q_proj.weight_bases[0]).__name__ == "DTensor"
dist.destroy_process_group()
print("OK")
'''
    env = {**os.environ, "ROOT": str(tmp_path), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sweep_writes_the_single_process_table(setup, monkeypatch):
    root, env, tasks = setup["root"], setup["env"], setup["tasks"]
    args = ["sweep", "--model", str(setup["a"]), "--model", str(setup["b"]), "--alphas", "0:1:0.25",
            "--task", str(tasks[0]), "--task", str(tasks[1]), "-o", str(root / "sweep2"),
            "--cache-dir", str(root / "cache2"), "--quiet"]
    out = torchrun(args, env, root)
    assert out.count("best alpha for") == 2  # printed by rank 0 only
    monkeypatch.setenv("SOUPLM_CACHE", env["SOUPLM_CACHE"])
    one = sweep([setup["a"], setup["b"]], "0:1:0.25", tasks, out_dir=root / "sweep1", cache=root / "cache1",
                progress=False)

    def rows(path: Path) -> list[dict]:
        return list(csv.DictReader(path.open()))

    r1, r2 = rows(root / "sweep1" / "sweep.csv"), rows(root / "sweep2" / "sweep.csv")
    assert [r["alpha"] for r in r1] == [r["alpha"] for r in r2] and len(r1) == 5 + 2
    for x, y in zip(r1, r2, strict=True):
        for name in (t.stem for t in tasks):
            assert float(y[name]) == pytest.approx(float(x[name]), rel=1e-6)
    assert one.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    # the cache the two processes filled serves a single-process rerun: nothing is recomputed
    from souplm.evaluate.cache import ResultCache

    store = ResultCache(root / "cache2")
    sweep([setup["a"], setup["b"]], "0:1:0.25", tasks, cache=store, progress=False)
    assert store.hits == 5 * 2 and store.misses == 0


def test_two_process_greedy_soup_chooses_as_one_process(setup):
    """Ingredients are dealt out over ranks, and each greedy step shards the held-out examples."""
    from souplm.search.greedy import greedy_soup

    root, env, (ppl, mc) = setup["root"], setup["env"], setup["tasks"]
    models = [*setup["variants"], setup["b"]]
    args = ["greedy", *(x for m in models for x in ("--model", str(m))), "--task", str(ppl),
            "--test-task", str(mc), "-o", str(root / "greedy2"), "--cache-dir", str(root / "gcache2"), "--quiet"]
    torchrun(args, env, root)
    two = json.loads((root / "greedy2" / "greedy_soup.json").read_text())
    one = greedy_soup(models, ppl, test_tasks=[mc], cache=root / "gcache1", progress=False).to_json()
    assert two["chosen"] == one["chosen"] and len(one["chosen"]) < len(models)  # b is left out
    assert [r["model"] for r in two["ranking"]] == [r["model"] for r in one["ranking"]]
    for k1, k2 in (("ranking", "score"), ("steps", "score")):
        assert [r[k2] for r in two[k1]] == pytest.approx([r[k2] for r in one[k1]], rel=1e-5)
    assert two["uniform_score"] == pytest.approx(one["uniform_score"], rel=1e-5)
    assert two["test"].keys() == one["test"].keys() == {"best single", "uniform", "greedy"}
    for label, scores in one["test"].items():
        assert two["test"][label] == pytest.approx(scores, rel=1e-5)
    assert (root / "greedy2" / "model.safetensors").is_file()  # written once, by rank 0

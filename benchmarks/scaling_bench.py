"""Per-parameter and per-token costs of a learnable soup, measured on small Llamas, for docs/SCALING.md.

    python benchmarks/scaling_bench.py            # about 2 minutes on 2 shared CPU cores
    python benchmarks/scaling_bench.py --json out.json

Measured here (CPU, float32, one thread, two bases), in units that do not depend on the machine:

1. activation bytes per token: bytes autograd saves during a soup step's forward (saved-tensor
   hooks; the frozen bases excluded), per decoder layer (in units of the hidden size) and for the
   head (in units of the vocabulary), from runs that differ only in depth or width;
2. FLOPs per token per matmul parameter of a soup step and of a plain fine-tuning step
   (torch.utils.flop_counter);
3. the soup's cost that does not scale with tokens: step time at two token counts, plain vs soup,
   extrapolated to zero tokens, in units of one weight-sized `torch.lerp` pass over both bases;
4. with 2 gloo processes and FSDP2: bytes all-gathered per micro-batch, relative to the bases, and
   the bytes each rank holds.

docs/SCALING.md turns these into memory and time per step on 80 GB GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)  # 2 shared cores: waiting OpenMP threads would distort every timing


def llama(h: int, layers: int, vocab: int, seed: int = 0, mlp: float = 2.6875, dtype=torch.float32):
    """A random Llama; `mlp` is intermediate/hidden (2.6875 in Llama-2 7B, 2.7 in 13B, 3.5 in 70B)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=int(h * mlp), num_hidden_layers=layers,
                      num_attention_heads=max(2, h // 64), num_key_value_heads=max(1, h // 128),
                      max_position_embeddings=2048, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def soup_of(h: int, layers: int, vocab: int, **kw):
    from souplm.learn.soup_module import build_soup

    a, b = llama(h, layers, vocab, 0, **kw), llama(h, layers, vocab, 1, **kw)
    return build_soup(a, [dict(b.state_dict())])


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False)
    logits = logits if torch.is_tensor(logits) else logits.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def saved_bytes(h: int, layers: int, vocab: int, tokens: int = 1024, **kw) -> float:
    """Bytes autograd keeps for backward, per token (unique storages; parameters excluded)."""
    soup = soup_of(h, layers, vocab, **kw)
    params = {p.data_ptr() for p in soup.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, vocab, (2, tokens // 2), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(soup, ids)
    del loss
    return sum(seen.values()) / tokens


def flops_per_token(h: int, layers: int, vocab: int, tokens: int = 512) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    linear = sum(m.weight.numel() for m in llama(h, layers, vocab).modules() if isinstance(m, torch.nn.Linear))
    for name in ("plain", "soup"):
        model = llama(h, layers, vocab) if name == "plain" else soup_of(h, layers, vocab)
        with FlopCounterMode(display=False) as fc:
            loss_of(model, ids).backward()
        out[name] = fc.get_total_flops() / (tokens * linear)
    return out


def clock() -> float:
    """CPU seconds of this process: unlike wall time, not inflated while the shared cores serve others
    (one thread, so CPU time is the work done)."""
    return time.process_time()


def step_time(model, ids: torch.Tensor, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        loss_of(model, ids).backward()
        best = min(best, clock() - t0)
        model.zero_grad(set_to_none=True)
    return best


def fixed_cost(h: int, layers: int, vocab: int, t_small: int = 64, t_large: int = 1024,
               reps: int = 5, row: int = 64) -> dict[str, float]:
    """Step time = intercept + slope * tokens, plain and soup; the intercepts in lerp passes.

    Fastest of `reps` interleaved rounds, in CPU seconds (the machine is shared).
    """
    plain = llama(h, layers, vocab)
    soup = soup_of(h, layers, vocab)
    gen = torch.Generator().manual_seed(0)
    # rows of `row` tokens, so attention's cost per token is the same at both sizes (a straight line)
    ids = {t: torch.randint(0, vocab, (t // row, row), generator=gen) for t in (t_small, t_large)}
    best = {(n, t): float("inf") for n in ("plain", "soup") for t in ids}
    for _ in range(reps):
        for name, model in (("plain", plain), ("soup", soup)):
            for t, x in ids.items():
                best[name, t] = min(best[name, t], step_time(model, x, 1))
    times = {}
    for name in ("plain", "soup"):
        ts, tl = best[name, t_small], best[name, t_large]
        slope = (tl - ts) / (t_large - t_small)
        times[name] = {"t_small": ts, "t_large": tl, "slope_s_per_token": slope, "intercept_s": ts - slope * t_small}
    # one lerp pass over every weight of the two bases: what "one weight-sized elementwise pass" costs
    pairs = [(m.weight_bases[0], m.weight_bases[1]) for m in soup.modules() if hasattr(m, "weight_bases")]
    lerp = float("inf")
    for _ in range(9):
        t0 = clock()
        for x, y in pairs:
            torch.lerp(y, x, 0.5)
        lerp = min(lerp, clock() - t0)
    extra = times["soup"]["intercept_s"] - times["plain"]["intercept_s"]
    return {**times, "tokens": [t_small, t_large], "lerp_pass_s": lerp, "soup_extra_intercept_s": extra,
            "extra_in_lerp_passes": extra / lerp,
            # what the GPU projection uses: all of the soup's token-independent work per micro-batch
            "soup_intercept_in_lerp_passes": times["soup"]["intercept_s"] / lerp,
            "plain_intercept_in_lerp_passes": times["plain"]["intercept_s"] / lerp,
            "slope_ratio": times["soup"]["slope_s_per_token"] / times["plain"]["slope_s_per_token"]}


# -- 2 processes: all-gather volume ---------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, root: str, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from souplm import distributed as D
    from souplm.io.checkpoint import open_checkpoint
    from souplm.learn import sharding as S
    from souplm.learn.soup_module import build_soup

    D.init()
    cks = [open_checkpoint(f"{root}/{n}") for n in "ab"]
    soup = build_soup(S.meta_model(f"{root}/a", False, torch.float32), [S.ShapeOnly(cks[1])])
    S.shard_soup(soup, torch.device("cpu"))
    S.materialize(soup, cks, 0, torch.device("cpu"))
    gathered = [0]
    inner = dist.all_gather_single if hasattr(dist, "all_gather_single") else dist.all_gather_into_tensor

    def counting(out, inp, *a, **k):
        gathered[0] += out.numel() * out.element_size()
        return inner(out, inp, *a, **k)

    setattr(dist, inner.__name__, counting)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(rank))
    micro = 2
    for _ in range(micro):  # one optimizer step of 2 micro-batches (gradient accumulation)
        loss_of(soup, ids).backward()
    rep = S.shard_report(soup)
    q.put({"rank": rank, "gathered_per_micro_batch": gathered[0] / micro, **rep.to_json()})
    D.shutdown()


def all_gather_volume() -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as root:
        for i, n in enumerate("ab"):
            llama(128, 4, 512, seed=i).save_pretrained(f"{root}/{n}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        mp.start_processes(_worker, args=(2, port, root, q), nprocs=2, start_method="spawn")
        return sorted((q.get() for _ in range(2)), key=lambda r: r["rank"])


# -- projection to 80 GB GPUs ------------------------------------------------------------------------------
# Llama-2 shapes (LLaVA-1.5 7B/13B are built on them): params, hidden, layers, intermediate, vocab.
MODELS = {"7B": (6.738e9, 4096, 32, 11008, 32000), "13B": (13.016e9, 5120, 40, 13824, 32000),
          "70B": (68.977e9, 8192, 80, 28672, 32000)}
# H100 SXM 80 GB figures: assumed, not measured here (no GPU was lent to this session).
GPU = {"mem_gb": 80.0, "reserved_gb": 4.0,  # CUDA context, NCCL buffers, allocator slack
       "flops": 989e12 * 0.40,  # bf16 dense peak at 40% utilisation
       "hbm": 3.35e12 * 0.8,  # elementwise passes reach ~80% of HBM bandwidth
       "nvlink": 360e9,  # NCCL all-gather bus bandwidth inside an 8-GPU node
       "ib": 45e9}  # the same across nodes, 8 x 400 Gb/s NICs per node (50 GB/s per GPU)
ROW, N_MODELS, BYTES = 1024, 2, 2  # tokens per row, bases in the soup, bf16


def project(meas: dict, model: str, gpus: int, shard: int, rows_per_step: int) -> dict:
    """Memory per GPU and time per optimizer step of a 2-model learnable soup (formulas in SCALING.md)."""
    P, h, L, i, V = MODELS[model]
    act = meas["activations"]["bfloat16"]
    per_token = L * (act["per_h"] * h + act["per_mlp"] * i) + act["head_per_vocab"] * V
    p_lin = P - V * h  # the embedding is a gather, no matmul
    p_layer = (P - 2 * V * h) / L
    shards = N_MODELS * P * BYTES / shard
    # unsharded while in use: this layer and the prefetched next one (FSDP2), or embedding / lm_head
    work = 0.0 if shard == 1 else max(2 * N_MODELS * p_layer, N_MODELS * V * h) * BYTES
    temps = 1.25 * h * max(i, V) * BYTES  # one merged weight in forward, 1/8-weight blocks in backward
    fixed = GPU["reserved_gb"] * 1e9 + shards + work + temps
    rows_rank = max(1, -(-rows_per_step // gpus))  # a rank without rows runs a stand-in row
    room = GPU["mem_gb"] * 1e9 - fixed
    fit_rows = int(room // (per_token * ROW)) if room > 0 else 0
    if fit_rows < 1:
        return {"fits": False, "mem_gb": fixed / 1e9 + per_token * ROW / 1e9}
    micro_rows = min(rows_rank, fit_rows)
    micro = -(-rows_rank // micro_rows)  # micro-batches per step (gradient accumulation)
    tokens_rank = rows_rank * ROW
    t_matmul = (6 * p_lin + 12 * L * h * ROW) * tokens_rank / GPU["flops"]
    t_merge = micro * meas["fixed_cost"]["soup_intercept_in_lerp_passes"] * 3 * p_lin * BYTES / GPU["hbm"]
    link = GPU["nvlink"] if shard <= 8 else GPU["ib"]
    gathered = meas["fsdp_2_ranks"][0]["gathered_over_full_bases"]  # ~2: forward + backward
    t_gather = 0.0 if shard == 1 else micro * gathered * N_MODELS * P * BYTES * (shard - 1) / shard / link
    compute = t_matmul + t_merge
    return {"fits": True, "mem_gb": (fixed + per_token * micro_rows * ROW) / 1e9, "micro_rows": micro_rows,
            "micro": micro, "t_matmul": t_matmul, "t_merge": t_merge, "t_gather": t_gather,
            "step_overlapped": max(compute, t_gather), "step_serial": compute + t_gather,
            "tokens_per_s": rows_per_step * ROW / max(compute, t_gather), "act_mb_per_token": per_token / 1e6,
            "shards_gb": shards / 1e9, "work_gb": (work + temps) / 1e9}


def projection_table(meas: dict) -> str:
    """The SCALING.md table: 7B/13B/70B pairs on 1, 8 and 64 GPUs (64 as FSDP over all, and HSDP 8x8)."""
    cases = [(1, 1, 4), (8, 8, 8), (64, 64, 64), (64, 8, 64)]
    lines = [("| pair | GPUs (shard group) | rows/step | memory/GPU (GB) | micro-batches | matmul (s) | "
              "merge passes (s) | all-gather (s) | step, overlapped .. serial (s) | tokens/s |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in MODELS:
        for gpus, shard, rows in cases:
            r = project(meas, model, gpus, shard, rows)
            head = f"| {model} | {gpus} ({'FSDP ' + str(shard) if shard > 1 else 'no sharding'}"
            head += ", HSDP" if 1 < shard < gpus else ""
            if not r["fits"]:
                lines.append(head + f") | {rows} | {r['mem_gb']:.0f} > 80: does not fit | | | | | | |")
                continue
            lines.append(head + f") | {rows} | {r['mem_gb']:.1f} | {r['micro']} x {r['micro_rows']} row(s) | "
                         f"{r['t_matmul']:.2f} | {r['t_merge']:.2f} | {r['t_gather']:.2f} | "
                         f"{r['step_overlapped']:.2f} .. {r['step_serial']:.2f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def device_check(model: str, device: str, rows: int, meas: dict | None = None) -> dict:
    """One device, no sharding: a soup of two random bf16 models of `model`'s shape, `rows` rows of
    1024 tokens per micro-batch; peak memory and step time, beside the projection when `meas` is given.

    This is the figure a GPU run should check (docs/SCALING.md); `tiny` smoke-tests it on the CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from souplm.learn.soup_module import build_soup

    _, h, L, i, V = MODELS[model] if model != "tiny" else (0, 256, 2, 688, 4096)
    heads = h // 128 if model != "tiny" else 4
    cfg = LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=heads,
                      num_key_value_heads=8 if model == "70B" else heads, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    dev = torch.device(device)
    torch.set_default_dtype(torch.bfloat16)  # build straight in bf16: no fp32 copy of the bases
    with dev:
        bases = [LlamaForCausalLM(cfg) for _ in range(N_MODELS)]
    torch.set_default_dtype(torch.float32)
    soup = build_soup(bases[0], [dict(b.state_dict()) for b in bases[1:]])
    del bases
    cuda = dev.type == "cuda"
    ids = torch.randint(0, V, (rows, ROW), device=dev)
    times = []
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_of(soup, ids).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"model": model, "device": device, "rows": rows, "step_s": min(times[1:]),
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
    if meas is not None and model in MODELS:
        proj = project(meas, model, 1, 1, rows)
        out["projected"] = {k: proj.get(k) for k in ("mem_gb", "t_matmul", "t_merge", "step_serial")}
        # max_memory_allocated sees neither the CUDA context nor allocator slack: compare without the reserve
        out["projected"]["allocated_gb"] = proj["mem_gb"] - GPU["reserved_gb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the measurements here")
    ap.add_argument("--project", metavar="JSON", help="print the projection table from saved measurements")
    ap.add_argument("--check", choices=[*MODELS, "tiny"], help="run one soup step of this size on --device "
                    "(no sharding) and print peak memory and step time; with --project, beside the projection")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=1, help="rows of 1024 tokens per micro-batch for --check")
    args = ap.parse_args()
    meas = json.loads(Path(args.project).read_text()) if args.project else None
    if args.check:
        print(json.dumps(device_check(args.check, args.device, args.rows, meas), indent=1))
        return
    if meas is not None:
        print(projection_table(meas))
        return
    h, vocab = 256, 4096
    res: dict = {"torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    res["activations"] = {}
    for dtype in (torch.float32, torch.bfloat16):
        def act(layers: int, width: int = h, mlp: float = 2.6875, dt=dtype) -> float:
            return saved_bytes(width, layers, vocab, mlp=mlp, dtype=dt)

        a2, a4, w2, m2 = act(2), act(4), act(2, 2 * h), act(2, mlp=3.5)
        per_layer = (a4 - a2) / 2  # bytes per token per decoder layer at hidden h, MLP 2.6875 h
        head = a2 - 2 * per_layer  # embedding output, final norm, logits and the loss
        per_mlp = ((m2 - a2) / 2) / (int(h * 3.5) - int(h * 2.6875))  # per unit of intermediate size
        per_h = (per_layer - per_mlp * int(h * 2.6875)) / h  # the rest, per unit of hidden size
        res["activations"][str(dtype).removeprefix("torch.")] = {
            "bytes_per_token": {"h256_L2": a2, "h256_L4": a4, "h512_L2": w2, "h256_L2_mlp3.5": m2},
            "per_layer_per_token_bytes": per_layer,
            # per layer and token: per_h * hidden + per_mlp * intermediate (bytes)
            "per_h": per_h, "per_mlp": per_mlp,
            # check at twice the width (head taken as at h=256): the same model predicts it
            "h512_predicted": head + 2 * (per_h * 2 * h + per_mlp * int(2 * h * 2.6875)), "h512_measured": w2,
            "head_per_token_bytes": head,
            "head_per_vocab": head / vocab,
        }
    print(json.dumps(res["activations"], indent=1), flush=True)
    res["flops_per_token_per_linear_param"] = flops_per_token(h, 2, vocab)
    print(json.dumps(res["flops_per_token_per_linear_param"]), flush=True)
    res["fixed_cost"] = fixed_cost(512, 4, vocab)
    print(json.dumps(res["fixed_cost"], indent=1), flush=True)
    res["fsdp_2_ranks"] = all_gather_volume()
    for r in res["fsdp_2_ranks"]:
        r["gathered_over_full_bases"] = r["gathered_per_micro_batch"] / r["full_base_bytes"]
    print(json.dumps(res["fsdp_2_ranks"], indent=1), flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(projection_table(res))
    print(f"done in {res['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()

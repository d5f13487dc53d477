#!/usr/bin/env python
"""A 7B-shaped merge, measured against the disk's own floor and mergekit 0.1.5 (not run by CI).

The script

1. builds three random bf16 checkpoints of Llama-2-7B's shapes (hidden 4096, 32 layers, intermediate
   11008, vocab 32000; base + two fine-tunes), sharded as Hugging Face does (``--shard-gb`` per file,
   an index, a config), tensor by tensor: each safetensors header is written first and every tensor
   is appended as it is drawn, so no model is ever held in memory (peak ~ one fp32 tensor);
2. before every measured step, evicts the inputs from the page cache with
   ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed), so every run starts cold; the three inputs
   (~40 GB) exceed what this 24 GB machine's page cache can hold anyway;
3. measures the disk's floor in the same run: reading the method's inputs once (cold, 16 MiB reads) and
   writing a file of the output's size with ``dd ... conv=fsync``;
4. times whole-process ``souplm merge`` and ``mergekit-yaml`` on the same recipe file for ``linear`` and
   ``ties``, with peak RSS, each followed by ``sync`` (the time to flush the output is counted, so a tool
   cannot look fast by leaving dirty pages behind);
5. prints a markdown table and deletes everything it wrote (``--keep`` keeps the inputs for a rerun).

Example::

    python benchmarks/scale_merge_bench.py --workdir /work/bench7b --out docs/bench7b.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench as mb

GB = 1e9


@dataclass(frozen=True)
class Spec7B(mb.ModelSpec):
    hidden: int = 4096
    layers: int = 32
    intermediate: int = 11008
    vocab: int = 32000
    heads: int = 32
    shards: int = 3


def _header(names: list[str], shapes: dict[str, tuple[int, ...]]) -> bytes:
    """A safetensors header for bf16 tensors laid out in ``names`` order (padded to 8 bytes)."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for n in names:
        size = mb._numel(shapes[n]) * 2
        meta[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [off, off + size]}
        off += size
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def build_streaming(spec: Spec7B, root: Path) -> dict[str, Path]:
    """Build base + two fine-tunes under ``root`` without holding a model (or shard) in memory."""
    import torch

    dirs = {m: root / m for m in mb.MODEL_NAMES}
    marker = root / "COMPLETE.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"spec": spec.tag}:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    for d in dirs.values():
        d.mkdir(parents=True)
    shapes_list = spec.tensor_shapes()
    shapes = dict(shapes_list)
    groups = mb._split_shards(shapes_list, spec.shards)
    files = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    gen = torch.Generator().manual_seed(spec.seed)
    weight_map: dict[str, str] = {}
    t0 = time.perf_counter()
    done = 0
    total = spec.num_params()
    for fname, group in zip(files, groups):
        header = _header(group, shapes)
        outs = {m: open(dirs[m] / fname, "wb") for m in mb.MODEL_NAMES}  # noqa: SIM115 (closed below)
        try:
            for f in outs.values():
                f.write(header)
            for tname in group:
                shape = shapes[tname]
                for m, t in mb.draw_trio(spec, shape, gen).items():
                    outs[m].write(t.view(torch.int16).numpy().tobytes())
                weight_map[tname] = fname
                done += mb._numel(shape)
                print(f"\r  building: {100 * done / total:5.1f}% ({time.perf_counter() - t0:.0f}s)", end="", flush=True)
        finally:
            for f in outs.values():
                f.close()
    print()
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    for m in mb.MODEL_NAMES:
        (dirs[m] / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        mb._write_config(spec, dirs[m])
    os.sync()
    marker.write_text(json.dumps({"spec": spec.tag}) + "\n")
    print(f"built 3 x {total / 1e9:.2f}B params ({total * 2 / GB:.1f} GB each) in {time.perf_counter() - t0:.0f}s")
    return dirs


def shard_files(dirs: dict[str, Path], models: tuple[str, ...]) -> list[Path]:
    return [f for m in models for f in sorted(dirs[m].glob("*.safetensors"))]


def evict(paths: list[Path]) -> None:
    """Drop ``paths`` from the page cache (clean pages only; callers sync first)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> tuple[float, float]:
    """Cold read of ``inputs`` once, and a synced write of ``out_bytes``; (read_s, write_s)."""
    evict(inputs)
    t0 = time.perf_counter()
    nread = mb.preread(inputs)
    read_s = time.perf_counter() - t0
    assert nread == sum(p.stat().st_size for p in inputs)
    evict(inputs)
    target = scratch / "floor.bin"
    blocks = max(1, out_bytes // (16 << 20))
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={blocks}", "conv=fsync", "status=none"],
        check=True,
    )
    write_s = time.perf_counter() - t0
    target.unlink()
    return read_s, write_s


class NoHashBench(mb.Bench):
    """merge_bench's runner plus the tool `souplm-nohash`: souplm without the card's input hashes."""

    def command(self, tool: str, recipe: Path, out: Path) -> list[str]:
        if tool == "souplm-nohash":
            return [*super().command("souplm", recipe, out), "--no-hash"]
        return super().command(tool, recipe, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/work/bench7b"))
    p.add_argument("--venv", type=Path, default=mb.DEFAULT_CACHE / "mergekit-venv")
    p.add_argument("--methods", default="linear,ties")
    p.add_argument("--tools", default="souplm,mergekit",
                   help="comma-separated: souplm, mergekit, souplm-nohash (souplm merge --no-hash: no card hashes)")
    p.add_argument("--layers", type=int, default=32, help="32 is Llama-2-7B; fewer for a dry run")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the inputs (default: delete everything)")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    spec = Spec7B(layers=args.layers)
    if args.build_only:
        build_streaming(spec, args.workdir / "models")
        return 0
    methods = tuple(args.methods.split(","))
    tools = tuple(args.tools.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    mk = mb.ensure_mergekit(args.venv) if "mergekit" in tools else None
    # Built in a child process: ru_maxrss of a merge child starts at this process's size at exec, so this
    # process must stay small (it never holds a tensor).
    subprocess.run([sys.executable, __file__, "--build-only", "--workdir", str(args.workdir), "--layers",
                    str(args.layers)], check=True)
    dirs = {m: args.workdir / "models" / m for m in mb.MODEL_NAMES}
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    bench = NoHashBench(dirs, args.workdir, mb.find_souplm(), mk, env, "7b")
    out_bytes = spec.num_params() * 2
    rows = []
    try:
        for method in methods:
            inputs = shard_files(dirs, mb.input_models(method))
            in_bytes = sum(f.stat().st_size for f in inputs)
            read_s, write_s = disk_floor(inputs, out_bytes, args.workdir)
            print(f"{method}: disk floor read {in_bytes / GB:.1f} GB in {read_s:.1f}s, write {out_bytes / GB:.1f} GB in {write_s:.1f}s")
            recipe = mb.write_recipe(method, dirs, args.workdir / f"{method}.yaml", args.density)
            cells = {}
            for tool in tools:
                evict(inputs)
                t0 = time.perf_counter()
                res = bench.run(tool, method, recipe)
                os.sync()
                total = time.perf_counter() - t0
                cells[tool] = (res, total)
                if res.returncode != 0:
                    print(res.stderr_tail)
            agree = ""
            if {"souplm", "mergekit"} <= set(cells) and method == "linear" and all(
                    cells[t][0].returncode == 0 for t in ("souplm", "mergekit")):
                cmp = mb.compare_outputs(bench.out_dir("souplm", method), bench.out_dir("mergekit", method))
                agree = "agree" if cmp["agree"] else f"DIFFER ({cmp['worst_tensor']})"
            for tool in tools:
                shutil.rmtree(bench.out_dir(tool, method), ignore_errors=True)
            rows.append((method, in_bytes, read_s, write_s, cells, agree))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    lines = [
        (f"7B-shaped bf16 merge ({spec.num_params() / 1e9:.2f}B params per model, {spec.shards} shards), cold cache, "
         f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end"),
        "",
        ("| method | input GB | disk read s | disk write s | floor s (max / sum) | tool | wall s (incl. sync) "
         "| x floor (max) | x floor (sum) | peak RSS GiB | CPU s |"),
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for method, in_bytes, read_s, write_s, cells, agree in rows:
        fmax, fsum = max(read_s, write_s), read_s + write_s
        for tool, (res, total) in cells.items():
            status = "" if res.returncode == 0 else f" FAILED rc={res.returncode}"
            lines.append(
                f"| {method} | {in_bytes / GB:.1f} | {read_s:.1f} | {write_s:.1f} | {fmax:.1f} / {fsum:.1f} | {tool}{status} "
                f"| {total:.1f} | {total / fmax:.2f} | {total / fsum:.2f} | {res.peak_rss_bytes / 2**30:.2f} | {res.cpu_s:.0f} |"
            )
        if {"souplm", "mergekit"} <= set(cells):
            s, m = cells["souplm"][1], cells["mergekit"][1]
            lines.append(f"| {method} | | | | | mergekit / souplm | **{m / s:.2f}x** | | | | {agree} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

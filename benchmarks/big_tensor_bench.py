"""One real tensor over 2 GiB through souplm's safetensors writer and every reader path (issue 15 §1; not in CI).

Linux moves at most 0x7ffff000 bytes per preadv/write call, so a reader that makes one call per tensor
fails on a 70B-class embedding. This writes one bf16 tensor of more than 2 GiB (random bytes) with
`SafetensorsWriter`, reads it back through each reader path (the torch executor's `get`, the fused
executor's `read_bytes_into`, learn's `get_rows`, `Checkpoint.get`), checks every path against the sha256 of
the bytes written and against the reference `safetensors` library, prints a table and deletes the file.

    python benchmarks/big_tensor_bench.py [--dir DIR] [--gib 2.25]

Needs about 2.5x the tensor in memory at peak (the written buffer is freed before reading) and the
tensor's size on disk.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to write the file (default: a temporary directory)")
    ap.add_argument("--gib", type=float, default=2.25, help="tensor size in GiB (must exceed 2 to matter)")
    args = ap.parse_args()

    import torch
    from safetensors import safe_open

    from souplm.io import safetensors_file as sf
    from souplm.io.checkpoint import Checkpoint

    cols = 8192
    rows = int(args.gib * 2**30 / (2 * cols))
    nbytes = rows * cols * 2
    assert nbytes > 2**31, "the tensor must exceed 2 GiB"
    tmp = Path(tempfile.mkdtemp(prefix="souplm-big-", dir=args.dir))
    path = tmp / "model.safetensors"
    table: list[tuple[str, float, bool]] = []
    try:
        data = np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)
        want = hashlib.sha256(data).hexdigest()
        t0 = time.perf_counter()
        w = sf.SafetensorsWriter(path, [("lm_head.weight", "bfloat16", (rows, cols))])
        w.write_bytes("lm_head.weight", data)
        w.close()
        table.append(("SafetensorsWriter.write_bytes (write)", time.perf_counter() - t0, True))
        del data

        f = sf.SafetensorsFile(path)

        def timed(label: str, fn) -> None:
            t = time.perf_counter()
            got = fn()
            dt = time.perf_counter() - t
            table.append((label, dt, hashlib.sha256(got).hexdigest() == want))
            del got

        timed("SafetensorsFile.get (torch executor)",
              lambda: f.get("lm_head.weight").view(torch.uint8).reshape(-1).numpy())

        def fused() -> np.ndarray:
            buf = np.empty(nbytes, dtype=np.uint8)
            f.read_bytes_into("lm_head.weight", memoryview(buf))
            return buf

        timed("SafetensorsFile.read_bytes_into (fused executor)", fused)
        timed("SafetensorsFile.get_rows, all rows (learn)",
              lambda: f.get_rows("lm_head.weight", 0, rows).view(torch.uint8).reshape(-1).numpy())
        f.close()
        ck = Checkpoint(tmp, generic_layout=True)
        timed("Checkpoint.get, as stored (mapping views, eval)",
              lambda: ck.get("lm_head.weight", dtype=None).view(torch.uint8).reshape(-1).numpy())
        ck.close()
        with safe_open(str(path), "pt") as ref:
            timed("safetensors.safe_open + clone (reference library)",
                  lambda: ref.get_tensor("lm_head.weight").clone().view(torch.uint8).reshape(-1).numpy())
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()

    print(f"one bf16 tensor [{rows}, {cols}] = {nbytes} bytes ({nbytes / 2**30:.2f} GiB; "
          f"Linux's per-call cap 0x7ffff000 = {0x7FFFF000} bytes; souplm IO_CHUNK = {sf.IO_CHUNK})")
    print(f"{'path':52s} {'time s':>8s} {'GB/s':>7s}  content")
    for label, dt, ok in table:
        print(f"{label:52s} {dt:8.2f} {nbytes / dt / 1e9:7.2f}  {'sha256 matches' if ok else 'MISMATCH'}")
    if not all(ok for *_, ok in table):
        raise SystemExit("content mismatch")
    print(f"deleted {tmp}")


if __name__ == "__main__":
    main()

"""Small helpers over torch.distributed, with a no-op path when souplm runs as one process.

souplm scales out on the launcher its users already train with:

    torchrun --nproc_per_node 8 -m souplm learn soup.yaml                 # one node, 8 processes
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv-backend c10d \\
             --rdzv-endpoint $HEAD:29500 -m souplm learn soup.yaml        # 8 nodes (run on each)
    srun --ntasks-per-node 8 python -m souplm learn soup.yaml             # SLURM, no torchrun

`init()` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, inside an
`srun` step, SLURM's (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the step's first node as
the master). With CUDA it uses nccl for GPU tensors and gloo for CPU ones (small objects, a run
with `device: cpu`); without, gloo. Without those variables, or with
a world of one process, nothing is initialised and every helper below acts as the identity, so
library code calls them unconditionally.

Every helper that communicates is a collective: all ranks must call it, in the same order. The
helpers that run user code (`on_main`, `parallel_map`, `gather_results`) catch a rank's exception
and re-raise it on *every* rank, so one bad candidate fails the job instead of hanging it.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import SoupError

T = TypeVar("T")
R = TypeVar("R")

_OWNED = False  # True when init() created the process group (so shutdown() may destroy it)


# ---------------------------------------------------------------------------------------------
# the launch environment


def _slurm_master(nodelist: str) -> str:
    """First host of a SLURM node list: `gpu[003-005,010]` -> `gpu003`, `a1,b2` -> `a1`."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise SoupError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _env_from_slurm() -> None:
    """Inside an `srun` step (and not under torchrun), translate SLURM's variables to torchrun's.

    Only an srun step counts (SLURM_STEP_NUM_TASKS is set by srun, not by the batch script itself),
    so `python -m souplm ...` typed in an sbatch script stays a single process.
    """
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        env["MASTER_ADDR"] = _slurm_master(nodes)
    # A port derived from the job id, so two jobs sharing a node do not collide.
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def launched() -> bool:
    """True when the environment describes a world of more than one process."""
    _env_from_slurm()
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise SoupError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def init(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group the launcher describes; a no-op (False) for a single process.

    Idempotent: a second call, or a call after someone else created the group, changes nothing.
    `timeout_s` (default $SOUPLM_DIST_TIMEOUT or 30 min) bounds how long a collective waits for a
    rank that died, before the job fails instead of hanging.
    """
    global _OWNED
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched():
        return False
    if not dist.is_available():
        raise SoupError("this torch build has no torch.distributed, but WORLD_SIZE > 1 was set")
    cuda = torch.cuda.is_available()
    backend = backend or ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if cuda:
        # So `cuda` (no index) means this process's GPU everywhere downstream.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    seconds = timeout_s or float(os.environ.get("SOUPLM_DIST_TIMEOUT", "1800"))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=seconds))
    _OWNED = True
    return True


def shutdown() -> None:
    """Leave the process group if `init()` created it (avoids torch's exit-time warning)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


class session:
    """`with distributed.session(): ...` around a command: init on entry, shutdown on exit."""

    def __enter__(self) -> bool:
        return init()

    def __exit__(self, exc_type, *exc: object) -> None:
        # On success, wait for everyone before leaving: rank 0 may still be writing (a merged model)
        # when the others finish, and a peer that tears gloo down first makes rank 0 abort at exit.
        # Not after an error: a rank that failed never reaches the barrier and it would hang.
        if exc_type is None and is_distributed():
            dist.barrier()
        shutdown()


# ---------------------------------------------------------------------------------------------
# who am I


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 writes files and prints; the others compute and wait."""
    return rank() == 0


def local_device(device: str | None = None) -> torch.device:
    """This rank's device: `cuda` (or `auto`/None with CUDA present) becomes cuda:LOCAL_RANK."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", local_rank())
    return d


def _comm_device() -> torch.device:
    """Where small tensors and pickled objects travel: the CPU when gloo is there, else this GPU."""
    if is_distributed() and "gloo" not in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _backend_takes(t: torch.Tensor) -> bool:
    backend = str(dist.get_backend())
    return ("nccl" if t.device.type == "cuda" else "gloo") in backend


# ---------------------------------------------------------------------------------------------
# collectives (the identity in a single process)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks, in place; returns `t`."""
    if is_distributed():
        if _backend_takes(t):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:  # e.g. a CPU scalar under nccl alone
            buf = t.to(_comm_device())
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf)
    return t


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s picklable `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's picklable `obj`, in rank order, on rank `dst` (None on the others)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


# ---------------------------------------------------------------------------------------------
# splitting work


def split(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of `items`: round robin (`items[rank::world]`), deterministic, and the
    shares of all ranks are disjoint and cover `items` exactly once."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside a world of {w}")
    return list(items)[r::w]


def unsplit(parts: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of `split`: rank r's i-th item was item `i * world + r` of the original list."""
    world = len(parts)
    n = sum(len(p) for p in parts)
    return [parts[i % world][i // world] for i in range(n)]


class RemoteError(SoupError):
    """An exception raised on some rank, re-raised on all of them."""


def _run_caught(fn: Callable[[], R]) -> tuple[bool, Any]:
    """(True, result) or (False, message): an exception travels to the other ranks as text."""
    try:
        return True, fn()
    except SoupError as e:
        return False, str(e)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank by _raise_first
        return False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"


def _raise_first(outcomes: Sequence[tuple[bool, Any]], first_rank: int = 0) -> None:
    for r, (ok, value) in enumerate(outcomes, first_rank):
        if not ok:
            raise RemoteError(f"rank {r}: {value}")


def gather_results(fn: Callable[[], R]) -> list[R]:
    """Run `fn()` on every rank; every rank gets all ranks' results in rank order.

    An exception on any rank is re-raised on all ranks (as `RemoteError`, naming the rank), so the
    others do not wait forever in the next collective.
    """
    if not is_distributed():
        return [fn()]
    outcomes = all_gather_objects(_run_caught(fn))
    _raise_first(outcomes)
    return [value for _, value in outcomes]


def on_main(fn: Callable[[], R]) -> R:
    """Run `fn()` on rank 0 only (a write, a cache lookup) and hand its result to every rank."""
    if not is_distributed():
        return fn()
    outcome = _run_caught(fn) if is_main() else None
    outcome = broadcast_object(outcome)
    _raise_first([outcome])
    return outcome[1]


def parallel_map(
    fn: Callable[[T], R], items: Sequence[T], *, done: Callable[[T], bool] | None = None,
    on_result: Callable[[T, R], None] | None = None,
) -> list[R]:
    """`[fn(x) for x in items]` with the items spread over ranks; every rank gets every result.

    `done(x)` (asked on rank 0 only) marks items whose result is already at hand (a cache hit):
    those and the rest are dealt out round robin separately, so the expensive ones are spread
    evenly whatever the cache holds. `on_result` runs on each rank for the items it computed
    (a progress bar). Results come back in item order.
    """
    items = list(items)
    if not is_distributed():
        out = []
        for x in items:
            y = fn(x)
            if on_result:
                on_result(x, y)
            out.append(y)
        return out
    if done is None:
        cheap: list[int] = []
        heavy = list(range(len(items)))
    else:
        flags = on_main(lambda: [bool(done(x)) for x in items])
        cheap = [i for i, f in enumerate(flags) if f]
        heavy = [i for i, f in enumerate(flags) if not f]
    mine = split(heavy) + split(cheap)

    def run_mine() -> list[tuple[int, R]]:
        got = []
        for i in mine:
            y = fn(items[i])
            if on_result:
                on_result(items[i], y)
            got.append((i, y))
        return got

    results: dict[int, R] = {}
    for part in gather_results(run_mine):
        results.update(part)
    return [results[i] for i in range(len(items))]

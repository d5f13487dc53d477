"""Content-addressed, resumable build stages.

A stage's folder is `<name>-<key>`, where the key hashes the stage's config and the content digests of
the stages it reads. Changing a config value or an upstream output therefore builds a new folder, and an
unchanged stage is found and skipped. A stage writes into `<name>-<key>.partial` (which also holds its
training checkpoint) and is renamed into place only when complete, so a folder without `.partial`
is always whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from souplm.errors import SoupError
from souplm.io.checkpoint import plain_sha256 as file_sha256

RECORD = "stage.json"
MANIFEST = "family.json"
# Bump when a builder changes what it writes for the same config, so old folders are not reused.
BUILDER_VERSION = 1


@dataclass
class StageRun:
    """What a stage builder gets: its config, its input folders and the folder to write into."""

    name: str
    config: dict
    inputs: dict[str, Path]
    work: Path
    checkpoint_every_s: float = 300.0


@dataclass(frozen=True)
class Stage:
    """A named build step: `build(run)` writes the output into `run.work` and returns metrics."""

    name: str
    config: dict
    build: Callable[[StageRun], dict]
    inputs: tuple[str, ...] = ()
    # Fields read while building but not part of the recipe (e.g. where a package lives on this machine).
    notes: dict = field(default_factory=dict)


def stable_hash(obj: object) -> str:
    """sha256 of a JSON-able object, independent of dict ordering."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dir_digest(path: Path) -> str:
    """Digest of a folder's files (relative names and contents), ignoring the stage record itself."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel == RECORD:
            continue
        h.update(rel.encode() + b"\0" + file_sha256(file).encode() + b"\n")
    return h.hexdigest()


def stage_key(stage: Stage, input_digests: dict[str, str]) -> str:
    """Short hash naming the stage's output folder."""
    recipe = {"name": stage.name, "config": stage.config, "inputs": input_digests, "builder": BUILDER_VERSION}
    return stable_hash(recipe)[:12]


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.exists() else None


@contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """One builder per cache folder at a time; a second one fails fast instead of racing on `.partial`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise SoupError(f"another build is running in {folder} (pid {owner}); wait for it or stop it") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_manifest(folder: Path, quick: bool, record: dict) -> None:
    """Record one finished stage in `family.json` (read-modify-write, then atomic rename)."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.setdefault("stages", {})
    manifest["family_dir"] = str(folder)
    manifest["quick"] = quick
    manifest["stages"][record["name"]] = record
    manifest["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_stage(folder: Path, stage: Stage, upstream: dict[str, dict], checkpoint_every_s: float = 300.0) -> dict:
    """Build `stage` into `folder` unless an identical build is already there; return its record.

    `upstream` maps input stage names to their records (which carry their content digests).
    """
    missing = [name for name in stage.inputs if name not in upstream]
    if missing:
        raise SoupError(f"stage {stage.name} needs {', '.join(missing)} built first")
    digests = {name: upstream[name]["digest"] for name in stage.inputs}
    key = stage_key(stage, digests)
    final = folder / f"{stage.name}-{key}"
    record = read_record(final)
    if record is not None:
        print(f"[family] {stage.name}: up to date ({final.name})", file=sys.stderr, flush=True)
        return record
    work = folder / f"{stage.name}-{key}.partial"
    resumed = work.exists()
    work.mkdir(parents=True, exist_ok=True)
    print(f"[family] {stage.name}: {'resuming' if resumed else 'building'} {work.name}", file=sys.stderr, flush=True)
    start = time.monotonic()
    run = StageRun(stage.name, stage.config, {n: Path(upstream[n]["path"]) for n in stage.inputs}, work,
                   checkpoint_every_s)
    metrics = stage.build(run) or {}
    record = {
        "name": stage.name,
        "key": key,
        "dir": final.name,
        "path": str(final),
        "config": stage.config,
        "inputs": digests,
        "digest": dir_digest(work),
        "wall_s": round(time.monotonic() - start, 1),
        "resumed": resumed,
        "metrics": metrics,
        "notes": stage.notes,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (work / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if final.exists():  # a stale, record-less folder from an interrupted rename
        shutil.rmtree(final)
    work.rename(final)
    print(f"[family] {stage.name}: done in {record['wall_s']:.0f} s -> {final}", file=sys.stderr, flush=True)
    return record

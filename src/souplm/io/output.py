"""Atomic outputs: every directory or file souplm writes is built beside its target and put in place at the end.

The one mechanism behind every command's output (merge, learn, eval --out, sweep, greedy, search, plot):

- `check_output(target, inputs=..., files=..., folders=...)` refuses, with or without `--force`, an output that
  is, contains or lies inside an input model (symlinks resolved), that is or contains an input file or the
  recipe's folder, that is or contains the working directory (`-o .`), or whose parent is a file.
- `AtomicDir(target, force=...)` gives a staging directory `.NAME.partial-XXXX` in the target's parent (same
  file system, name shortened with a hash when NAME is long, the user's umask applied). `commit()` places it:
  `renameat2(RENAME_NOREPLACE)` for a new output (two writers: exactly one wins, the other gets a one-line
  error and the winner stays intact), `renameat2(RENAME_EXCHANGE)` for a `--force` replacement (at every
  instant either the old or the new complete output is in place), then the old one is removed. Where
  renameat2 is missing, a lock file beside the target (`.NAME.lock`, flock) is held from the check to the
  rename instead (a `--force` replacement is then two renames: see `_fallback_replace`).
- `AtomicFile(target)` does the same for one file (eval --out): a temp file beside, `os.replace` at the end.
- `staged_dir(target)` for report folders (sweep, search, plot) that may already hold files: a new folder is
  placed whole; into an existing one each file is moved in by an atomic rename.
- Each staging path has an owner file `.NAME.partial-XXXX.owner` (pid and boot id) locked with flock for the
  writer's lifetime. A later run removes a partial only when it can take that lock: the kernel drops it when
  its holder dies (SIGKILL included), so that partial is provably abandoned. Partials without an owner file
  (another tool's, or souplm before 0.x) are left alone.
- Every OSError of these steps (read-only file system, disk full, name too long, parent is a file...) becomes
  a one-line `OutputError` naming the path; whatever was staged is removed.

Fault injection for the tests: `SOUPLM_TEST_FAULT=<point>[:<action>]` makes `fault(point)` fail there;
action `kill` (SIGKILL, as a crash), `interrupt` (KeyboardInterrupt, as Ctrl-C; the default), `sleep=S`
(wait S seconds, to make two writers overlap), or an errno
name (`ENOSPC`, `EROFS`: an OSError with that errno naming the path).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import SoupError

__all__ = [
    "AtomicDir", "AtomicFile", "OutputError", "check_output", "clean_stale_partials", "fault",
    "os_error", "staged_dir",
]

FAULT_ENV = "SOUPLM_TEST_FAULT"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
# Longest NAME kept whole in `.NAME.partial-XXXXXXXXXXXX.owner` (file names are at most 255 bytes).
_MAX_STEM = 200


class OutputError(SoupError):
    """An output could not be written (or would overwrite what it must not); nothing was left behind."""


def os_error(e: OSError, what: str = "cannot write", path: str | os.PathLike | None = None) -> OutputError:
    """One line for an OSError: the path it concerns (`path` when the error names none) and the system's reason."""
    where = e.filename if e.filename is not None else path if path is not None else "?"
    if path is not None and ".partial-" in os.path.basename(os.fsdecode(where)):
        where = path  # name the output the user gave, not souplm's staging path beside it
    extra = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    reason = e.strerror or str(e)
    hint = {errno.ENOSPC: " (disk full)", errno.EROFS: " (read-only file system)",
            errno.ENAMETOOLONG: " (file name too long)", errno.ENOTDIR: " (a path component is a file)",
            errno.EACCES: " (permission denied)"}.get(e.errno or 0, "")
    if hint.strip(" ()").lower() in reason.lower():
        hint = ""
    if ".partial-" in os.path.basename(os.fsdecode(extra)):
        extra = ""
    return OutputError(f"{what} {where}{extra}: {reason}{hint}")


# -- test hook -----------------------------------------------------------------------------------------
def fault(point: str, path: str | os.PathLike | None = None) -> None:
    """Fail here when SOUPLM_TEST_FAULT names this point (tests only; a no-op otherwise)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name != point:
        return
    action = action or "interrupt"
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "interrupt":
        raise KeyboardInterrupt
    if action.startswith("sleep="):  # hold the step open (concurrency tests)
        time.sleep(float(action.removeprefix("sleep=")))
        return
    code = getattr(errno, action)
    raise OSError(code, os.strerror(code), None if path is None else str(path))


# -- renameat2 -------------------------------------------------------------------------------------------
_renameat2 = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
    _renameat2 = None


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False when the kernel, libc or file system lacks it (use the fallback)."""
    if _renameat2 is None or os.environ.get("SOUPLM_NO_RENAMEAT2"):
        return False
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


@contextlib.contextmanager
def _target_lock(target: Path) -> Iterator[None]:
    """The fallback: an flock on `.NAME.lock` beside the target, held from the check to the rename."""
    lock = target.parent / f".{_stem(target.name)}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- staging names and owner files ---------------------------------------------------------------------
def _stem(name: str) -> str:
    if len(os.fsencode(name)) <= _MAX_STEM:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return f"{os.fsencode(name)[:60].decode('utf-8', 'ignore')}~{digest}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class _Owner:
    """`PATH.owner`: locked (flock) while its writer lives; holds pid and boot id for people reading it."""

    def __init__(self, staged: Path):
        self.path = staged.with_name(staged.name + ".owner")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.write(self.fd, f"pid {os.getpid()}\nboot {_boot_id()}\n".encode())

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = -1


def clean_stale_partials(target: Path) -> list[Path]:
    """Remove `.NAME.partial-*` of this target whose writer is provably gone (its owner lock is free)."""
    parent, prefix = target.parent, f".{_stem(target.name)}.partial-"
    removed: list[Path] = []
    try:
        owners = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".owner")]
    except OSError:
        return removed
    for owner in owners:
        try:
            fd = os.open(owner, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive
            if not os.read(fd, 64).startswith(b"pid "):
                continue  # created, not yet claimed: leave it
            staged = owner.with_name(owner.name.removesuffix(".owner"))
            if staged.is_dir() and not staged.is_symlink():
                shutil.rmtree(staged, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()
            owner.unlink(missing_ok=True)
            removed.append(staged)
        finally:
            os.close(fd)
    return removed


# -- refusing outputs that would overwrite inputs ------------------------------------------------------
def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(
    target: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    files: Iterable[str | os.PathLike] = (),
    folders: Iterable[str | os.PathLike] = (),
    what: str = "output",
    report: bool = False,
) -> Path:
    """Refuse an output that would overwrite what it must not; returns the target's resolved path.

    `inputs`: models (directories or files): the output may not be, contain, or lie inside one.
    `files`: other inputs (coefficient tables, mapping specs, the recipe file): the output may not be or
    contain one. `folders` (the recipe's folder): the output may not be or contain one. The working
    directory counts as a folder too (`-o .`, `-o ..`).

    `report`: a folder that files are added to and nothing removed from (sweep, search, plot): it may hold
    inputs or be the working directory, but may not be or lie inside an input model.
    """
    for part in Path(target).parts:
        if len(os.fsencode(part)) > 255:
            raise OutputError(f"{what} {target}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long; "
                              "file names are at most 255 bytes (file name too long)")
    out = _real(target)
    for p in inputs:
        src = _real(p)
        if (_within(src, out) and not report) or (src.is_dir() and _within(out, src)):
            raise OutputError(f"{what} {target} would overwrite the input {p} (it is, holds or lies inside "
                              "an input model); choose another output path")
    for p in files:
        if _within(_real(p), out) and not (report and _real(p) != out):
            raise OutputError(f"{what} {target} would overwrite the input file {p}; choose another output path")
    try:
        cwd = [Path.cwd()]
    except OSError:  # the working directory was removed: nothing there to protect
        cwd = []
    for p in [] if report else [*folders, *cwd]:
        if _within(_real(p), out):
            kind = "the working directory" if Path(p) in cwd else "the recipe's folder"
            raise OutputError(f"{what} {target} is or holds {kind} {p}; choose a new directory for the output")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {target}: {parent} is a file, not a directory")
    return out


# -- a directory -----------------------------------------------------------------------------------------
class AtomicDir:
    """Build a directory beside `target` and put it in place with `commit()`; `abort()` removes it.

    Use as a context manager: leaving the block by an exception aborts (the old output stays).
    """

    def __init__(self, target: str | os.PathLike, *, force: bool = False, what: str = "output directory"):
        self.target = Path(target)
        self.force = force
        self.what = what
        self.path: Path | None = None
        self._owner: _Owner | None = None

    # checks -------------------------------------------------------------------------------------------
    def _occupied(self) -> bool:
        t = self.target
        try:
            if t.is_symlink() and not t.exists():
                raise OutputError(f"{self.what} {t} is a dangling symbolic link")
            if not t.exists():
                return False
            if not t.is_dir():
                raise OutputError(f"{self.what} {t} exists and is not a directory")
            return any(t.iterdir())
        except OSError as e:
            raise os_error(e, f"cannot use the {self.what}") from None

    def check(self) -> None:
        """The emptiness check alone (before any work): refuse a non-empty target without force."""
        if self._occupied() and not self.force:
            raise OutputError(f"{self.what} {self.target} exists and is not empty (use --force to replace it)")

    def open(self) -> Path:
        self.check()
        parent = self.target.parent
        try:
            if parent.exists() and not parent.is_dir():
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            parent.mkdir(parents=True, exist_ok=True)
            clean_stale_partials(self.target)
            staged = parent / f".{_stem(self.target.name)}.partial-{secrets.token_hex(6)}"
            fault("stage", staged)
            self._owner = _Owner(staged)
            self.path = staged
            os.mkdir(staged, 0o777)  # the user's umask applies (mkdtemp would give 0700)
        except OSError as e:
            self.abort()
            raise os_error(e, f"cannot create the {self.what}", self.target) from None
        return staged

    # placing ------------------------------------------------------------------------------------------
    def commit(self) -> Path:
        assert self.path is not None, "open() first"
        staged, t = self.path, self.target
        try:
            fault("before-rename", t)
            occupied = self._occupied()
            if occupied and not self.force:
                raise OutputError(f"{self.what} {t} was filled by someone else meanwhile; left it intact")
            if occupied:
                if _rename2(staged, t, RENAME_EXCHANGE):
                    fault("after-exchange", t)  # new in place, the old one at `staged`
                    shutil.rmtree(staged, ignore_errors=True)
                else:
                    self._fallback_replace(staged, t)
            elif not self._place_new(staged, t):
                raise OutputError(f"{self.what} {t} was created by someone else meanwhile; left it intact")
        except OSError as e:
            self.abort()
            raise os_error(e, path=t) from None
        except BaseException:
            self.abort()
            raise
        self._release()
        return t

    def _place_new(self, staged: Path, t: Path) -> bool:
        """Rename into a missing (or empty) target; False when another writer got there first."""
        if t.is_dir() and not t.is_symlink():
            # rename(2) replaces an empty directory atomically and fails on a non-empty one.
            try:
                os.rename(staged, t)
                return True
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return False
                raise
        try:
            if _rename2(staged, t, RENAME_NOREPLACE):
                return True
        except FileExistsError:
            return False
        with _target_lock(t):
            if t.exists() or t.is_symlink():
                return False
            os.rename(staged, t)
            return True

    def _fallback_replace(self, staged: Path, t: Path) -> None:
        # Without RENAME_EXCHANGE: two renames under the lock. The old output is moved aside to `.NAME.old-XXXX`
        # (no owner file: never cleaned automatically), put back on an error; only a SIGKILL between the two
        # renames leaves the target missing, with the old output whole in `.NAME.old-XXXX`.
        with _target_lock(t):
            old = t.parent / f".{_stem(t.name)}.old-{secrets.token_hex(6)}"
            os.rename(t, old)
            try:
                fault("after-exchange", t)
                os.rename(staged, t)
            except BaseException:
                if not t.exists():
                    os.rename(old, t)  # put the old output back
                raise
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self.path.unlink()
        self._release()

    def _release(self) -> None:
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


# -- one file ------------------------------------------------------------------------------------------------
class AtomicFile:
    """Write one file beside `target` and `os.replace` it into place (an existing file is replaced whole)."""

    def __init__(self, target: str | os.PathLike, what: str = "output file"):
        self.target = Path(target)
        self.what = what
        self.path: Path | None = None
        self._owner: _Owner | None = None

    def __enter__(self) -> Path:
        t = self.target
        if t.is_dir():
            raise OutputError(f"{self.what} {t} is a directory; give a file name")
        try:
            if t.parent.exists() and not t.parent.is_dir():
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(t.parent))
            t.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_partials(t)
            self.path = t.parent / f".{_stem(t.name)}.partial-{secrets.token_hex(6)}"
            self._owner = _Owner(self.path)
        except OSError as e:
            self._cleanup()
            raise os_error(e, f"cannot create the {self.what}", t) from None
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._cleanup()
            if isinstance(exc, OSError):
                raise os_error(exc, path=self.target) from None
            return
        try:
            fault("before-rename", self.target)
            if self.target.is_dir():
                raise OutputError(f"{self.what} {self.target} is a directory; give a file name")
            os.replace(self.path, self.target)
        except OSError as e:
            self._cleanup()
            raise os_error(e, path=self.target) from None
        except BaseException:
            self._cleanup()
            raise
        self._owner.release()

    def _cleanup(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._owner is not None:
            self._owner.release()
            self._owner = None


def write_text(target: str | os.PathLike, text: str, what: str = "output file") -> Path:
    """`Path.write_text`, atomically (the user's umask applies)."""
    with AtomicFile(target, what) as tmp:
        fault("write")
        tmp.write_text(text)
    return Path(target)


# -- a report folder (may already hold files) ---------------------------------------------------------
@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Yield a staging folder; on success a new target is placed whole, an existing one gets each staged file
    by an atomic rename (every file is then the old complete one or the new complete one)."""
    t = Path(target)
    if t.exists() and not t.is_dir():
        raise OutputError(f"{what} {t} exists and is not a directory")
    if not t.exists():
        with AtomicDir(t, what=what) as staged:
            try:
                yield staged
                fault("write")
            except OSError as e:
                raise os_error(e, path=t) from None
        return
    ad = AtomicDir(t, force=True, what=what)
    staged = ad.open()
    try:
        try:
            yield staged
            fault("write")
            fault("before-rename", t)
            for f in sorted(staged.rglob("*")):
                if f.is_dir():
                    continue
                dest = t / f.relative_to(staged)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.is_dir():
                    raise OutputError(f"{what} {t}: {dest} is a directory; cannot replace it with a file")
                os.replace(f, dest)
        except OSError as e:
            raise os_error(e, path=t) from None
    finally:
        ad.abort()

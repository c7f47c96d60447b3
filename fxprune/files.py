"""Files written whole or not at all, and result folders swapped in whole.

Invariants every writer in fxprune keeps (the user's data is never lost):

* A file is written to a temp file created exclusively (``O_EXCL``, unpredictable name) in the
  target's folder, flushed and fsynced, given the permissions the umask gives, then renamed
  over the target. ``os.replace`` replaces a symlink planted at the target; it never writes
  through it.
* A result *set* (model, plan, reports) is built in a temp folder beside the target and swapped
  in at the end with one atomic exchange (``renameat2(RENAME_EXCHANGE)`` on Linux, two renames
  elsewhere), so an interrupt at any moment leaves the complete earlier result or the complete
  new one.
* An existing folder is replaced only when every entry in it is a file fxprune wrote there
  (listed in its manifest). A folder holding anything else is refused: fxprune never deletes a
  file it did not write.
* Writers to one target are serialised by a lock file; the second fails at once with a clear
  message. Temp files and folders left by a killed run carry the writer's pid in their names
  and are removed (or an interrupted swap is rolled back) by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fxprune._version import __version__
from fxprune.errors import FxpruneError

logger = logging.getLogger(__name__)

MANIFEST = ".fxprune-result.json"
_TAG = ".fxprune-"  # every temp / lock / backup name fxprune makes contains it
_umask_lock = threading.Lock()


class OutputError(FxpruneError):
    """An output path cannot be written safely (exists, holds user files, locked, read-only)."""


def current_umask() -> int:
    with _umask_lock:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def _temp_name(target: Path, kind: str) -> str:
    return f".{target.name}{_TAG}{kind}-{os.getpid()}-{secrets.token_hex(6)}"


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` whole or not at all (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name.")
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_name(path, "tmp") + ".")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


@contextlib.contextmanager
def temp_dir_beside(target: str | os.PathLike) -> Iterator[Path]:
    """A private temp folder next to ``target`` (same filesystem), removed on exit."""
    target = Path(target)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_name(target, "tmp") + "."))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temp folder, never a user's


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    try:
        return int(name.split(_TAG, 1)[1].split("-")[1])
    except (IndexError, ValueError):
        return None


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove temp files/folders for ``target`` left by a killed fxprune run; roll back a swap.

    Only names fxprune made (``.<name>.fxprune-<kind>-<pid>-<random>``) whose process is gone
    are touched. A backup of an earlier result whose swap was interrupted is moved back when the
    target itself is missing.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    prefix = f".{target.name}{_TAG}"
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(prefix)]
    except FileNotFoundError:
        return removed
    for entry in entries:
        kind = entry.name[len(prefix) :].split("-", 1)[0]
        path = Path(entry.path)
        if kind == "lock":
            if _remove_if_unlocked(path):
                removed.append(path)
                logger.warning("removed %s, left by a killed fxprune run", path)
            continue
        pid = _owner_pid(entry.name)
        if pid is None or _pid_alive(pid):
            continue
        if kind == "old" and not os.path.lexists(target):
            os.rename(path, target)
            logger.warning("restored %s from an interrupted run (pid %d)", target, pid)
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        logger.warning("removed %s, left by an interrupted fxprune run (pid %d)", path, pid)
    return removed


def _remove_if_unlocked(path: Path) -> bool:
    """Delete a lock file nobody holds (its writer was killed); the kernel freed its lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a live writer holds it (this process too: flock is per open)
        os.close(fd)
        return False
    try:
        os.unlink(path)  # while holding it: a writer that opened it meanwhile sees the change
    finally:
        os.close(fd)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _manifest_files(folder: Path) -> set[str] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
        return set(data["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that fxprune did not write there (per its manifest)."""
    entries = sorted(os.listdir(folder))
    ours = _manifest_files(folder) or set()
    return [e for e in entries if e not in ours]


def check_output_folder(path: str | os.PathLike, force: bool, option: str = "--out") -> Path:
    """Validate an output folder before any work: returns its absolute path or raises."""
    target = Path(path).expanduser().absolute()
    cwd = Path.cwd().absolute()
    if target == cwd or target in cwd.parents:
        raise OutputError(
            f"{option} {path}: that is the folder you are working in (or one of its parents); "
            f"fxprune writes results into a folder of their own. Give a new folder, e.g. "
            f"{option} {Path(path) / 'fxprune-out'}."
        )
    if target.exists() and not target.is_dir():
        raise OutputError(f"{option} {path}: a file with that name exists; give a folder name.")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{option} {path}: {parent} is not writable; give a folder you can write."
        )
    if target.is_dir() and any(target.iterdir()):
        foreign = foreign_entries(target)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise OutputError(
                f"{option} {path} holds files fxprune did not write ({shown}); fxprune never "
                f"deletes them. Give a new or empty folder."
            )
        if not force:
            raise OutputError(
                f"{option} {path} holds an earlier fxprune result; pass --force to replace it."
            )
    return target


def check_output_file(path: str | os.PathLike, force: bool, option: str, suffix: str) -> Path:
    """Validate an output file before any work: returns its path or raises."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(
            f"{option} {path} is a folder; give a file name, e.g. {p / ('model' + suffix)}."
        )
    if not p.parent.is_dir():
        raise OutputError(f"{option} {path}: the folder {p.parent} does not exist.")
    if p.exists() and not force:
        raise OutputError(f"{option} {path} exists; pass --force to replace it.")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: {p.parent} is not writable.")
    return p


class ResultFolder:
    """Build a set of result files and swap it in at ``target`` whole.

    ``with ResultFolder(out, force=True) as rf: write into rf.path / "name"; rf.commit()``.
    Leaving the block without ``commit()`` (an error, Ctrl-C) discards the new files and
    leaves any earlier result as it was.
    """

    def __init__(self, target: str | os.PathLike, force: bool = False, option: str = "--out"):
        self.option = option
        self.force = force
        self.requested = target
        self.target = check_output_folder(target, force, option)
        self.path: Path | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.target.parent / f".{self.target.name}{_TAG}lock"
        self.committed = False

    def __enter__(self) -> ResultFolder:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            remove_stale_temps(self.target)
            self.path = Path(
                tempfile.mkdtemp(dir=self.target.parent, prefix=_temp_name(self.target, "tmp"))
            )
            os.chmod(self.path, 0o777 & ~current_umask())
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.path is not None and self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)  # our own temp folder
        finally:
            self._release_lock()

    def commit(self) -> Path:
        """Write the manifest and swap the new result in; returns the target path."""
        assert self.path is not None, "commit() inside the with-block"
        files = sorted(os.listdir(self.path))
        manifest = {"files": files, "fxprune": __version__, "written": time.time()}
        write_text_atomic(self.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        check_output_folder(self.requested, self.force, self.option)  # again: it may have changed
        if not self.target.exists():
            os.rename(self.path, self.target)
        elif _exchange(self.path, self.target):
            self._discard_old(self.path)
        else:
            backup = self.target.parent / _temp_name(self.target, "old")
            os.rename(self.target, backup)
            os.rename(self.path, self.target)
            self._discard_old(backup)
        self.path = None
        self.committed = True
        return self.target

    def _discard_old(self, old: Path) -> None:
        """Delete an earlier result that was swapped out: only the files its manifest lists."""
        ours = _manifest_files(old) or set()
        for name in os.listdir(old):
            p = old / name
            if name in ours and (p.is_file() or p.is_symlink()):
                p.unlink()
        try:
            old.rmdir()
        except OSError:
            logger.warning("kept %s: it holds files fxprune did not write", old)

    def _acquire_lock(self) -> None:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"{self.option} {self.requested}: another fxprune run is writing there right "
                f"now; wait for it to finish or choose another folder."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self._lock_path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the file was removed (its holder finished, or it was stale): retry
            os.close(fd)
            return self._acquire_lock()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.stat(self._lock_path, follow_symlinks=False).st_mode):
                os.unlink(self._lock_path)
        os.close(self._lock_fd)
        self._lock_fd = None


def write_result(
    target: str | os.PathLike,
    files: dict[str, bytes],
    *,
    force: bool = False,
    option: str = "--out",
) -> Path:
    """Write ``files`` ({name: bytes}) as one result folder at ``target``, whole or not at all."""
    with ResultFolder(target, force=force, option=option) as rf:
        for name, data in files.items():
            write_bytes_atomic(rf.path / name, data)
        return rf.commit()

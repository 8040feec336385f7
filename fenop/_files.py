"""Writing a file or folder atomically: all of it appears, or nothing changes."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fenop._checks import missing_folder
from fenop._errors import InputError


@contextlib.contextmanager
def replacing(target: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yield a hidden staging path beside ``target`` to write; when the block ends
    without error it replaces ``target`` (a file, or with ``folder`` a directory),
    else it is removed and ``target`` is as it was.

    The staging path is in ``target``'s folder, so the final rename is atomic on
    POSIX file systems; its name holds the writer's process ID, so that what a
    killed writer left (SIGKILL gives no chance to clean up) is removed by the next
    write of ``target`` (:func:`recover`). Raises :class:`~fenop._errors.InputError`
    naming ``target`` when its folder does not exist or cannot be written.
    """
    target = Path(target)
    if problem := missing_folder(target):
        raise InputError(f"{target}: {problem}")
    if not folder and target.is_dir():
        raise InputError(f"{target}: is a folder; name a file to write")
    recover(target)
    prefix = f".{target.name}.{os.getpid()}."
    try:
        if folder:
            staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=_PARTIAL, dir=target.parent))
        else:
            handle, name = tempfile.mkstemp(prefix=prefix, suffix=_PARTIAL, dir=target.parent)
            os.close(handle)
            staging = Path(name)
    except OSError as exc:
        raise InputError(f"{target}: cannot be written ({exc.strerror})") from None
    try:
        yield staging
        # mkdtemp and mkstemp make private entries; the result is an ordinary one.
        umask = os.umask(0)
        os.umask(umask)
        if folder:
            staging.chmod(0o777 & ~umask)
            for file in staging.iterdir():
                file.chmod(0o666 & ~umask)
            if target.exists():
                # A rename cannot replace a non-empty folder: move the old one aside
                # first (where recover() finds it if the process dies in between).
                old = _aside(target)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(staging, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, target)
        else:
            staging.chmod(0o666 & ~umask)
            try:
                os.replace(staging, target)
            except OSError as exc:  # the user's path, not the hidden staging file's
                raise InputError(f"{target}: cannot be written ({exc.strerror})") from None
    except BaseException:
        if folder:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        raise


_PARTIAL = ".partial"


def _aside(target: Path) -> Path:
    """Where :func:`replacing` keeps the folder it replaces for a moment."""
    return target.with_name(f".{target.name}.old")


def recover(target: str | os.PathLike) -> None:
    """Undo what a writer of ``target`` killed mid-write left beside it: its hidden
    staging files and folders (those of processes no longer running) are removed,
    and a folder it had moved aside to replace is put back if nothing replaced it."""
    target = Path(target)
    old = _aside(target)
    if old.is_dir():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
    if not target.parent.is_dir():
        return
    for entry in target.parent.glob(f".{glob.escape(target.name)}.*{_PARTIAL}"):
        pid = entry.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process; leave its files alone
        return True
    return True


class Locked(Exception):
    """The lock is held by another process; the message names it, as it wrote itself."""


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, *, holder: str) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path`` (a hidden file beside what it guards)
    for the block, writing ``holder`` into it; yields whether a lock is held (``False``
    where the file system has no locks, as some network mounts: the block then
    runs unguarded). Raises :class:`Locked` with the holder's text if another
    process holds it.

    The file is removed on release, while still locked: a process that opened it
    just before then finds, once it has the lock, that the path no longer names the
    file it locked, and tries again. So no lock file stays behind a finished run
    (one killed leaves it, and the next run removes it).
    """
    lock_path = Path(lock_path)
    try:
        import fcntl
    except ImportError:  # not POSIX: filelock, whose file stays
        import filelock

        lock = filelock.FileLock(lock_path, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise Locked(_holder(lock_path)) from None
        try:
            yield True
        finally:
            lock.release()
        return
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Locked(_holder(lock_path)) from None
        except OSError:  # no locks on this file system
            os.close(fd)
            yield False
            return
        try:
            now = os.stat(lock_path)
            mine = os.fstat(fd)
            same = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed by its holder as we locked it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        yield True
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip()
    except OSError:
        return ""

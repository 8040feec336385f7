"""Writing a file or folder atomically: all of it appears, or nothing changes."""

from __future__ import annotations

import contextlib
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
    POSIX file systems. Raises :class:`~fenop._errors.InputError` naming ``target``
    when its folder does not exist or cannot be written.
    """
    target = Path(target)
    if problem := missing_folder(target):
        raise InputError(f"{target}: {problem}")
    if not folder and target.is_dir():
        raise InputError(f"{target}: is a folder; name a file to write")
    try:
        if folder:
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        else:
            handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
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
                # A rename cannot replace a non-empty folder: move the old one aside first.
                old = target.with_name(f".{target.name}.old")
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

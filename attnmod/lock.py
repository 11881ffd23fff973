"""An exclusive lock on an output folder, so two runs never write the same scan at once.

The lock is ``fcntl.flock`` on ``<folder>/.attnmod.lock``, which holds the pid of the run holding it.
The operating system releases it when that process ends, however it ends; the file itself stays
(removing it would let a later run lock a new file while another still holds the old one). Where
there is no ``fcntl`` (Windows) runs are not guarded.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".attnmod.lock"
_HELD: dict[tuple[str, int], int] = {}  # (folder, thread) -> depth: a holder may lock again (influence -> scan)


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the lock on ``folder`` (created if missing) for the ``with`` block.

    ValueError at once, one line, if another run holds it, or if the folder cannot be made or written.
    The same thread may take it again inside the block (the inner ``with`` then does nothing)."""
    folder = Path(folder)
    _make_folder(folder)
    key = (os.path.realpath(folder), threading.get_ident())
    if fcntl is None or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    fd = _open_lock_file(folder)
    try:
        if not _try_lock(fd):
            raise ValueError(f"{folder} is being written by another attnmod run (pid {_holder(fd)}); "
                             "wait for it or choose another --out")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = 1
        try:
            yield folder
        finally:
            del _HELD[key]
            with suppress(OSError):
                os.ftruncate(fd, 0)  # no holder now
    finally:
        os.close(fd)  # releases the lock


def _make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot make the folder {folder}: {e.strerror or e}") from None


def _open_lock_file(folder: Path) -> int:
    try:
        return os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ValueError(f"cannot write in {folder}: {e.strerror or e}") from None


def _try_lock(fd: int) -> bool:
    """Take the lock without waiting; False if another run holds it. A file system without locks
    (some network mounts) lets the run go unguarded rather than not at all."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return False
    return True


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file ("unknown" while it is writing it)."""
    try:
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    except (OSError, ValueError):
        return "unknown"

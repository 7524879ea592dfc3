"""Atomic file writes: a crash leaves the previous file or the new one, never a torn one.

Everything the package persists (indexes, run files, checkpoints, model copies) goes through this module.
:func:`atomic_write` writes the bytes to a temporary file in the same folder, fsyncs it and renames it over
the target (``os.replace`` is atomic on POSIX and Windows), then fsyncs the folder so the rename itself
survives a crash. :func:`staging_folder` is the same for a whole folder, which the caller renames into place.

A process killed mid-save (SIGKILL, or a SIGTERM, which Python does not turn into an exception) leaves its
temporary behind, as large as what it was writing. So a temporary is named after its owner,
``.{target}.{host}.{pid}.{random}.tmp``, and every save of a target (and loads, which call it too) first runs
:func:`remove_stale_temporaries`: it removes the target's temporaries whose process is gone (this host, pid
no longer running). One of a live process, of another host (a shared filesystem) or with a name it cannot
parse is left alone, so a save in progress is never broken.

Files are created with mode 0o666 and folders 0o777, less the process umask, as ``open`` and ``mkdir`` do;
``tempfile`` would make them private (0o600, 0o700) whatever the umask.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_OWNER = re.compile(r"(\d+)\.[0-9a-f]{8}\.tmp")  # what follows ".{target}.{host}." in a temporary's name
_NEW_FILE = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)  # O_BINARY: Windows, no CRLF


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on clean exit it replaces ``path``, on error it is removed."""
    path = Path(path)
    tmp = _new_temporary(path)
    fd = os.open(tmp, _NEW_FILE, 0o666)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


@contextmanager
def staging_folder(path: str | Path) -> Iterator[Path]:
    """An empty folder next to ``path`` to fill and rename to ``path``; removed on exit if still there.

    The caller renames, because callers differ on an existing ``path``: a checkpoint replaces it, a model
    copy that another process finished first is kept.
    """
    path = Path(path)
    tmp = _new_temporary(path)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_folder(path.parent)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of ``path`` whose writing process died on this host; returns them.

    Loads call it too, so a killed save's leftovers go even if the target is never saved again. A
    temporary that cannot be removed (a read-only folder) is logged and left: a load must not fail for it.
    """
    path = Path(path)
    prefix = f".{path.name}.{socket.gethostname()}."
    try:
        entries = list(os.scandir(path.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        owner = _OWNER.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if owner is None or _running(int(owner[1])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another process cleaned it first
            continue
        except OSError as err:
            log.warning("cannot remove %s, left by process %s that died writing it: %s", entry.path, owner[1], err)
            continue
        log.info("removed %s, left by process %s that died writing it", entry.path, owner[1])
        removed.append(Path(entry.path))
    return removed


def _new_temporary(path: Path) -> Path:
    """A fresh name next to ``path`` that says who writes it, after clearing the dead writers' ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _running(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


def _fsync_folder(folder: Path) -> None:
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Crash-safe file writes: temp name in the same directory, fsync, rename, fsync the directory.

A reader (or a restarted service) therefore sees either the old file or the whole new one, and a
file the database points at is never half written.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp-edgescreen"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview, *, durable: bool = True, mode: int = 0o644) -> Path:
    """Write `data` to `path` atomically; with durable=True it is on disk when this returns.

    The one way every part of the appliance writes a file that another process reads (results,
    checkpoints, bundles, reports); the DICOM receive path has its own tuned variant in instances.py.
    """
    path = Path(path)
    created = _make_parents(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}{TMP_SUFFIX}", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; the other services must be able to read results
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
        for directory in created:  # a new directory's own entry must be durable too
            fsync_dir(directory.parent)
    return path


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p that returns the directories it created, outermost first."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def atomic_write_text(path: Path, text: str, *, durable: bool = True, mode: int = 0o644) -> Path:
    return atomic_write(path, text.encode("utf-8"), durable=durable, mode=mode)


STALE_TEMP_S = 3600.0


def _writer_alive(tmp: Path) -> bool | None:
    """Temp names end in the writer's pid; None when the name does not tell (then age decides)."""
    match = re.search(r"\.(\d{1,7})(?:\.\d+)?" + re.escape(TMP_SUFFIX) + "$", tmp.name)
    if match is None:
        return None
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return None
    return True


def remove_temp_files(root: Path, *, now: float | None = None) -> list[Path]:
    """Delete temp files a crash left behind: never renamed, so nothing refers to them.

    A temp file younger than an hour is left alone unless its writer is known to be dead: another
    service on this data directory may be writing it right now.
    """
    import time

    now = time.time() if now is None else now
    removed = []
    if root.exists():
        for tmp in root.rglob(f"*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if _writer_alive(tmp) is not False and now - tmp.stat().st_mtime < STALE_TEMP_S:
                    continue
                tmp.unlink()
                removed.append(tmp)
    return removed

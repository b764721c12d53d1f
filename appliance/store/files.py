"""Crash-safe file writes: temp name in the same directory, fsync, rename, fsync the directory.

A reader (or a restarted service) therefore sees either the old file or the whole new one, and a
file the database points at is never half written.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp-edgescreen"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview, *, durable: bool = True) -> Path:
    """Write `data` to `path` atomically; with durable=True it is on disk when this returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
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
    return path


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> Path:
    return atomic_write(path, text.encode("utf-8"), durable=durable)


def remove_temp_files(root: Path) -> list[Path]:
    """Delete temp files a crash left behind; they were never renamed, so nothing refers to them."""
    removed = []
    if root.exists():
        for tmp in root.rglob(f"*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed

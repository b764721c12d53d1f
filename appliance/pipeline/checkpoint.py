"""Checkpoints and preemption: a job stopped at a safe point resumes where it stopped.

The scanner has priority over inference, so the worker asks a gate at every safe point (before each
stage, between sliding-window tile batches). When the gate says stop, the running stage saves what it
has (finished stages are already saved) and raises `Preempted`; the scheduler requeues the job and a
later run with the same checkpoint directory skips the finished stages and continues at the next tile.

Every file is written to a temporary name, fsynced and renamed, and the JSON sidecar is written last
and names the size and sha256 of its npz: a power cut mid-write leaves either the old state or none,
never a torn one. A checkpoint made for other inputs or other models (its key differs) is discarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store.files import atomic_write, fsync_dir  # noqa: F401 - re-exported

log = get_logger("edgescreen.appliance.pipeline.checkpoint")

Gate = Callable[[str], bool]
_KEY_FILE = "key.json"


class Preempted(Exception):  # noqa: N818 - the name says what happened, as the scheduler reads it
    """The gate said stop at `safe_point`; the state up to there is saved in the checkpoint directory."""

    def __init__(self, safe_point: str) -> None:
        super().__init__(f"preempted at safe point {safe_point!r}")
        self.safe_point = safe_point


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never half of either."""
    atomic_write(path, data, mode=mode)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def check_gate(gate: Gate | None, safe_point: str) -> None:
    """Ask the gate; raise `Preempted` when it says stop (the caller has saved its state before asking)."""
    if gate is not None and not gate(safe_point):
        log.info("preempted", safe_point=safe_point)
        raise Preempted(safe_point)


class CheckpointStore:
    """Named states (a dict of arrays plus a JSON meta) in one directory; a no-op without a directory.

    `key` identifies the job (inputs, models, operating point): a directory holding another key is
    emptied first, so a checkpoint is never applied to inputs or models it was not made for.
    """

    def __init__(self, directory: Path | None, key: dict[str, Any]) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.key = key
        if self.directory is not None:
            self._claim(self.directory)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _claim(self, directory: Path) -> None:
        key_path = directory / _KEY_FILE
        if key_path.is_file():
            try:
                stored = json.loads(key_path.read_text())
            except (OSError, json.JSONDecodeError):
                stored = None
            if stored == self.key:
                return
            log.warning("checkpoint made for other inputs or models; discarded", directory=str(directory))
            remove_states(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(key_path, self.key)

    @staticmethod
    def _paths(directory: Path, name: str) -> tuple[Path, Path]:
        safe = name.replace("/", "_")
        return directory / f"{safe}.npz", directory / f"{safe}.json"

    def save(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Persist one state: the npz first, then the JSON that commits it."""
        if self.directory is None:
            return
        npz_path, json_path = self._paths(self.directory, name)
        data = _npz_bytes(arrays)
        atomic_write_bytes(npz_path, data)
        record = {"meta": meta, "npz_bytes": len(data), "npz_sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_json(json_path, record)

    def load(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The saved state, or None when absent or damaged (then the stage simply runs again)."""
        if self.directory is None:
            return None
        npz_path, json_path = self._paths(self.directory, name)
        if not json_path.is_file() or not npz_path.is_file():
            return None
        try:
            record = json.loads(json_path.read_text())
            data = npz_path.read_bytes()
            if len(data) != record["npz_bytes"] or hashlib.sha256(data).hexdigest() != record["npz_sha256"]:
                raise ValueError("npz does not match its sidecar")
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("damaged checkpoint ignored", state=name, error=str(exc))
            return None
        return arrays, record["meta"]

    def drop(self, name: str) -> None:
        if self.directory is None:
            return
        for path in self._paths(self.directory, name):
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the checkpoint once the job's results are safely written."""
        if self.directory is not None:
            remove_states(self.directory)


def remove_states(directory: Path) -> None:
    """Delete what a CheckpointStore writes (and only that), then the directory if it is left empty:
    a checkpoint directory pointed at the wrong place must not cost anyone their files."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for pattern in ("*.npz", "*.json", ".*.tmp"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: someone else's files live there too
        directory.rmdir()

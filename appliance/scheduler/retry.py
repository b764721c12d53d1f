"""Bounded retries for system errors: which errors are worth retrying, how often and how long to wait.

A job that fails because of the box rather than its input (a full disk, a database locked by a long
backup, a flaky USB disk) is retried after an exponential backoff with jitter, counted per error class
(a disk that fills and a database that locks are different problems; each gets its own budget). After
its budget the job fails with the error and what to do, visible in `edgescreen jobs` and the UI.
Anything else (a bug, a broken model) fails the job at once; bad input quarantines it.
"""

from __future__ import annotations

import errno
import random
import sqlite3

from edgescreen.appliance.config.site import RetryPolicy


def delay(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half the step fixed, half random, so jobs that failed
    together do not retry together, yet each waits at least half its step."""
    step = min(policy.max_s, policy.base_s * 2 ** max(0, attempt - 1))
    return step / 2 + (rng or random).uniform(0, step / 2)


# error class -> default policy. A full disk is not fixed in seconds; a locked database usually is.
DEFAULT_POLICIES: dict[str, RetryPolicy] = {
    "disk_full": RetryPolicy(retries=5, base_s=60.0, max_s=3600.0),
    "database": RetryPolicy(retries=8, base_s=5.0, max_s=600.0),
    "io": RetryPolicy(retries=4, base_s=30.0, max_s=1800.0),
    # another process's spike (a training run, a big upload) can starve the box for a while; a study that
    # always runs it out of memory fails after these few tries (and a worker the kernel kills counts as a
    # crash: scheduler.max_crashes)
    "memory": RetryPolicy(retries=3, base_s=60.0, max_s=900.0),
}
ERROR_CLASSES = tuple(DEFAULT_POLICIES)

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_HINT = "free space on the data disk (`edgescreen purge --dry-run` shows what retention can delete)"


def classify(exc: BaseException) -> str | None:
    """The retryable class of a system error, or None when retrying cannot help."""
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if "full" in text:
            return "disk_full"
        if "locked" in text or "busy" in text or "disk i/o" in text or "unable to open" in text:
            return "database"
        return None
    if isinstance(exc, OSError):
        if exc.errno in _DISK_FULL:
            return "disk_full"
        if exc.errno in (errno.EIO, errno.EROFS, errno.EAGAIN, errno.EBUSY, errno.ENOMEM, errno.EMFILE, errno.ENFILE):
            return "io"
        return None
    return None


def describe(exc: BaseException, error_class: str) -> str:
    """The error as staff read it: what happened and where to look."""
    text = f"{type(exc).__name__}: {exc}"
    if error_class == "disk_full":
        return f"data disk full ({text}); {_DISK_FULL_HINT}"
    if error_class == "memory":
        return f"out of memory ({text}); close other programs on the box or use a smaller hardware profile"
    if error_class == "database":
        return f"database unavailable ({text}); is another program holding the database or the disk failing?"
    return f"I/O error ({text}); check the data disk (`dmesg`, `edgescreen doctor`)"


def policies(overrides: dict[str, RetryPolicy] | None = None) -> dict[str, RetryPolicy]:
    return {**DEFAULT_POLICIES, **(overrides or {})}

"""The store: one SQLite database (WAL) plus a directory of files, shared by the four services."""

from edgescreen.appliance.store.db import Store, StoreError
from edgescreen.appliance.store.files import atomic_write, fsync_dir
from edgescreen.appliance.store.jobs import JOB_STATES, InvalidTransition

__all__ = ["JOB_STATES", "InvalidTransition", "Store", "StoreError", "atomic_write", "fsync_dir"]

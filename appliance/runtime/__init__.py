"""Inference backends behind one interface; one plugin module per vendor library.

Each backend imports its vendor library lazily, so a box without OpenVINO or TensorRT still
imports everything else; such a backend reports itself as unavailable with the reason.
"""

from edgescreen.appliance.runtime.base import (
    Backend,
    BackendUnavailable,
    Session,
    available_backends,
    get_backend,
)

__all__ = ["Backend", "BackendUnavailable", "Session", "available_backends", "get_backend"]

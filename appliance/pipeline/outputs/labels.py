"""The label volume beside findings.json: what the web viewer draws on each slice, compact and exact.

Format "edgescreen-labels/1" (labels.npz, numpy savez_compressed; read with `read_labels`):

- ``format``: the string "edgescreen-labels/1".
- ``source_grid``: JSON (shape, spacing, origin, direction; LPS mm) of the source series as loaded,
  slices in the order of ``slice_uids`` (ascending position along the slice normal, as in the SEG).
- ``slice_uids``: the SOPInstanceUID of each source slice (str array, length = source_grid.shape[0]).
- ``organs``: uint8, stage 1's argmax on its own grid (about 3 mm; canonical LPS orientation);
  ``organs_grid``: that grid as JSON; ``organ_classes``: the class name of each label value.
- ``masks_start`` (3 ints) and ``pancreas`` / ``lesions`` (uint8): full-resolution masks on the SOURCE
  grid, cut to the box that holds them (starting at masks_start): pancreas 0/1, lesions 0 or k for
  "lesion_k" (the ids of findings.json and the SEG's segments). Absent when nothing was found.

`slice_labels(labels, z)` gives the three label images of source slice z (rows x columns of the source
image), which is all a viewer needs to draw contours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.pipeline.preprocess import Grid, bbox
from edgescreen.appliance.store.files import atomic_write

FORMAT = "edgescreen-labels/1"
FILE_NAME = "labels.npz"


def write_labels(path: Path, *, source_grid: Grid, slice_uids: list[str], organs: np.ndarray, organs_grid: Grid,
                 organ_classes: list[str], source_masks: dict[str, np.ndarray]) -> Path:
    """Write the label volume atomically. `source_masks` are "pancreas" and "lesion_k" on the source grid."""
    import io

    arrays: dict[str, Any] = {
        "format": np.array(FORMAT), "source_grid": np.array(json.dumps(source_grid.to_json())),
        "slice_uids": np.array(slice_uids, dtype=str), "organs": organs.astype(np.uint8, copy=False),
        "organs_grid": np.array(json.dumps(organs_grid.to_json())), "organ_classes": np.array(organ_classes, dtype=str),
    }
    union = None
    for mask in source_masks.values():
        union = mask.astype(bool) if union is None else (union | mask.astype(bool))
    box = bbox(union) if union is not None else None
    if box is not None:
        lo, hi = box[0], box[1] + 1
        cut = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        lesions = np.zeros(tuple(int(b - a) for a, b in zip(lo, hi, strict=True)), dtype=np.uint8)
        for key, mask in sorted(source_masks.items()):
            if key.startswith("lesion_"):
                lesions[mask[cut] != 0] = int(key[7:])
        arrays["masks_start"] = np.asarray(lo, dtype=np.int32)
        arrays["lesions"] = lesions
        if "pancreas" in source_masks:
            arrays["pancreas"] = (source_masks["pancreas"][cut] != 0).astype(np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write(Path(path), buffer.getbuffer())


def read_labels(path: Path) -> dict[str, Any]:
    """The label volume as a dict (grids as Grid objects); ValueError on another format."""
    with np.load(Path(path), allow_pickle=False) as data:
        raw = {k: data[k] for k in data.files}
    if str(raw.get("format")) != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} file (format {raw.get('format')!r})")
    out: dict[str, Any] = dict(raw)
    out["source_grid"] = Grid.from_json(json.loads(str(raw["source_grid"])))
    out["organs_grid"] = Grid.from_json(json.loads(str(raw["organs_grid"])))
    out["slice_uids"] = [str(u) for u in raw["slice_uids"]]
    out["organ_classes"] = [str(c) for c in raw["organ_classes"]]
    return out


def slice_labels(labels: dict[str, Any], z: int) -> dict[str, np.ndarray]:
    """{"organs", "pancreas", "lesions"}: uint8 (rows, columns) label images of source slice z."""
    grid: Grid = labels["source_grid"]
    organs_grid: Grid = labels["organs_grid"]
    rows, cols = grid.shape[1], grid.shape[2]
    # source voxel (z, j, i) -> organ-grid index is affine: origin + j * step_j + i * step_i for this slice. Built
    # per axis from a row and a column (no (rows*cols, 3) matrix products): a viewer draws this at scroll speed.
    origin = organs_grid.to_index(grid.to_lps(np.array([[z, 0, 0]])))[0]
    step_j = organs_grid.to_index(grid.to_lps(np.array([[z, 1, 0]])))[0] - origin
    step_i = organs_grid.to_index(grid.to_lps(np.array([[z, 0, 1]])))[0] - origin
    j, i = np.arange(rows, dtype=np.float64)[:, None], np.arange(cols, dtype=np.float64)[None, :]
    shape = labels["organs"].shape
    inside = np.ones((rows, cols), dtype=bool)
    target = []
    for axis in range(3):
        t = np.rint(origin[axis] + j * step_j[axis] + i * step_i[axis]).astype(np.int64)
        inside &= (t >= 0) & (t < shape[axis])
        target.append(t)
    organs = np.zeros((rows, cols), dtype=np.uint8)
    organs[inside] = labels["organs"][tuple(t[inside] for t in target)]
    out = {"organs": organs}
    for key in ("pancreas", "lesions"):
        image = np.zeros((rows, cols), dtype=np.uint8)
        if key in labels:
            start, block = labels["masks_start"], labels[key]
            k = z - int(start[0])
            if 0 <= k < block.shape[0]:
                image[start[1]:start[1] + block.shape[1], start[2]:start[2] + block.shape[2]] = block[k]
        out[key] = image
    return out

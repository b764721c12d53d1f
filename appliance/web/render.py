"""Slices as PNG at the requested window, and the overlays drawn on them, rendered on the box and cached.

Why server-side PNG rather than shipping the volume to the browser: a 300-slice CT is 150 MB of int16,
too much for a tablet on clinic Wi-Fi, while one windowed 512x512 slice is 60-120 kB and takes ~10-30 ms
to make here; the viewer keeps the slices it fetched (and prefetches the next ones) in memory, so
scrolling back and forth costs nothing (bench/bench_web.py measures both).

Slice order: the label volume's own order (ascending position along the slice normal) when the study was
analysed, so a contour always lands on the slice it was computed on; otherwise instance number.
Overlays come from labels.npz beside findings.json (appliance.pipeline.outputs.labels: stage 1 organs,
pancreas, lesions), or, for results written before it existed, from the DICOM SEG (pancreas, lesions).
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from edgescreen.appliance.logs import get_logger

# the label volume's reader pulls in the pipeline package (highdicom, scipy: over a second on a busy box); imported
# with this module at start-up, so the first analysed study a radiographer opens does not pay for it
from edgescreen.appliance.pipeline.outputs.labels import read_labels, slice_labels
from edgescreen.appliance.store import Store

log = get_logger(__name__)

# (level, width) in HU. The narrow pancreas window separates a near-iso-attenuating lesion from the gland.
PRESETS = {"soft": (50.0, 400.0), "pancreas": (40.0, 150.0), "bone": (400.0, 1800.0)}
MAX_SIDE = 1024  # mammograms are downsampled for display; CT slices are sent at their own size
ORGAN_COLOURS = {  # RGBA outline colours per stage-1 class name; red is kept for lesions alone
    "liver": (214, 124, 48, 255), "spleen": (155, 89, 182, 255), "right_kidney": (52, 152, 219, 255),
    "left_kidney": (52, 152, 219, 255), "aorta": (255, 214, 10, 255), "vertebrae": (236, 240, 241, 255),
    "pancreas": (46, 204, 113, 255),
}
OTHER_ORGAN = (0, 210, 210, 255)  # a class a clinic's own stage 1 adds


def organ_legend(classes: tuple[str, ...]) -> list[str]:
    """The organ outlines drawn, in class order, as legend keys: a class name, "kidneys" for right and left
    (one colour), "other" for a class a clinic's own model adds. style.css has a .sw-org-KEY swatch per key in
    the colours above (tests/test_web_studies.py checks they agree; CSP forbids inline colours)."""
    out: list[str] = []
    for name in classes:
        if name in ("background", "pancreas"):
            continue
        key = "kidneys" if name.endswith("_kidney") else name if name in ORGAN_COLOURS else "other"
        if key not in out:
            out.append(key)
    return out
PANCREAS_COLOUR = (46, 230, 113, 255)
LESION_FILL = (255, 40, 40, 90)
LESION_EDGE = (255, 60, 60, 255)


class _LRU:
    """A byte-bounded LRU shared by the server's threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value, size: int) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, size)
            self._size += size
            while self._size > self.max_bytes and self._items:
                _, (_, old) = self._items.popitem(last=False)
                self._size -= old

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


_png_cache = _LRU(96 * 1024 * 1024)
_overlay_cache = _LRU(64 * 1024 * 1024)
_series_cache = _LRU(8 * 1024 * 1024)
_labels_cache = _LRU(256 * 1024 * 1024)


@dataclass(frozen=True)
class SeriesView:
    series_uid: str
    modality: str | None
    paths: tuple[str, ...]  # relative to the data dir, in display order
    sop_uids: tuple[str, ...]
    labels_path: str | None  # labels.npz or seg.dcm of the series' latest result
    labels_kind: str | None  # "labels" | "seg"
    organ_classes: tuple[str, ...] = ()
    lesion_slices: tuple[int, ...] = ()
    pancreas_slices: tuple[int, ...] = ()
    lesion_centres: tuple[tuple[int, int], ...] = ()  # (lesion number k of "lesion_k", its middle slice)

    @property
    def count(self) -> int:
        return len(self.paths)


def series_view(store: Store, series_uid: str) -> SeriesView | None:
    """The series' slices in display order, and where its overlays come from.

    Cached per (series, number of images, latest result): every slice and overlay request asks for the view,
    so the check that it is still current is one small indexed query, not a listing of the series' files.
    """
    head = store.query_one(
        """SELECT se.modality, (SELECT COUNT(*) FROM instances i WHERE i.series_uid = se.series_uid) AS n,
                  (SELECT r.output_dir FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.series_uid = se.series_uid
                   ORDER BY r.id DESC LIMIT 1) AS output_dir
           FROM series se WHERE se.series_uid = ?""", (series_uid,))
    if head is None or not head["n"]:
        return None
    out_dir = Path(head["output_dir"]) if head["output_dir"] else None
    key = (str(store.data_dir), series_uid, head["n"], str(out_dir))
    cached = _series_cache.get(key)
    if cached is not None:
        return cached[0]
    modality = head["modality"]
    rows = store.query("SELECT sop_uid, path FROM instances WHERE series_uid = ? ORDER BY instance_number, sop_uid",
                       (series_uid,))
    by_uid = {r["sop_uid"]: r["path"] for r in rows}
    order = [r["sop_uid"] for r in rows]
    labels_path = kind = None
    organ_classes: tuple[str, ...] = ()
    lesion_slices: list[int] = []
    pancreas_slices: list[int] = []
    centres: list[tuple[int, int]] = []
    if out_dir is not None and (out_dir / "labels.npz").exists():
        labels = _load_labels(out_dir / "labels.npz")
        if labels is not None and set(labels["slice_uids"]) <= set(by_uid):
            order = list(labels["slice_uids"]) + [u for u in order if u not in set(labels["slice_uids"])]
            labels_path, kind = str(out_dir / "labels.npz"), "labels"
            organ_classes = tuple(labels["organ_classes"])
            start = int(labels["masks_start"][0]) if "masks_start" in labels else 0
            for name, target in (("lesions", lesion_slices), ("pancreas", pancreas_slices)):
                if name in labels:
                    target += [start + int(z) for z in np.flatnonzero(labels[name].reshape(labels[name].shape[0], -1)
                                                                      .any(axis=1))]
            if "lesions" in labels:
                flat = labels["lesions"].reshape(labels["lesions"].shape[0], -1)
                for k in np.unique(flat[flat != 0]):
                    zs = np.flatnonzero((flat == k).any(axis=1))
                    centres.append((int(k), start + int(zs[len(zs) // 2])))
    elif out_dir is not None and (out_dir / "seg.dcm").exists():
        seg = _load_seg(out_dir / "seg.dcm")
        if seg is not None:
            labels_path, kind = str(out_dir / "seg.dcm"), "seg"
            index = {u: i for i, u in enumerate(order)}
            for uid, layers in seg.items():
                if uid in index:
                    if "lesions" in layers:
                        lesion_slices.append(index[uid])
                    if "pancreas" in layers:
                        pancreas_slices.append(index[uid])
    view = SeriesView(series_uid, modality, tuple(by_uid[u] for u in order), tuple(order), labels_path, kind,
                      organ_classes, tuple(sorted(lesion_slices)), tuple(sorted(pancreas_slices)), tuple(centres))
    _series_cache.put(key, view, 200 + 150 * len(order))
    return view


def _load_labels(path: Path) -> dict | None:
    key = ("labels", str(path), path.stat().st_mtime)
    hit = _labels_cache.get(key)
    if hit is not None:
        return hit[0]
    try:
        labels = read_labels(path)
    except (ValueError, OSError, KeyError) as exc:
        log.warning("label volume unreadable; overlays not drawn", path=str(path), error=str(exc))
        return None
    size = sum(v.nbytes for v in labels.values() if isinstance(v, np.ndarray))
    _labels_cache.put(key, labels, size)
    return labels


def _load_seg(path: Path) -> dict[str, dict[str, np.ndarray]] | None:
    """A binary DICOM SEG as {source SOP UID: {"pancreas": mask, "lesions": label image}} (frames present only)."""
    key = ("seg", str(path), path.stat().st_mtime)
    hit = _labels_cache.get(key)
    if hit is not None:
        return hit[0]
    try:
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array
        if frames.ndim == 2:
            frames = frames[None]
        names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
        out: dict[str, dict[str, np.ndarray]] = {}
        for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            uid = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            label = names.get(number, "").lower()
            layers = out.setdefault(uid, {})
            mask = frames[i] != 0
            if label.startswith("lesion"):
                k = int(label.split()[-1]) if label.split()[-1].isdigit() else 1
                lesions = layers.setdefault("lesions", np.zeros(mask.shape, np.uint8))
                lesions[mask] = k
            elif "pancreas" in label:
                layers["pancreas"] = mask.astype(np.uint8)
    except Exception as exc:  # a SEG another tool wrote may lack what we read; the slices still show
        log.warning("SEG unreadable; overlays not drawn", path=str(path), error=f"{type(exc).__name__}: {exc}")
        return None
    size = sum(a.nbytes for layers in out.values() for a in layers.values()) + 1
    _labels_cache.put(key, out, size)
    return out


# -- slices ---------------------------------------------------------------------------------------------
def window_for(preset: str | None, level: float | None, width: float | None) -> tuple[float, float] | None:
    """(level, width) from a preset name or explicit values; None means the image's own VOI / full range."""
    if level is not None and width is not None:
        return float(level), max(1.0, float(width))
    if preset in PRESETS:
        return PRESETS[preset]
    return None


def _pixels(path: Path | io.BytesIO) -> tuple[np.ndarray, tuple[float, float] | None, bool]:
    """Modality values (HU for CT), the file's own window if any, and whether it displays inverted."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[0]  # a multi-frame image: its first frame
    if arr.ndim == 2:
        arr = arr.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    own = None
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    if wc is not None and ww is not None:
        wc = wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc
        ww = ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww
        own = (float(wc), float(ww))
    return arr, own, ds.get("PhotometricInterpretation") == "MONOCHROME1"


def _to_uint8(arr: np.ndarray, window: tuple[float, float] | None, invert: bool) -> np.ndarray:
    if arr.ndim == 3:  # colour: shown as stored
        return arr.astype(np.uint8)
    if window is None:
        lo, hi = np.percentile(arr, (0.5, 99.5)) if arr.size else (0.0, 1.0)
    else:
        level, width = window
        lo, hi = level - width / 2, level + width / 2
    scaled = np.clip((arr - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)
    return 255 - scaled if invert else scaled


def _display_size(shape: tuple[int, ...]) -> tuple[int, int] | None:
    rows, cols = shape[:2]
    side = max(rows, cols)
    if side <= MAX_SIDE:
        return None
    scale = MAX_SIDE / side
    return max(1, round(cols * scale)), max(1, round(rows * scale))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # level 1: 3x faster than the default, ~10% larger
    return buf.getvalue()


def slice_png(store: Store, view: SeriesView, index: int, window: tuple[float, float] | None) -> bytes:
    key = (str(store.data_dir), view.series_uid, view.paths[index], window)
    hit = _png_cache.get(key)
    if hit is not None:
        return hit[0]
    arr, own, invert = _pixels(store.data_dir / view.paths[index])
    image = Image.fromarray(_to_uint8(arr, window or own, invert))
    size = _display_size(arr.shape)
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    data = _png(image)
    _png_cache.put(key, data, len(data))
    return data


# -- overlays ---------------------------------------------------------------------------------------------
LAYERS = ("organs", "pancreas", "lesions")


def _edge(mask: np.ndarray) -> np.ndarray:
    """The outline of a boolean mask: pixels inside with a 4-neighbour outside (2 px wide when scaled up)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _layer_images(view: SeriesView, index: int) -> dict[str, np.ndarray] | None:
    if view.labels_kind == "labels":
        labels = _load_labels(Path(view.labels_path))
        if labels is None or index >= len(labels["slice_uids"]):
            return None
        return slice_labels(labels, index)
    if view.labels_kind == "seg":
        seg = _load_seg(Path(view.labels_path))
        return None if seg is None else seg.get(view.sop_uids[index], {})
    return None


def _layer_png(view: SeriesView, layer: str, image: np.ndarray | None, shape: tuple[int, int]) -> bytes:
    rgba = np.zeros((*shape, 4), dtype=np.uint8)
    if image is not None and image.shape == shape and image.any():
        if layer == "organs":
            for value, name in enumerate(view.organ_classes):
                if value == 0 or name in ("background", "pancreas"):
                    continue  # the pancreas has its own layer (stage 2's finer mask)
                rgba[_edge(image == value)] = ORGAN_COLOURS.get(name, OTHER_ORGAN)
        elif layer == "pancreas":
            rgba[_edge(image != 0)] = PANCREAS_COLOUR
        elif layer == "lesions":
            inside = image != 0
            rgba[inside] = LESION_FILL
            rgba[_edge(inside)] = LESION_EDGE
    return _png(Image.fromarray(rgba, "RGBA"))


def overlay_png(store: Store, view: SeriesView, index: int, layer: str, shape: tuple[int, int]) -> bytes:
    """A transparent PNG of one layer on one slice, the size of the slice image (rows, columns).

    The viewer asks for every layer of a slice at once, and one slice's label images cost the same for one
    layer as for three: all three are drawn and cached on the first request."""
    key = (view.labels_path, view.sop_uids[index], layer, shape)
    hit = _overlay_cache.get(key)
    if hit is not None:
        return hit[0]
    images = _layer_images(view, index) or {}
    out = b""
    for name in LAYERS:
        data = _layer_png(view, name, images.get(name), shape)
        _overlay_cache.put((view.labels_path, view.sop_uids[index], name, shape), data, len(data))
        if name == layer:
            out = data
    return out


def slice_shape(store: Store, view: SeriesView) -> tuple[int, int]:
    """(rows, columns) of the series' images, from the first file's header (read once per view)."""
    key = ("shape", str(store.data_dir), view.series_uid, view.paths[0])
    hit = _series_cache.get(key)
    if hit is not None:
        return hit[0]
    ds = pydicom.dcmread(store.data_dir / view.paths[0], stop_before_pixels=True)
    shape = (int(ds.Rows), int(ds.Columns))
    _series_cache.put(key, shape, 100)
    return shape


def warm_up() -> None:
    """Render one tiny slice through the real path at start-up, so the first radiographer's first slice does not
    pay for the lazy imports (PIL's image plugins, pydicom's pixel decoders: ~50 ms here, far more on a busy box)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.zeros((16, 16), np.int16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    arr, own, invert = _pixels(buf)
    _png(Image.fromarray(_to_uint8(arr, PRESETS["soft"], invert)))
    _png(Image.fromarray(np.zeros((16, 16, 4), np.uint8), "RGBA"))


def read_findings(output_dir: str | None) -> dict | None:
    """findings.json of a result as written (read as plain JSON: an older or newer schema still shows)."""
    if not output_dir:
        return None
    try:
        return json.loads((Path(output_dir) / "findings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

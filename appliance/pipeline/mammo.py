"""Mammography analysis: one image or one exam in, abnormal / malignant scores and a heatmap out.

The network sees one breast image at a time, always with the chest wall on the left
("mammo-chest-wall-left"), per-image percentile scaled to [0, 1] and letterboxed into the card's
fixed input size. `prepare_mammogram` is the ONE implementation of that step: the training script
(models/train/mammo.py) imports it from here, so the appliance feeds the model exactly what it
learned from. Everything in this module is numpy, PIL and pydicom: no torch at runtime.

Inputs are DICOM (any transfer syntax pydicom can decode, MONOCHROME1 or 2, For Presentation or
For Processing) or plain image files (PNG, PGM, JPEG, TIFF). Which side the chest wall is on is
always read from the image itself (the breast's intensity mass), because it is what the network
needs and because real files carry wrong or missing orientation tags; laterality and view are
reported from the DICOM tags where present.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.modelcard import ModelCard, Percentile, Preprocessing, load_card, model_path
from edgescreen.appliance.pipeline.activations import activate

log = get_logger("edgescreen.appliance.pipeline.mammo")

IMAGE_INPUT = "image"
SCORES_OUTPUT = "scores"
HEATMAP_OUTPUT = "heatmap"
_PERCENTILE_MAX_SAMPLES = 4_000_000  # above this, percentiles come from a regular subsample (speed, same result to ~1e-3)
_MIN_SIDE_PX = 64

# Mammography view codes (DICOM CID 4014): SNOMED-RT (R-xxxxx) and SNOMED CT ids, and their meanings.
_VIEW_CODES = {
    "R-10242": "CC", "399162004": "CC",
    "R-10226": "MLO", "399368009": "MLO",
    "R-10224": "ML", "399260004": "ML",
    "R-10228": "LM", "399352003": "LM",
    "R-10230": "LMO", "399099002": "LMO",
    "R-10244": "FB", "399196006": "FB",
    "R-102D0": "SIO", "399188001": "SIO",
    "R-40AAA": "ISO", "441555000": "ISO",
    "R-1024A": "XCCL", "399192003": "XCCL",
    "R-1024B": "XCCM", "399101009": "XCCM",
}
_VIEW_MEANINGS = (  # longest first: "exaggerated cranio-caudal" must not read as "cranio-caudal"
    ("exaggerated cranio-caudal, lateral", "XCCL"),
    ("exaggerated cranio-caudal, medial", "XCCM"),
    ("medio-lateral oblique", "MLO"),
    ("latero-medial oblique", "LMO"),
    ("cranio-caudal", "CC"),
    ("medio-lateral", "ML"),
    ("latero-medial", "LM"),
)


def _default_card() -> Path:
    """The shipped card: models/ sits beside appliance/ both in the checkout and in site-packages."""
    beside = Path(__file__).resolve().parents[2] / "models" / "mammo.json"
    if beside.is_file():
        return beside
    try:
        spec = importlib.util.find_spec("edgescreen.models")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "mammo.json"
        if candidate.is_file():
            return candidate
    return beside


DEFAULT_CARD = _default_card()


class MammoInputError(ValueError):
    """A file that cannot be analysed as a mammogram; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------
# preprocessing: shared by training and inference


@dataclass(frozen=True)
class PreparedMammo:
    """A network-ready image plus what is needed to map the network's heatmap back onto the original."""

    tensor: np.ndarray  # (1, 1, H, W) float32 in [0, 1], chest wall on the left
    flipped: bool  # True when the original had its chest wall on the right
    original_shape: tuple[int, int]  # (rows, cols) of the pixels handed in
    canvas_shape: tuple[int, int]  # (rows, cols) after letterbox padding (bottom / right), before resizing


def percentile_scale(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scale to [0, 1] between two per-image percentiles: independent of bit depth and window."""
    data = np.asarray(pixels, dtype=np.float32)
    sample = data
    if data.size > _PERCENTILE_MAX_SAMPLES:
        step = math.ceil(math.sqrt(data.size / _PERCENTILE_MAX_SAMPLES))
        sample = data[::step, ::step]
    lo, hi = np.percentile(sample, [low, high])
    if not hi > lo:
        raise MammoInputError(f"image has no contrast (percentiles {low}/{high} both {lo:g})")
    out = (data - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def chest_wall_on_right(scaled: np.ndarray) -> bool:
    """Whether the breast's intensity mass lies in the right half: the chest wall is the broad, dense side.

    A breast is widest at the chest wall and tapers to the nipple, and the background is dark, so the
    column-wise centre of intensity sits on the chest-wall side. Small bright film markers barely move it.
    """
    columns = scaled.sum(axis=0, dtype=np.float64)
    total = columns.sum()
    if total <= 0:
        return False
    centre = float((columns * np.arange(columns.size)).sum() / total)
    return centre > (columns.size - 1) / 2.0


def _normalize(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    norm = pre.normalization
    if not isinstance(norm, Percentile):
        raise ValueError(f"mammography preprocessing supports percentile normalisation only, the card has {norm.type!r}")
    return percentile_scale(pixels, norm.low, norm.high)


def _letterbox_shape(rows: int, cols: int, size: tuple[int, int]) -> tuple[int, int]:
    """Canvas with the network's aspect ratio that holds the image, padded at the bottom or right only."""
    target_h, target_w = size
    if rows * target_w >= cols * target_h:  # taller than the target: widen
        return rows, max(cols, math.ceil(rows * target_w / target_h))
    return max(rows, math.ceil(cols * target_h / target_w)), cols


def prepare_mammogram(pixels: np.ndarray, pre: Preprocessing) -> PreparedMammo:
    """Normalise, orient (chest wall left), letterbox and resize one breast image as the card says.

    Padding goes to the right (away from the chest wall once oriented) and the bottom, so the breast keeps
    its aspect ratio whatever the detector size; the resize is PIL's antialiased bilinear filter.
    """
    if pixels.ndim != 2:
        raise MammoInputError(f"expected a 2-D grey image, got shape {pixels.shape}")
    rows, cols = pixels.shape
    if min(rows, cols) < _MIN_SIDE_PX:
        raise MammoInputError(f"image is {rows}x{cols} px; a mammogram needs at least {_MIN_SIDE_PX} px a side")
    if pre.orientation != "mammo-chest-wall-left":
        raise ValueError(f"mammography needs orientation 'mammo-chest-wall-left', the card has {pre.orientation!r}")
    if not pre.input_size_px or len(pre.input_size_px) != 2:
        raise ValueError(f"the card's input_size_px must be [H, W], got {pre.input_size_px}")
    size = (int(pre.input_size_px[0]), int(pre.input_size_px[1]))
    scaled = _normalize(pixels, pre)
    flipped = chest_wall_on_right(scaled)
    if flipped:
        scaled = scaled[:, ::-1]
    canvas_shape = _letterbox_shape(rows, cols, size)
    canvas = np.zeros(canvas_shape, dtype=np.float32)
    canvas[:rows, :cols] = scaled
    if canvas_shape != size:
        resized = Image.fromarray(canvas, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        canvas = np.asarray(resized, dtype=np.float32)
    tensor = np.ascontiguousarray(np.clip(canvas, 0.0, 1.0)[None, None], dtype=np.float32)
    return PreparedMammo(tensor=tensor, flipped=flipped, original_shape=(rows, cols), canvas_shape=canvas_shape)


def heatmap_to_original(heatmap: np.ndarray, prepared: PreparedMammo) -> np.ndarray:
    """Undo resize, letterbox and flip: a float32 map with the original image's shape and orientation."""
    rows, cols = prepared.original_shape
    canvas_rows, canvas_cols = prepared.canvas_shape
    small = np.asarray(heatmap, dtype=np.float32).reshape(heatmap.shape[-2:])
    big = Image.fromarray(small, mode="F").resize((canvas_cols, canvas_rows), Image.Resampling.BILINEAR)
    out = np.asarray(big, dtype=np.float32)[:rows, :cols]
    if prepared.flipped:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------------------------
# reading files


@dataclass(frozen=True)
class LoadedMammogram:
    """Display-ready grey pixels (bright = dense) plus what the file says about the breast and view."""

    pixels: np.ndarray
    laterality: str  # "L", "R" or "U" (unknown)
    view: str  # "CC", "MLO", ... or "unknown"
    laterality_source: str  # "dicom" or "image" (assumes the standard display: chest wall right = right breast)
    source: str  # "dicom" or "image"
    notes: tuple[str, ...] = ()


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_view(ds: object) -> str:
    view = str(getattr(ds, "ViewPosition", "") or "").strip().upper()
    if view:
        return view
    for item in getattr(ds, "ViewCodeSequence", []) or []:
        code = str(getattr(item, "CodeValue", "") or "").strip()
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
        meaning = str(getattr(item, "CodeMeaning", "") or "").strip().lower()
        for text, name in _VIEW_MEANINGS:
            if meaning.startswith(text):
                return name
    return "unknown"


def _dicom_laterality(ds: object) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(getattr(ds, keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
        if value == "B":
            return "B"
    return "U"


def _dicom_pixels(ds: object, path: Path) -> tuple[np.ndarray, list[str]]:
    """Decoded, LUT-applied grey pixels where bright means dense, whatever the photometric interpretation."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    notes: list[str] = []
    if "PixelData" not in ds and "FloatPixelData" not in ds:  # type: ignore[operator]
        raise MammoInputError(f"{path}: DICOM file has no pixel data (not an image)")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MammoInputError(f"{path}: {frames} frames (tomosynthesis?); only single-frame mammograms are supported")
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
        raise MammoInputError(f"{path}: colour DICOM ({ds.PhotometricInterpretation}); a mammogram is greyscale")  # type: ignore[attr-defined]
    try:
        raw = ds.pixel_array  # type: ignore[attr-defined]
    except Exception as exc:  # pydicom raises many types for undecodable or truncated pixel data
        raise MammoInputError(f"{path}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    intent = str(getattr(ds, "PresentationIntentType", "") or "").upper()
    if intent == "FOR PROCESSING":
        # Raw detector data is linear in exposure; a log turns it into attenuation-like contrast.
        # Vendors' presentation processing cannot be reproduced, hence the note.
        arr = np.log1p(np.maximum(arr - float(arr.min()), 0.0)).astype(np.float32)
        notes.append("FOR PROCESSING image: log-transformed approximation of presentation processing")
    elif "WindowCenter" in ds or "VOILUTSequence" in ds:  # type: ignore[operator]
        arr = np.asarray(apply_voi_lut(arr, ds, index=0), dtype=np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper() == "MONOCHROME1":
        arr = np.float32(arr.max() + arr.min()) - arr  # percentile scaling makes the offset irrelevant
    if intent == "FOR PROCESSING" and _background_is_bright(arr):
        # Vendors disagree on the polarity of raw data; the air around the breast must come out dark.
        arr = np.float32(arr.max() + arr.min()) - arr
        notes.append("FOR PROCESSING image looked inverted (bright background); inverted it")
    return arr, notes


def _background_is_bright(arr: np.ndarray) -> bool:
    """Whether the histogram's dominant peak, the air around the breast, lies in the upper half of the range."""
    sample = arr[:: max(1, arr.shape[0] // 512), :: max(1, arr.shape[1] // 512)]
    lo, hi = np.percentile(sample, [1, 99])
    if not hi > lo:
        return False
    counts, _ = np.histogram(np.clip(sample, lo, hi), bins=64, range=(lo, hi))
    return int(np.argmax(counts)) >= 32


def read_dicom(path: Path) -> LoadedMammogram:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise MammoInputError(f"{path}: not a readable DICOM file ({exc})") from exc
    except Exception as exc:  # malformed files fail in many ways (struct, KeyError, EOF...): never crash the caller
        raise MammoInputError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    pixels, notes = _dicom_pixels(ds, path)
    modality = str(getattr(ds, "Modality", "") or "")
    if modality and modality != "MG":
        notes.append(f"Modality is {modality!r}, not 'MG'")
    laterality = _dicom_laterality(ds)
    return LoadedMammogram(
        pixels=pixels,
        laterality=laterality,
        view=_dicom_view(ds),
        laterality_source="dicom" if laterality != "U" else "image",
        source="dicom",
        notes=tuple(notes),
    )


def read_plain_image(path: Path) -> LoadedMammogram:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "1"):
                img = img.convert("L")
            pixels = np.asarray(img, dtype=np.float32)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise MammoInputError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise MammoInputError(f"{path}: expected a grey image, got shape {pixels.shape}")
    return LoadedMammogram(pixels=pixels, laterality="U", view="unknown", laterality_source="image", source="image")


def read_mammogram(path: Path | str) -> LoadedMammogram:
    """Read a DICOM or a plain image file; raise MammoInputError with the reason when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise MammoInputError(f"{path}: no such file")
    try:
        is_dicom = _is_dicom(path)
    except OSError as exc:
        raise MammoInputError(f"{path}: cannot be read ({exc})") from exc
    if is_dicom:
        return read_dicom(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        # A DICOM without the 128-byte preamble (old ACR-NEMA style) is still worth a forced read.
        try:
            return read_dicom_forced(path)
        except MammoInputError:
            pass
    return read_plain_image(path)


def read_dicom_forced(path: Path) -> LoadedMammogram:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
        _ = ds.PixelData
    except Exception as exc:  # a forced read of a non-DICOM fails in many ways
        raise MammoInputError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from exc
    pixels, notes = _dicom_pixels(ds, path)
    laterality = _dicom_laterality(ds)
    return LoadedMammogram(pixels, laterality, _dicom_view(ds), "dicom" if laterality != "U" else "image", "dicom", tuple(notes))


# ----------------------------------------------------------------------------------------------
# inference


@dataclass
class MammoImageResult:
    path: Path
    abnormal_probability: float
    malignant_probability: float
    heatmap: np.ndarray = field(repr=False)  # float32, original image shape and orientation, P(suspicious)
    laterality: str
    view: str
    laterality_source: str
    flipped: bool
    notes: tuple[str, ...] = ()
    features: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the card's features outputs, (F,)
    # the score the decision thresholds: abnormal_probability, or with a card's contralateral rule the image read
    # against the same view of the other breast (apply_contralateral fills it and says how in ``notes``)
    decision_probability: float | None = None

    @property
    def decision_score(self) -> float:
        return self.abnormal_probability if self.decision_probability is None else self.decision_probability


@dataclass
class MammoResult:
    images: list[MammoImageResult]
    breasts: dict[str, float]  # laterality -> max abnormal probability over that breast's views
    exam_score: float  # max over all images of their decision scores
    triage: str  # "suspicious" or "not_suspicious"
    threshold: float
    model: str  # card name and version: every result carries the identity of the model that made it


def load_session(card_path: Path = DEFAULT_CARD, backend: str = "onnxruntime") -> tuple[ModelCard, object]:
    """The card (validated, sha256 checked) and a runtime session for its model."""
    from edgescreen.appliance.runtime import get_backend

    card = load_card(card_path)
    if card.role != "mammo":
        raise ValueError(f"{card_path}: role is {card.role!r}, not 'mammo'")
    session = get_backend(backend).load(model_path(card_path, card))
    return card, session


def infer_image(loaded: LoadedMammogram, card: ModelCard, session: object, path: Path) -> MammoImageResult:
    """Run one loaded mammogram through the model and map the heatmap back onto it."""
    prepared = prepare_mammogram(loaded.pixels, card.preprocessing)
    outputs = session.run({card.inputs[0].name: prepared.tensor})  # type: ignore[attr-defined]
    scores_spec = next(o for o in card.outputs if o.kind == "classification")
    heat_spec = next(o for o in card.outputs if o.kind == "heatmap")
    probs = activate(outputs[scores_spec.name], scores_spec.activation).reshape(-1)
    features = {o.name: np.asarray(outputs[o.name], dtype=np.float32).reshape(-1) for o in card.outputs
                if o.kind == "features" and o.name in outputs}
    heat = activate(outputs[heat_spec.name], heat_spec.activation).astype(np.float32)
    index = {name: i for i, name in enumerate(scores_spec.classes)}
    laterality = loaded.laterality
    if laterality == "U":  # standard display: a right breast has its chest wall on the right of the image
        laterality = "R" if prepared.flipped else "L"
    return MammoImageResult(
        path=path,
        abnormal_probability=float(probs[index["abnormal"]]),
        malignant_probability=float(probs[index["malignant"]]),
        heatmap=heatmap_to_original(heat[0, 0], prepared),
        laterality=laterality,
        view=loaded.view,
        laterality_source=loaded.laterality_source,
        flipped=prepared.flipped,
        notes=loaded.notes,
        features=features,
    )


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


_OTHER_SIDE = {"L": "R", "R": "L"}


def contralateral_scores(images: list[tuple[str, str, float]], weight: float, lone_reference: float
                         ) -> tuple[list[float], list[str | None]]:
    """The one pairing rule: each (laterality, view, logit) minus ``weight`` x the other breast's logit.

    The counterpart of a left image is the exam's right images of the same view (several: their mean);
    views compare case-blind, and an unknown view pairs only with an unknown view. Laterality "B" or "U"
    has no counterpart. A lone image is set against ``lone_reference``. Returns the combined logits and,
    per image, the counterpart's "<laterality> <view>" (None when lone).
    """
    combined: list[float] = []
    partners: list[str | None] = []
    for side, view, value in images:
        other = _OTHER_SIDE.get(side)
        match = [v for s, w, v in images if other is not None and s == other and w.upper() == view.upper()]
        reference = float(np.mean(match)) if match else lone_reference
        combined.append(value - weight * reference)
        partners.append(f"{other} {view}" if match else None)
    return combined, partners


def apply_contralateral(card: ModelCard, images: list[MammoImageResult]) -> None:
    """Give each image its decision score: the image read against the same view of the other breast when the card
    has a contralateral rule (a lone view against a typical breast, and its notes say so); else its own score."""
    rule = card.contralateral
    if rule is None:
        for image in images:
            image.decision_probability = image.abnormal_probability
        return
    scores, partners = contralateral_scores(
        [(im.laterality, im.view, _logit(im.abnormal_probability)) for im in images], rule.weight, rule.lone_view_logit)
    for image, score, partner in zip(images, scores, partners, strict=True):
        image.decision_probability = float(1.0 / (1.0 + math.exp(-score)))
        how = (f"read against the {partner} (contralateral weight {rule.weight:g})" if partner else
               f"no {_OTHER_SIDE.get(image.laterality, 'other-breast')} {image.view} in this exam: image score set against "
               f"a typical breast (contralateral weight {rule.weight:g})")
        image.notes = (*image.notes, f"decision score {image.decision_probability:.3f}: {how}")


def summarise(images: list[MammoImageResult], threshold: float, model: str) -> MammoResult:
    """Per-breast and per-exam scores (max over views of the decision score) and the triage at the threshold."""
    breasts: dict[str, float] = {}
    for image in images:
        breasts[image.laterality] = max(breasts.get(image.laterality, 0.0), image.decision_score)
    exam = max((image.decision_score for image in images), default=0.0)
    triage = "suspicious" if exam >= threshold else "not_suspicious"
    return MammoResult(images=images, breasts=breasts, exam_score=exam, triage=triage, threshold=threshold, model=model)


def analyze_mammo_images(
    paths: list[Path],
    card_path: Path = DEFAULT_CARD,
    session: object | None = None,
    threshold: float | None = None,
) -> MammoResult:
    """Analyse the images of one exam; raise MammoInputError on the first unusable file.

    `session` lets a caller (the worker, a benchmark) reuse a loaded model or another backend's session;
    `threshold` overrides the card's operating point (a site's own choice).
    """
    card = load_card(card_path)
    if session is None:
        _, session = load_session(card_path)
    if threshold is None:
        if card.decision is None:
            raise ValueError(f"{card_path}: the card has no decision threshold; pass one")
        threshold = card.decision.threshold
    results = []
    for raw in paths:
        path = Path(raw)
        loaded = read_mammogram(path)
        result = infer_image(loaded, card, session, path)
        log.info("mammogram analysed", path=str(path), abnormal=round(result.abnormal_probability, 4),
                 laterality=result.laterality, view=result.view)
        results.append(result)
    apply_contralateral(card, results)
    return summarise(results, float(threshold), f"{card.name} {card.version}")

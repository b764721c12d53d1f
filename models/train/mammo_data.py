"""mini-MIAS for the mammography model: labels, images prepared exactly as the appliance prepares them, folds.

Every image goes through `appliance.pipeline.mammo.prepare_mammogram`, the function the appliance runs
at inference, so training and inference cannot drift apart. Finding circles from labels.csv are drawn
into a mask in the same canonical (chest wall left, resized) frame, for the heatmap loss.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgescreen.appliance.modelcard import Preprocessing
from edgescreen.appliance.pipeline.mammo import contralateral_scores, prepare_mammogram, read_mammogram

MIN_RADIUS_PX = 16  # in original pixels (3.2 mm): the smallest labelled circles (3 px) would vanish in the heatmap
MIAS_SIDE_PX = 1024


@dataclass(frozen=True)
class Finding:
    x: float  # column in the original image
    row: float  # row in the original image (labels.csv counts y from the bottom)
    radius: float
    malignant: bool
    kind: str


@dataclass
class Record:
    """One image of mini-MIAS with all its findings (a normal image has none)."""

    image_id: str
    patient: int
    tissue: str
    findings: list[Finding] = field(default_factory=list)
    abnormal: bool = False
    malignant: bool = False
    unlocated: bool = False  # an abnormal finding without coordinates: no heatmap loss for this image

    @property
    def grade(self) -> int:
        """0 normal, 1 benign, 2 malignant: used to stratify the folds by the patient's worst finding."""
        return 2 if self.malignant else 1 if self.abnormal else 0


def read_labels(data_dir: Path) -> list[Record]:
    """Group labels.csv (one row per finding) into one record per image, sorted by image id."""
    records: dict[str, Record] = {}
    with open(data_dir / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            rec = records.setdefault(row["image"], Record(row["image"], int(row["patient"]), row["background_tissue"]))
            kind = (row["abnormality"] or "NORM").strip()
            if kind == "NORM":
                continue
            rec.abnormal = True
            malignant = row["severity"].strip() == "M"
            rec.malignant |= malignant
            if not row["x"].strip():
                rec.unlocated = True
                continue
            rec.findings.append(
                Finding(
                    x=float(row["x"]),
                    row=float(MIAS_SIDE_PX - 1 - float(row["y_from_bottom"])),
                    radius=float(row["radius"] or MIN_RADIUS_PX),
                    malignant=malignant,
                    kind=kind,
                )
            )
    return [records[key] for key in sorted(records)]


@dataclass
class MammoDataset:
    """Arrays for training: images (N, H, W) float32 in [0, 1], masks (N, H, W) uint8 (0 none, 1 benign,
    2 malignant finding), labels per image."""

    records: list[Record]
    images: np.ndarray
    masks: np.ndarray
    abnormal: np.ndarray
    malignant: np.ndarray
    has_mask: np.ndarray  # False where an abnormal image has a finding without coordinates
    patients: np.ndarray


def finding_mask(record: Record, shape: tuple[int, int], flipped: bool, original: tuple[int, int], canvas: tuple[int, int]) -> np.ndarray:
    """The record's finding circles in the network's frame (flipped, letterboxed, resized): 1 benign, 2 malignant.

    Malignant circles are drawn last, so where a benign and a malignant finding overlap the cell is malignant.
    """
    height, width = shape
    scale_y, scale_x = height / canvas[0], width / canvas[1]
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for f in sorted(record.findings, key=lambda f: f.malignant):
        x = (original[1] - 1 - f.x) if flipped else f.x
        # pixel centres: original coordinate c maps to (c + 0.5) * scale - 0.5
        cx, cy = (x + 0.5) * scale_x - 0.5, (f.row + 0.5) * scale_y - 0.5
        r = max(f.radius, MIN_RADIUS_PX)
        draw.ellipse([cx - r * scale_x, cy - r * scale_y, cx + r * scale_x, cy + r * scale_y], fill=2 if f.malignant else 1)
    return np.asarray(img, dtype=np.uint8)


def load_dataset(data_dir: Path, pre: Preprocessing) -> MammoDataset:
    """Read and prepare every image listed in labels.csv (about 4 s for mini-MIAS on one core)."""
    records = read_labels(data_dir)
    images, masks = [], []
    for rec in records:
        path = data_dir / f"{rec.image_id}.png"
        loaded = read_mammogram(path)
        prepared = prepare_mammogram(loaded.pixels, pre)
        image = prepared.tensor[0, 0]
        images.append(image)
        masks.append(finding_mask(rec, image.shape, prepared.flipped, prepared.original_shape, prepared.canvas_shape))
    return MammoDataset(
        records=records,
        images=np.stack(images).astype(np.float32),
        masks=np.stack(masks),
        abnormal=np.array([r.abnormal for r in records], dtype=np.float32),
        malignant=np.array([r.malignant for r in records], dtype=np.float32),
        has_mask=np.array([not r.unlocated for r in records], dtype=bool),
        patients=np.array([r.patient for r in records], dtype=np.int64),
    )


def patient_folds(records: list[Record], n_folds: int, seed: int) -> np.ndarray:
    """Fold index per image: whole patients per fold, stratified by the patient's worst finding.

    Patients are shuffled within each grade and dealt round-robin, the standard stratified k-fold
    recipe, so both breasts of a patient always land in the same fold.
    """
    worst: dict[int, int] = {}
    for rec in records:
        worst[rec.patient] = max(worst.get(rec.patient, 0), rec.grade)
    rng = np.random.default_rng(seed)
    fold_of: dict[int, int] = {}
    offset = 0
    for grade in sorted(set(worst.values())):
        patients = sorted(p for p, g in worst.items() if g == grade)
        rng.shuffle(patients)
        for i, patient in enumerate(patients):
            fold_of[patient] = (i + offset) % n_folds
        offset += len(patients)
    return np.array([fold_of[rec.patient] for rec in records], dtype=np.int64)


def contralateral_logits(scores: np.ndarray, patients: np.ndarray, weight: float, lone_reference: float = 0.0) -> np.ndarray:
    """Each image's logit minus ``weight`` x the logit of its patient's other image, through the appliance's
    own pairing rule (appliance.pipeline.mammo.contralateral_scores): mini-MIAS holds one MLO per breast."""
    out = np.array(scores, dtype=np.float64)
    for patient in np.unique(patients):
        rows = np.flatnonzero(patients == patient)
        sides = ["L", "R"] if len(rows) == 2 else ["L"] * len(rows)
        combined, _ = contralateral_scores([(side, "MLO", float(scores[i])) for side, i in zip(sides, rows, strict=True)],
                                           weight, lone_reference)
        out[rows] = combined
    return out

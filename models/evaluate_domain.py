"""How often the validated-domain gate flags a study: in-domain held-out phantoms and each shifted set.

Part of `edgescreen models evaluate` (merged into models/REPORT.json as `domain_gate`). Every study is
written as DICOM and analysed by the appliance's own code (series acceptance, load, the cascade, the
gate): a flagged study is one that would read `indeterminate`; a refused one (series acceptance said no)
is never analysed, so it cannot be cleared either and counts as flagged, with the count shown apart.

CT sets: `in_domain` (held-out seeds 200000+, the default, validated acquisition) and the phantom
generator's shifted acquisitions (models.phantom.ct.Acquisition), each once with its DICOM tags as
written and, for contrast and kernel, once with the acquisition tags stripped (the image must then
give it away); `non_abdominal_pydicom`: pydicom's own CT test images (head and other slices) stacked
into a series with BodyPartExamined removed. dcmtk's Debian package ships no CT images (only LUTs
and schemas), so it contributes none. Mammography: mini-MIAS development images written as DICOM
the way the model saw them (digitised film, 200 micron, 8 bit) and the same images at 100 micron and
16 bit, and the phantom's full-field digital exams (100 micron, 12 bit, DIRECT).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.pipeline.metrics import truncated

CT_SHIFTED: dict[str, dict[str, Any]] = {
    "contrast_arterial": {"contrast_phase": "arterial"},
    "contrast_portal_venous": {"contrast_phase": "portal_venous"},
    "contrast_portal_venous_tags_stripped": {"contrast_phase": "portal_venous"},
    "sharp_kernel": {"kernel": "sharp"},
    "sharp_kernel_tags_stripped": {"kernel": "sharp"},
    "slices_0_6mm": {"slice_thickness_mm": 0.6},
    "slices_5mm": {"slice_thickness_mm": 5.0},
    "metal": {"metal": True},
    "truncated_fov": {"fov_mm": 240.0},
    "child": {"body_scale": 0.6},
}
_ACQUISITION_TAGS = ("ContrastBolusAgent", "ConvolutionKernel", "SeriesDescription", "ProtocolName", "StudyDescription")


def upper_bound_95(flagged: int, n: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound of a rate seen as flagged/n (exact for flagged = 0)."""
    if n == 0:
        return float("nan")
    if flagged == 0:
        return 1.0 - 0.05 ** (1.0 / n)
    from scipy.stats import beta

    return float(beta.ppf(0.95, flagged + 1, n - flagged)) if flagged < n else 1.0


def _strip_tags(files: list[Path]) -> None:
    import pydicom

    for path in files:
        ds = pydicom.dcmread(path)
        for keyword in _ACQUISITION_TAGS:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)


_MODELS: dict[tuple[str, str], Any] = {}


def _gate_ct(files: list[Path], out: Path, models_dir: Path, backend: str) -> dict[str, Any]:
    """The appliance's own steps up to the verdict: series acceptance, load, the cascade, the gate (no outputs)."""
    from edgescreen.appliance.pipeline.analyze import (
        InputError,
        ModelChoice,
        choose_pipeline,
        group_series,
        load_models,
    )
    from edgescreen.appliance.pipeline.ctload import SeriesError
    from edgescreen.appliance.pipeline.domain.gate import assess_ct
    from edgescreen.appliance.pipeline.pancreas import ROLES, CascadeSettings, load_canonical, run_cascade

    key = (str(models_dir), backend)
    if key not in _MODELS:
        choices = {r: ModelChoice(r, models_dir / f"{r}.json", None, backend, "fp32", "CPU") for r in ROLES}
        _MODELS[key] = load_models(choices, None, 1)
    models = _MODELS[key]
    try:
        _, chosen, _ = choose_pipeline(*group_series(files))
        ct = load_canonical(chosen[0].files)
    except (InputError, SeriesError) as exc:
        return {"refused": True, "flagged": True, "reasons": [str(exc)[:300]]}
    decision = models["pancreas.stage2"].card.decision
    result = run_cascade(ct, models, settings=CascadeSettings(threshold=decision.threshold if decision else 0.5))
    domain = assess_ct({r: models[r].card for r in ROLES}, ct, result.stage1, result.stage2)
    return {"refused": False, "flagged": not domain.in_domain, "reasons": domain.reasons}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    flagged = sum(r["flagged"] for r in rows)
    reasons: dict[str, int] = {}
    for r in rows:
        for reason in r["reasons"]:
            key = reason.split(" is ")[0].split(":")[0][:60]
            reasons[key] = reasons.get(key, 0) + 1
    return {"n": n, "flagged": flagged, "refused": sum(r["refused"] for r in rows),
            "flag_rate": flagged / n if n else float("nan"), "flag_rate_upper_95": upper_bound_95(flagged, n),
            "cleared_possible": n - flagged, "top_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:6])}


def _pydicom_series(work: Path) -> list[list[Path]]:
    """pydicom's single CT test slices, each stacked into a 24-slice series at 5 mm, BodyPartExamined removed."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    series = []
    for name in ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm"):
        try:
            src = pydicom.dcmread(get_testdata_file(name))
            pixels = src.pixel_array
        except Exception:  # noqa: BLE001 - a test file this pydicom cannot decode is left out
            continue
        folder = work / f"pydicom-{name}"
        folder.mkdir(parents=True)
        uid, frame = generate_uid(), generate_uid()
        files = []
        for k in range(24):
            ds = src.copy()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
            ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SOPInstanceUID = uid, frame, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
            ds.SliceThickness, ds.InstanceNumber = 5.0, k + 1
            if "BodyPartExamined" in ds:
                del ds.BodyPartExamined
            path = folder / f"{k:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        series.append(files)
    return series


def evaluate_ct(models_dir: Path, work: Path, n_in: int, n_shift: int, seed_base: int, backend: str,
                log: Callable[[str], None]) -> dict[str, Any]:
    from edgescreen.models.phantom.ct import Acquisition, write_ct_study

    sets: dict[str, list[dict[str, Any]]] = {}
    t0 = time.time()
    plan: list[tuple[str, int, dict[str, Any]]] = [("in_domain", seed_base + i, {}) for i in range(n_in)]
    for k, (name, knobs) in enumerate(CT_SHIFTED.items()):
        plan += [(name, seed_base + 50_000 + 100 * k + i, knobs) for i in range(n_shift)]
    for i, (name, seed, knobs) in enumerate(plan):
        study = work / f"{name}-{seed}"
        lesion = None if seed % 3 == 0 else "pdac"
        write_ct_study(study, seed, lesion=lesion, acquisition=Acquisition(**knobs))
        files = sorted(study.glob("*.dcm"))
        if name.endswith("_tags_stripped"):
            _strip_tags(files)
        row = _gate_ct(files, work / "out", models_dir, backend)
        row["seed"] = seed
        sets.setdefault(name, []).append(row)
        shutil.rmtree(study, ignore_errors=True)
        log(f"domain gate: {i + 1}/{len(plan)} ({name}, flagged={row['flagged']}), {time.time() - t0:.0f} s")
    if n_shift:
        rows = [_gate_ct(files, work / "out", models_dir, backend) for files in _pydicom_series(work)]
        sets["non_abdominal_pydicom"] = rows
    return {name: _summary(rows) for name, rows in sets.items()}


def _mias_dicom(png: Path, out: Path, *, spacing: float, bits: int, detector: str, seed: int) -> Path:
    """A mini-MIAS image as a DICOM MG For Presentation image at the given pixel spacing and bit depth."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalMammographyXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    with Image.open(png) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    if abs(spacing - 0.2) > 1e-6:
        size = (int(round(pixels.shape[1] * 0.2 / spacing)), int(round(pixels.shape[0] * 0.2 / spacing)))
        pixels = np.asarray(Image.fromarray(pixels, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    scaled = np.rint(pixels / 255.0 * (2**bits - 1)).astype(np.uint16 if bits > 8 else np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(entropy_srcs=[str(seed)]), generate_uid(), "MG"
    ds.PatientID, ds.PatientName, ds.ImageLaterality, ds.ViewPosition = f"MIAS{seed}", "MIAS^Research", "L", "MLO"
    ds.PresentationIntentType, ds.DetectorType = "FOR PRESENTATION", detector
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    ds.Rows, ds.Columns = scaled.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = scaled.tobytes()
    path = out / f"{png.stem}-{spacing}-{bits}.dcm"
    out.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def evaluate_mammo(models_dir: Path, work: Path, mini_mias: Path, n: int, log: Callable[[str], None]) -> dict[str, Any]:
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, analyze_study
    from edgescreen.models.phantom.mg import write_mg_exam

    def gate(files: list[Path]) -> dict[str, Any]:
        out = work / "mgout"
        try:
            domain = analyze_study(AnalysisRequest(files, out, models_dir=models_dir))["domain"]
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return {"refused": False, "flagged": not domain["in_domain"], "reasons": domain["reasons"]}

    sets: dict[str, list[dict[str, Any]]] = {}
    pngs = sorted(mini_mias.glob("mdb*.png"))[:n] if mini_mias.is_dir() else []
    variants = {"in_domain_mini_mias_film_200um_8bit": (0.2, 8, "FILM"),
                "mini_mias_100um_16bit": (0.1, 16, "FILM"), "mini_mias_200um_16bit_direct": (0.2, 16, "DIRECT")}
    for name, (spacing, bits, detector) in variants.items():
        for i, png in enumerate(pngs):
            folder = work / f"{name}-{i}"
            sets.setdefault(name, []).append(gate([_mias_dicom(png, folder, spacing=spacing, bits=bits, detector=detector, seed=i)]))
            shutil.rmtree(folder, ignore_errors=True)
        log(f"domain gate: mammography {name} done")
    for i in range(min(n, 6)):
        folder = work / f"mgph-{i}"
        write_mg_exam(folder, 410_000 + i)
        sets.setdefault("phantom_ffdm_100um_12bit", []).append(gate(sorted(folder.glob("*.dcm"))))
        shutil.rmtree(folder, ignore_errors=True)
    return {name: _summary(rows) for name, rows in sets.items()}


def evaluate_domain_gate(models_dir: Path, work: Path, *, n_in: int, n_shift: int, n_mammo: int, seed_base: int = 200_000,
                         backend: str = "onnxruntime", mini_mias: Path | None = None,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """The `domain_gate` section of models/REPORT.json."""
    t0 = time.time()
    ct = evaluate_ct(models_dir, work, n_in, n_shift, seed_base, backend, log) if n_in or n_shift else {}
    mg = evaluate_mammo(models_dir, work, mini_mias, n_mammo, log) if mini_mias is not None and n_mammo else {}
    in_domain = ct.get("in_domain", {})
    return {
        "in_domain_flag_rate": in_domain.get("flag_rate", math.nan),
        "in_domain_flag_rate_upper_95": in_domain.get("flag_rate_upper_95", math.nan),
        "in_domain_n": in_domain.get("n", 0),
        "aim": "in-domain flag rate at most 0.01; every shifted set flagged (never cleared)",
        "ct": ct, "mammo": mg, "backend": backend, "seconds": round(time.time() - t0, 1),
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
    }


def render_markdown(gate: dict[str, Any]) -> str:
    def t(x: float) -> str:
        return truncated(x) if isinstance(x, (int, float)) else "n/a"

    lines = ["", "## Validated-domain gate: flag rates", "",
             f"A flagged study reads `indeterminate`, never `not_suspicious`. Aim: {gate['aim']}. In-domain flag rate "
             f"{t(gate['in_domain_flag_rate'])} on {gate['in_domain_n']} held-out phantoms (95% upper bound "
             f"{t(gate['in_domain_flag_rate_upper_95'])}). Method: {gate['method']}", "",
             "| set | n | flagged | refused | flag rate | 95% upper bound | most frequent reasons |", "|---|---|---|---|---|---|---|"]
    for group in ("ct", "mammo"):
        for name, s in gate.get(group, {}).items():
            reasons = "; ".join(f"{k} ({v})" for k, v in s["top_reasons"].items())
            lines.append(f"| {group}: {name} | {s['n']} | {s['flagged']} | {s['refused']} | {t(s['flag_rate'])} | "
                         f"{t(s['flag_rate_upper_95'])} | {reasons} |")
    lines.append("")
    return "\n".join(lines)

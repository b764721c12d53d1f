"""(a) The DICOM attributes against the card's domain: modality, body part, slice and pixel spacing,
reconstruction kernel family, contrast phase, detector type and bit depth.

Real series carry odd or missing tags, so an absent attribute is "not checked" (the image-based checks
still run), while a present one that contradicts the domain flags the study. Kernel names differ by
vendor; `kernel_family` maps the common ones (GE, Siemens, Philips, Canon/Toshiba) and says None for
a name it does not know (then the noise statistic, measured on the image, judges the kernel).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from edgescreen.appliance.modelcard import Domain, Interval
from edgescreen.appliance.pipeline.domain.verdict import DomainReport

_GE = {"SOFT": "soft", "STANDARD": "standard", "STND": "standard", "DETAIL": "sharp", "CHEST": "sharp",
       "EDGE": "sharp", "BONE": "bone", "BONEPLUS": "bone", "LUNG": "lung"}
_PHILIPS = {"A": "soft", "B": "standard", "C": "sharp", "D": "sharp", "E": "bone", "L": "lung", "UB": "standard",
            "YA": "soft", "YB": "standard", "YC": "sharp", "YD": "sharp"}


def kernel_family(kernel: str | Sequence[str] | None) -> str | None:
    """"soft" | "standard" | "sharp" | "bone" | "lung", or None when the name is unknown or absent."""
    if kernel is None:
        return None
    if not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    name = kernel.strip().upper().split("\\")[0].strip()
    if not name:
        return None
    if name in _GE:
        return _GE[name]
    if name in _PHILIPS:
        return _PHILIPS[name]
    m = re.fullmatch(r"[BIHQDJTU][RVFSL]?(\d{2})[FSHDUR]?\d?", name)  # Siemens: B30f, Br40d, I31s, Qr40, Hr68
    if m:
        n = int(m.group(1))
        return "soft" if n < 30 else "standard" if n < 50 else "sharp" if n < 70 else "bone"
    m = re.fullmatch(r"FC(\d{2})", name)  # Canon/Toshiba: FC01-FC18 body, FC30+ bone/lung
    if m:
        n = int(m.group(1))
        return "standard" if n < 20 else "sharp" if n < 50 else "bone" if n < 80 else "lung"
    if "LUNG" in name:
        return "lung"
    if "BONE" in name:
        return "bone"
    if "SHARP" in name or "DETAIL" in name:
        return "sharp"
    if "SOFT" in name or "SMOOTH" in name:
        return "soft"
    if "STANDARD" in name or "BODY" in name:
        return "standard"
    return None


_PHASE_WORDS = (
    ("arterial", ("ARTERIAL", "ART PHASE", "CTA", "ANGIO")),
    ("portal_venous", ("PORTAL", "VENOUS", "PVP")),
    ("delayed", ("DELAY", "EQUILIBRIUM", "EXCRETORY", "UROGRAPH")),
    ("non_contrast", ("NON-CONTRAST", "NONCONTRAST", "NON CONTRAST", "WO CONTRAST", "W/O", "WITHOUT CONTRAST",
                      "UNENHANCED", "NATIVE", "PLAIN", " NC ", "NON-CON", "NONCON")),
)


def contrast_phase(ds: Any) -> tuple[str | None, str]:
    """(phase, evidence). An agent named in ContrastBolusAgent means contrast; descriptions name the phase."""
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
    text = " " + " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName", "StudyDescription")
                          ).upper() + " "
    for phase, words in _PHASE_WORDS:
        if phase != "non_contrast" and any(w in text for w in words):
            return phase, f"description {text.strip()!r}"
    if agent and agent.upper() not in ("NONE", "NO", "N/A", "0"):
        return "contrast_unspecified", f"ContrastBolusAgent {agent!r}"
    if any(w in text for w in _PHASE_WORDS[-1][1]):
        return "non_contrast", f"description {text.strip()!r}"
    return None, "no contrast attribute or description"


def _range(report: DomainReport, check: str, label: str, value: float | None, allowed: Interval | None,
           unit: str = " mm") -> None:
    if allowed is None:
        return
    if value is None:
        report.skipped(f"{check}.{label.replace(' ', '_')}", f"{label} not stated")
        return
    # to the micrometre: spacings come from differences of float positions (5 mm reads 5.0000000001)
    if not allowed.contains(round(value, 3)):
        report.flag(check, f"{label} {value:g}{unit} is outside the validated range {allowed.describe()}{unit}")


def _float(value: Any) -> float | None:
    try:
        if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, str)):
            value = list(value)[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def check_ct(domain: Domain, ds: Any, spacing_zyx: Sequence[float], report: DomainReport, check: str = "dicom") -> None:
    """The CT series' attributes (first slice's header, the loaded grid's spacing) against the domain."""
    modality = str(ds.get("Modality", "") or "")
    if modality not in domain.modality:
        report.flag(check, f"modality {modality or '(none)'} is not among {', '.join(domain.modality)}")
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if domain.body_part is not None:
        if not body:
            report.skipped(f"{check}.body_part", "BodyPartExamined not stated")
        elif body not in [b.upper() for b in domain.body_part]:
            report.flag(check, f"body part {body} is not among {', '.join(domain.body_part)}")
    _range(report, check, "slice thickness", _float(ds.get("SliceThickness")), domain.slice_thickness_mm)
    _range(report, check, "slice spacing", float(spacing_zyx[0]), domain.slice_spacing_mm)
    _range(report, check, "pixel spacing", float(min(spacing_zyx[1:])), domain.pixel_spacing_mm)
    if domain.kernel_family is not None:
        kernel = ds.get("ConvolutionKernel")
        family = kernel_family(kernel)
        if family is None:
            report.skipped(f"{check}.kernel", f"kernel {kernel!r} not recognised (judged by image noise)")
        elif family not in domain.kernel_family:
            report.flag(check, f"reconstruction kernel {kernel} ({family}) is not among {', '.join(domain.kernel_family)}")
    if domain.contrast_phase is not None:
        phase, evidence = contrast_phase(ds)
        if phase is None:
            report.skipped(f"{check}.contrast", f"{evidence} (judged by organ densities)")
        elif phase not in domain.contrast_phase:
            report.flag(check, f"contrast phase {phase} ({evidence}) is not among {', '.join(domain.contrast_phase)}")
    report.passed(check)


def check_mg(domain: Domain, ds: Any, report: DomainReport, check: str = "dicom") -> None:
    """One mammogram's attributes: modality, pixel spacing at the detector, detector type, bit depth."""
    modality = str(ds.get("Modality", "") or "")
    if modality not in domain.modality:
        report.flag(check, f"modality {modality or '(none)'} is not among {', '.join(domain.modality)}")
    spacing = _float(ds.get("ImagerPixelSpacing")) or _float(ds.get("PixelSpacing"))
    _range(report, check, "pixel spacing", spacing, domain.pixel_spacing_mm)
    if domain.detector_type is not None:
        detector = str(ds.get("DetectorType", "") or "").strip().upper()
        if not detector:
            report.skipped(f"{check}.detector", "DetectorType not stated")
        elif detector not in [d.upper() for d in domain.detector_type]:
            report.flag(check, f"detector type {detector} is not among {', '.join(domain.detector_type)}")
    _range(report, check, "bits stored", _float(ds.get("BitsStored")), domain.bits_stored, unit="")
    report.passed(check)

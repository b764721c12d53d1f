"""The report in words: what the PDF prints and what the SR states as text, from one findings document.

Blocks are ("h", heading), ("t", text), ("b", bold text), ("kv", [(label, value), ...]) and
("table", (header, rows)); the PDF module lays them out, so content and layout stay apart.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from edgescreen.appliance import RESEARCH_USE_BANNER, __version__

Block = tuple[str, Any]
TITLES = {"pancreas": "Pancreas screening (non-contrast CT)", "mammo": "Mammography screening"}


def fmt(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.{digits}f}{unit}"
    except (TypeError, ValueError):
        return str(value)


def _name(value: Any) -> str:
    """A DICOM person name for people: 'Family^Given' reads 'Family, Given'; ideographic and phonetic groups kept."""
    text = str(value or "").strip()
    groups = [g for g in text.split("=") if g.strip("^ ")]
    shown = []
    for group in groups:
        parts = [p for p in group.split("^") if p]
        shown.append(", ".join(parts[:2]) + (" " + " ".join(parts[2:]) if len(parts) > 2 else ""))
    return " = ".join(shown) or "-"


def _date(value: Any) -> str:
    text = str(value or "").strip()
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else (text or "-")


def patient_rows(source: Dataset) -> list[tuple[str, str]]:
    return [
        ("Patient", _name(source.get("PatientName", ""))),
        ("Patient ID", str(source.get("PatientID", "") or "-")),
        ("Born", _date(source.get("PatientBirthDate", ""))),
        ("Sex", str(source.get("PatientSex", "") or "-")),
        ("Study date", _date(source.get("StudyDate", ""))),
        ("Accession", str(source.get("AccessionNumber", "") or "-")),
        ("Modality", str(source.get("Modality", "") or "-")),
        ("Study UID", str(source.get("StudyInstanceUID", "") or "-")),
    ]


def domain_lines(findings: dict[str, Any]) -> list[str]:
    """First line: the verdict; then one line per reason the study lies outside the validated domain."""
    domain = findings.get("domain")
    if domain is None:
        return ["Validated domain: not checked (findings written before the domain gate)"]
    if domain.get("in_domain"):
        return ["Validated domain: the study lies within the domain the models were validated on"]
    reasons = [str(r) for r in domain.get("reasons") or []] or ["no reason recorded"]
    return ["OUTSIDE the validated domain: the result is indeterminate, not an all-clear", *reasons]


def operating_point_text(findings: dict[str, Any]) -> str:
    op = findings.get("operating_point")
    if not op:
        return ""
    target = (f"{op['target']} {fmt(op.get('target_value'), 2)}" if op.get("target") else "a threshold set by hand")
    calib = f"; calibrated on {op['calibration_set']}" if op.get("calibration_set") else ""
    source = {"card": "the model card's default", "site": "chosen in the site configuration",
              "override": "set for this analysis"}.get(str(op.get("source")), str(op.get("source") or ""))
    return (f"{op.get('name', 'custom')}: {target}, threshold {fmt(op.get('threshold'), 4)} ({source}{calib})")


def _score_rows(findings: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if findings.get("abnormal_probability") is not None:
        rows.append(("Study score", fmt(findings["abnormal_probability"], 3)))
    rows.append(("Triage threshold", fmt(findings.get("threshold"), 3)))
    op = operating_point_text(findings)
    if op:
        rows.append(("Operating point", op))
    return rows


def _pancreas_blocks(findings: dict[str, Any]) -> list[Block]:
    rows = [*_score_rows(findings), ("Pancreas volume", fmt(findings.get("pancreas_volume_ml"), 1, " ml"))]
    organs = findings.get("organs") or {}
    if organs:
        rows.append(("Organ volumes", ", ".join(f"{k} {fmt(v, 0, ' ml')}" for k, v in sorted(organs.items()))))
    blocks: list[Block] = [("kv", rows)]
    lesions = findings.get("lesions") or []
    if not lesions:
        return [*blocks, ("t", "No lesion found.")]
    header = ["Lesion", "Site", "Longest (mm)", "Volume (ml)", "P(abnormal)", "Most likely subtype"]
    table = []
    for lesion in lesions:
        top = str(lesion.get("top_subtype") or "-")
        p_top = lesion.get("top_subtype_probability")
        if p_top is None:
            p_top = (lesion.get("subtype_probabilities") or {}).get(top)
        table.append([str(lesion.get("id", "")), str(lesion.get("location") or "-"),
                      fmt(lesion.get("longest_diameter_mm")), fmt(lesion.get("volume_ml"), 2),
                      fmt(lesion.get("abnormal_probability"), 3), f"{top} ({fmt(p_top, 2)})"])
    blocks += [("h", "Lesions"), ("table", (header, table))]
    for lesion in lesions:
        probs = lesion.get("subtype_probabilities") or {}
        text = ", ".join(f"{k} {fmt(v, 2)}" for k, v in sorted(probs.items(), key=lambda kv: -float(kv[1])))
        blocks.append(("t", f"{lesion.get('id', '')} subtype probabilities: {text or '-'}"))
    return blocks


def _mammo_blocks(findings: dict[str, Any]) -> list[Block]:
    mammo = findings.get("mammo") or {}
    rows = [*_score_rows(findings), ("Exam score", fmt(mammo.get("exam_score"), 3))]
    breasts = mammo.get("breasts") or {}
    if breasts:
        rows.append(("Per breast (max over views)", ", ".join(f"{k} {fmt(v, 3)}" for k, v in sorted(breasts.items()))))
    table = []
    for image in mammo.get("images") or []:
        notes = "; ".join(str(n) for n in image.get("notes") or [])
        table.append([str(image.get("laterality", "")), str(image.get("view", "")),
                      fmt(image.get("abnormal_probability"), 3), fmt(image.get("malignant_probability"), 3),
                      str(image.get("path") or image.get("sop_instance_uid") or "") + (f" ({notes})" if notes else "")])
    return [("kv", rows), ("h", "Images"),
            ("table", (["Side", "View", "P(abnormal)", "P(malignant)", "Image"], table))]


def _model_table(findings: dict[str, Any]) -> list[Block]:
    rows = [[str(m.get("role", "")), str(m.get("name", "")), str(m.get("version", "")), str(m.get("backend", "")),
             str(m.get("precision", "")), str(m.get("device", "")), str(m.get("sha256", ""))[:16]]
            for m in findings.get("models") or []]
    blocks: list[Block] = [("table", (["Role", "Model", "Version", "Backend", "Precision", "Device", "sha256"], rows))]
    bundle = findings.get("bundle")
    if bundle:
        text = bundle if not isinstance(bundle, dict) else ", ".join(f"{k}={v}" for k, v in bundle.items())
        blocks.append(("t", f"Bundle: {text}"))
    return blocks


def report_blocks(findings: dict[str, Any], source: Dataset) -> tuple[str, list[Block]]:
    """The PDF's title and its blocks, in reading order."""
    title = TITLES[findings["pipeline"]]
    triage = str(findings.get("triage") or "unknown").replace("_", " ").upper()
    domain = domain_lines(findings)
    blocks: list[Block] = [("kv", patient_rows(source)), ("h", f"Result: {triage}")]
    blocks.append(("b" if len(domain) > 1 else "t", domain[0]))
    blocks += [("t", f"- {reason}") for reason in domain[1:]]
    blocks += _pancreas_blocks(findings) if findings["pipeline"] == "pancreas" else _mammo_blocks(findings)
    blocks += [("h", "Models"), *_model_table(findings)]
    warnings = [str(w) for w in findings.get("warnings") or []]
    if warnings:
        blocks += [("h", "Warnings"), *[("t", f"- {w}") for w in warnings]]
    blocks.append(("t", f"Created: {findings.get('created_at', '')}   Appliance: edgescreen {__version__}"))
    disclaimer = str(findings.get("disclaimer") or "").strip()
    if disclaimer and disclaimer != RESEARCH_USE_BANNER:
        blocks.append(("b", disclaimer))
    return f"edgescreen - {title}", blocks

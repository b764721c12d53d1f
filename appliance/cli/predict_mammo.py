"""`edgescreen models predict-mammo IMAGE... [--json OUT]`: score mammograms with the shipped model.

For a technician checking a box or a researcher checking the model: each file (DICOM or PNG/PGM/JPEG)
gets its abnormal and malignant probability, laterality and view. A file that cannot be read does not
stop the others: it is reported with its reason (on screen and in the JSON, under `error`) and the
command exits 2 at the end, so scripts notice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgescreen.appliance.store.files import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="mammograms: DICOM, PNG, PGM or JPEG")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument("--card", type=Path, default=None, help="model card (default: the shipped models/mammo.json)")
    parser.add_argument("--operating-point", metavar="NAME", default=None,
                        help="one of the card's calibrated operating points (default: the card's default)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="a hand-set abnormal probability that triages as suspicious (research use)")
    parser.add_argument("--backend", default="onnxruntime", help="runtime backend (default: onnxruntime)")


def _write_json(path: Path, payload: dict) -> None:
    """Temp file, fsync, rename: a reader never sees half a result."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _print_table(rows: list[dict]) -> None:
    width = max(8, *(len(str(r["path"])) for r in rows))
    print(f"{'image':<{width}}  {'abnormal':>8}  {'malignant':>9}  side  view")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:<{width}}  ERROR: {r['error']}")
        else:
            print(f"{r['path']:<{width}}  {r['abnormal_probability']:>8.3f}  {r['malignant_probability']:>9.3f}  "
                  f"{r['laterality']:<4}  {r['view']}")


def run(args: argparse.Namespace, ctx: object | None = None) -> int:
    from edgescreen.appliance import RESEARCH_USE_BANNER
    from edgescreen.appliance.modelcard import CardError, Percentile
    from edgescreen.appliance.pipeline.domain.gate import assess_mg
    from edgescreen.appliance.pipeline.mammo import (
        DEFAULT_CARD,
        MammoInputError,
        apply_contralateral,
        infer_image,
        load_session,
        percentile_scale,
        read_mammogram,
        summarise,
    )
    from edgescreen.appliance.pipeline.operating_point import OperatingPointError, resolve
    from edgescreen.appliance.runtime import BackendUnavailable

    card_path = args.card or DEFAULT_CARD
    print(RESEARCH_USE_BANNER)
    try:
        card, session = load_session(card_path, args.backend)
    except (CardError, BackendUnavailable, ValueError) as exc:
        print(f"edgescreen: cannot load the mammography model: {exc}", file=sys.stderr)
        return 2
    try:
        op = resolve(card, name=args.operating_point, name_source="override", threshold=args.threshold)
    except OperatingPointError as exc:
        print(f"edgescreen: {exc}", file=sys.stderr)
        return 2
    threshold = op["threshold"]
    rows: list[dict] = []
    results, gate_inputs = [], []
    for path in args.images:
        try:
            loaded = read_mammogram(path)
            result = infer_image(loaded, card, session, path)
            norm = card.preprocessing.normalization
            if isinstance(norm, Percentile):
                gate_inputs.append((_header(path, loaded.source), loaded.pixels,
                                    percentile_scale(loaded.pixels, norm.low, norm.high), result.features))
        except MammoInputError as exc:
            print(f"edgescreen: {exc}", file=sys.stderr)
            rows.append({"path": str(path), "error": str(exc)})
            continue
        results.append(result)
        rows.append({
            "path": str(path),
            "abnormal_probability": round(result.abnormal_probability, 6),
            "malignant_probability": round(result.malignant_probability, 6),
            "result": result,  # decision score and pairing filled in once every image of the exam is read
            "laterality": result.laterality,
            "laterality_source": result.laterality_source,
            "view": result.view,
            "notes": list(result.notes),
        })
    apply_contralateral(card, results)  # an image is read against the other breast's same view (card rule)
    for row in rows:
        if "result" in row:
            result = row.pop("result")
            row.update(decision_probability=round(result.decision_score, 6),
                       above_threshold=result.decision_score >= threshold, notes=list(result.notes))
    _print_table(rows)
    summary = summarise(results, threshold, f"{card.name} {card.version}") if results else None
    domain = assess_mg(card, gate_inputs).to_json() if results else None
    triage = None
    if summary is not None and domain is not None:
        triage = summary.triage if domain["in_domain"] else "indeterminate"
        print(f"exam score {summary.exam_score:.3f} at operating point {op['name']} (threshold {threshold:.3f}): {triage}")
        for reason in domain["reasons"]:
            print(f"  outside the validated domain: {reason}")
    errors = sum(1 for r in rows if "error" in r)
    if args.json:
        _write_json(args.json, {
            "banner": RESEARCH_USE_BANNER,
            "model": f"{card.name} {card.version}",
            "card": str(card_path),
            "threshold": threshold,
            "operating_point": op,
            "domain": domain,
            "images": rows,
            "breasts": summary.breasts if summary else {},
            "exam_score": summary.exam_score if summary else None,
            "triage": triage,
            "errors": errors,
        })
    if errors:
        print(f"edgescreen: {errors} of {len(rows)} file(s) could not be analysed", file=sys.stderr)
        return 2
    return 0


def _header(path: Path, source: str) -> object | None:
    """The DICOM header of a mammogram (for the domain gate's attribute checks); None for a plain image."""
    if source != "dicom":
        return None
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True, force=True)

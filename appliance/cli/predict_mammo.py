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

from appliance.store.files import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="mammograms: DICOM, PNG, PGM or JPEG")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument("--card", type=Path, default=None, help="model card (default: the shipped models/mammo.json)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="abnormal probability that triages as suspicious (default: the card's)")
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
    from appliance import RESEARCH_USE_BANNER
    from appliance.modelcard import CardError
    from appliance.pipeline.mammo import (
        DEFAULT_CARD,
        MammoInputError,
        infer_image,
        load_session,
        read_mammogram,
        summarise,
    )
    from appliance.runtime import BackendUnavailable

    card_path = args.card or DEFAULT_CARD
    print(RESEARCH_USE_BANNER)
    try:
        card, session = load_session(card_path, args.backend)
    except (CardError, BackendUnavailable, ValueError) as exc:
        print(f"edgescreen: cannot load the mammography model: {exc}", file=sys.stderr)
        return 2
    threshold = args.threshold if args.threshold is not None else card.decision.threshold if card.decision else 0.5
    rows: list[dict] = []
    results = []
    for path in args.images:
        try:
            result = infer_image(read_mammogram(path), card, session, path)
        except MammoInputError as exc:
            print(f"edgescreen: {exc}", file=sys.stderr)
            rows.append({"path": str(path), "error": str(exc)})
            continue
        results.append(result)
        rows.append({
            "path": str(path),
            "abnormal_probability": round(result.abnormal_probability, 6),
            "malignant_probability": round(result.malignant_probability, 6),
            "suspicious": result.abnormal_probability >= threshold,
            "laterality": result.laterality,
            "laterality_source": result.laterality_source,
            "view": result.view,
            "notes": list(result.notes),
        })
    _print_table(rows)
    summary = summarise(results, threshold, f"{card.name} {card.version}") if results else None
    if summary is not None:
        print(f"exam score {summary.exam_score:.3f} at threshold {threshold:.3f}: {summary.triage}")
    errors = sum(1 for r in rows if "error" in r)
    if args.json:
        _write_json(args.json, {
            "banner": RESEARCH_USE_BANNER,
            "model": f"{card.name} {card.version}",
            "card": str(card_path),
            "threshold": threshold,
            "images": rows,
            "breasts": summary.breasts if summary else {},
            "exam_score": summary.exam_score if summary else None,
            "triage": summary.triage if summary else None,
            "errors": errors,
        })
    if errors:
        print(f"edgescreen: {errors} of {len(rows)} file(s) could not be analysed", file=sys.stderr)
        return 2
    return 0

"""End-to-end evaluation: the whole cascade from DICOM files (not oracle crops) on held-out phantoms.

Each study is written as real DICOM by the phantom generator and analysed by the appliance's own
`analyze_study`, exactly as a received series would be; the study-level score is the findings'
`abnormal_probability`, the subtype is the top subtype of the most probable lesion found. Seeds 400000+
are disjoint from training (0-99999), calibration (100000-100999), the oracle held-out set (200000+)
and the optimiser's gate set (300000+). Merges its figures into models/REPORT.json and REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edgescreen.appliance.pipeline.analyze import AnalysisRequest, analyze_study
from edgescreen.appliance.pipeline.metrics import auc, bootstrap_ci, figure, sens_at_spec
from edgescreen.models.phantom.ct import LESION_CLASSES, write_ct_study
from edgescreen.models.phantom.mg import MG_FINDINGS, write_mg_exam

MODELS_DIR = Path(__file__).parent
SEED_BASE = 400_000


def _ct_plan(per_class: int, normals: int) -> list[tuple[int, str | None]]:
    plan: list[tuple[int, str | None]] = [(SEED_BASE + i, None) for i in range(normals)]
    for k, cls in enumerate(LESION_CLASSES):
        plan += [(SEED_BASE + 1000 + k * 100 + i, cls) for i in range(per_class)]
    return plan


def _ci(labels: np.ndarray, scores: np.ndarray, fn) -> list[float]:
    rows = np.stack([labels, scores], axis=1)
    return bootstrap_ci(rows, lambda r: fn(r[:, 0].astype(int), r[:, 1]))


def evaluate_ct(models_dir: Path, work: Path, per_class: int, normals: int, slices: int) -> dict:
    labels, scores, subtype_hits, subtype_total, triaged, seconds = [], [], 0, 0, [], []
    for seed, lesion in _ct_plan(per_class, normals):
        study = work / f"ct-{seed}"
        write_ct_study(study, seed, lesion=lesion, slices=slices)
        t0 = time.perf_counter()
        findings = analyze_study(AnalysisRequest(sorted(study.glob("*.dcm")), work / f"out-{seed}", models_dir=models_dir))
        seconds.append(time.perf_counter() - t0)
        labels.append(int(lesion is not None))
        scores.append(float(findings.get("abnormal_probability") or 0.0))
        triaged.append(findings["triage"] == "suspicious")
        if lesion is not None and findings["lesions"]:
            subtype_total += 1
            best = max(findings["lesions"], key=lambda le: le["abnormal_probability"])
            subtype_hits += int(best["top_subtype"] == lesion)
    y, s, t = np.array(labels), np.array(scores), np.array(triaged)
    return {
        "n_normal": int((y == 0).sum()), "n_lesion": int((y == 1).sum()), "slices": slices,
        "auc": auc(y, s), "auc_ci95": _ci(y, s, auc),
        "sensitivity_at_99_specificity": sens_at_spec(y, s),
        "sensitivity_at_threshold": float(t[y == 1].mean()), "specificity_at_threshold": float(1 - t[y == 0].mean()),
        "subtype_accuracy_on_detected": subtype_hits / subtype_total if subtype_total else None,
        "lesion_studies_with_a_lesion_found": subtype_total,
        "seconds_per_study_median": float(np.median(seconds)),
        "seeds": f"{SEED_BASE}+ (normals), {SEED_BASE + 1000}+ (lesions, 100 per class)",
    }


def evaluate_mammo(models_dir: Path, work: Path, exams: int) -> dict:
    labels, scores = [], []
    for i in range(exams):
        seed = SEED_BASE + 5000 + i
        finding = None if i % 2 == 0 else MG_FINDINGS[(i // 2) % len(MG_FINDINGS)]
        exam = work / f"mg-{seed}"
        write_mg_exam(exam, seed, finding=finding)
        findings = analyze_study(AnalysisRequest(sorted(exam.glob("*.dcm")), work / f"mgout-{seed}", models_dir=models_dir))
        labels.append(int(finding is not None))
        scores.append(float(findings["mammo"]["exam_score"]))
    y, s = np.array(labels), np.array(scores)
    return {"n_normal": int((y == 0).sum()), "n_abnormal": int((y == 1).sum()), "data": "phantom exams (not mini-MIAS)",
            "auc": auc(y, s), "auc_ci95": _ci(y, s, auc)}


def render(e2e: dict) -> str:
    ct, mg = e2e["pancreas"], e2e["mammo"]
    f = lambda v: "n/a" if v is None else figure(v)  # noqa: E731 - truncated, never rounded up
    return "\n".join([
        "", "## End to end: the whole cascade from DICOM on held-out phantoms", "",
        f"Pancreas ({ct['n_lesion']} lesion studies, {ct['n_normal']} normals, {ct['slices']} slices each, seeds {ct['seeds']}):",
        f"- study-level AUC {f(ct['auc'])} (95% CI {f(ct['auc_ci95'][0])}-{f(ct['auc_ci95'][1])})",
        f"- sensitivity at 99% specificity {f(ct['sensitivity_at_99_specificity'])}; at the card's threshold: "
        f"sensitivity {f(ct['sensitivity_at_threshold'])}, specificity {f(ct['specificity_at_threshold'])}",
        f"- subtype accuracy on the {ct['lesion_studies_with_a_lesion_found']} lesion studies where a lesion was found: "
        f"{f(ct['subtype_accuracy_on_detected'])}",
        f"- median analysis time per study {ct['seconds_per_study_median']:.1f} s (FP32, ONNX Runtime)",
        "", f"Mammography ({mg['n_abnormal']} abnormal, {mg['n_normal']} normal {mg['data']}): exam-level AUC "
        f"{f(mg['auc'])} (95% CI {f(mg['auc_ci95'][0])}-{f(mg['auc_ci95'][1])})", "",
        "Small samples: the intervals are wide. Research use only: not for clinical use.", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgescreen.models.evaluate_e2e", description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=MODELS_DIR)
    ap.add_argument("--per-class", type=int, default=2, help="lesion studies per class")
    ap.add_argument("--normals", type=int, default=8)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--mammo-exams", type=int, default=8)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgescreen-e2e-") as tmp:
        e2e = {"pancreas": evaluate_ct(args.models, Path(tmp), args.per_class, args.normals, args.slices),
               "mammo": evaluate_mammo(args.models, Path(tmp), args.mammo_exams)}
    report_json = args.models / "REPORT.json"
    report = json.loads(report_json.read_text()) if report_json.is_file() else {}
    report["end_to_end"] = e2e
    report_json.write_text(json.dumps(report, indent=2) + "\n")
    md = args.models / "REPORT.md"
    text = md.read_text() if md.is_file() else ""
    marker = "\n## End to end:"
    text = text.split(marker)[0].rstrip("\n") + "\n" + render(e2e)
    md.write_text(text)
    print(render(e2e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

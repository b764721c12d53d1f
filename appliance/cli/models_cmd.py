"""`edgescreen models evaluate|predict-mammo`: the reference models' report, and scoring plain image files."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import predict_mammo

_MINI_MIAS = Path(__file__).resolve().parents[3] / "shared" / "data" / "mini-mias"


def add_evaluate_arguments(ap: argparse.ArgumentParser) -> None:
    """The report's options, shared with `python -m models.evaluate` (defined here: no numpy at parse time)."""
    ap.add_argument("--n", type=int, default=120, help="held-out CT studies (>= 120 for the report)")
    ap.add_argument("--models", type=Path, default=None, help="folder with the ONNX models and cards (default: models/)")
    ap.add_argument("--seed-base", type=int, default=200_000)
    ap.add_argument("--stage1-n", type=int, default=None, help="studies for stage 1 (default: all)")
    ap.add_argument("--pipeline-n", type=int, default=3, help="studies also run from native 512 series resampled (0: skip)")
    ap.add_argument("--update-cards", action="store_true", help="copy held-out metrics into the model cards")
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None)
    gate = ap.add_argument_group("validated-domain gate (flag rates; models/evaluate_domain.py)")
    gate.add_argument("--domain-n", type=int, default=0, help="held-out in-domain CT phantoms for the gate's flag rate")
    gate.add_argument("--domain-shifted-n", type=int, default=0, help="CT phantoms per shifted acquisition set")
    gate.add_argument("--domain-mammo-n", type=int, default=0, help="mammograms per mammography set")
    gate.add_argument("--domain-only", action="store_true", help="measure only the gate and merge it into the report")
    gate.add_argument("--backend", default="onnxruntime", help="runtime for the gate's analyses (openvino is faster)")
    gate.add_argument("--mini-mias", type=Path, default=_MINI_MIAS, help="mini-MIAS folder (labels.csv, mdb*.png)")


def add_calibrate_arguments(ap: argparse.ArgumentParser) -> None:
    """`edgescreen models domain-calibrate` (models/domain_calibrate.py): defined here, no numpy at parse time."""
    ap.add_argument("--models", type=Path, default=None, help="folder with the ONNX models and cards (default: models/)")
    ap.add_argument("--n", type=int, default=60, help="calibration CT phantoms (default 60)")
    ap.add_argument("--seed-base", type=int, default=100_100, help="first calibration seed (100000-100999)")
    ap.add_argument("--stats-n", type=int, default=0, help="more phantoms for the body statistics alone (no models)")
    ap.add_argument("--mini-mias", type=Path, default=_MINI_MIAS, help="mini-MIAS folder (labels.csv, mdb*.png)")
    ap.add_argument("--skip-ct", action="store_true", help="mammography only")
    ap.add_argument("--backend", default="onnxruntime", help="runtime for the FP32 models (openvino is faster on x86)")
    ap.add_argument("--save", type=Path, default=None, help="also save the sections and per-study rows as JSON here")
    ap.add_argument("--write", action="store_true", help="write the sections into the cards (default: print them)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    evaluate = sub.add_parser("evaluate", help="evaluate the reference models on held-out phantoms and write "
                                               "models/REPORT.md/.json")
    add_evaluate_arguments(evaluate)
    calibrate = sub.add_parser("domain-calibrate", help="measure the validated domain and the operating points on "
                                                        "calibration phantoms and write them into the model cards")
    add_calibrate_arguments(calibrate)
    predict = sub.add_parser("predict-mammo", help="score mammograms (DICOM, PNG, PGM, JPEG) with the mammography model",
                             description=predict_mammo.__doc__)
    predict_mammo.add_arguments(predict)


def run(args: argparse.Namespace, ctx) -> int:
    if args.models_command == "evaluate":
        from models.evaluate import run_from_args

        return run_from_args(args)
    if args.models_command == "domain-calibrate":
        from models.domain_calibrate import run_from_args as calibrate

        return calibrate(args)
    return predict_mammo.run(args, ctx)

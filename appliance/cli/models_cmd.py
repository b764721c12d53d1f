"""`edgescreen models evaluate|predict-mammo`: the reference models' report, and scoring plain image files."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import predict_mammo


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    evaluate = sub.add_parser("evaluate", help="evaluate the reference models on held-out phantoms and write "
                                               "models/REPORT.md/.json")
    add_evaluate_arguments(evaluate)
    predict = sub.add_parser("predict-mammo", help="score mammograms (DICOM, PNG, PGM, JPEG) with the mammography model",
                             description=predict_mammo.__doc__)
    predict_mammo.add_arguments(predict)


def run(args: argparse.Namespace, ctx) -> int:
    if args.models_command == "evaluate":
        from models.evaluate import run_from_args

        return run_from_args(args)
    return predict_mammo.run(args, ctx)

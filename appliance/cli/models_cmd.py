"""`edgescreen models evaluate|predict-mammo`: the reference models' report, and scoring plain image files."""

from __future__ import annotations

import argparse

from appliance.cli import predict_mammo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    evaluate = sub.add_parser("evaluate", add_help=False,
                              help="evaluate the reference models on held-out phantoms and write models/REPORT.md/.json "
                                   "(`edgescreen models evaluate --help` for its options)")
    evaluate.add_argument("evaluate_args", nargs=argparse.REMAINDER)
    predict = sub.add_parser("predict-mammo", help="score mammograms (DICOM, PNG, PGM, JPEG) with the mammography model",
                             description=predict_mammo.__doc__)
    predict_mammo.add_arguments(predict)


def run(args: argparse.Namespace, ctx) -> int:
    if args.models_command == "evaluate":
        from models.evaluate import main as evaluate_main

        return evaluate_main(args.evaluate_args)
    return predict_mammo.run(args, ctx)

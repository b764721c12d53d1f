"""`edgescreen models evaluate|domain-calibrate|predict-mammo`: the reference models' report and calibration
(model tools, reached through their one entry, models/cli.py), and scoring plain image files (the appliance's
own pipeline, appliance.cli.predict_mammo)."""

from __future__ import annotations

import argparse

from edgescreen.appliance.cli import predict_mammo
from edgescreen.models import cli as model_tools


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    model_tools.add_parsers(sub)
    predict = sub.add_parser("predict-mammo", help="score mammograms (DICOM, PNG, PGM, JPEG) with the mammography model",
                             description=predict_mammo.__doc__)
    predict_mammo.add_arguments(predict)


def run(args: argparse.Namespace, ctx) -> int:  # noqa: ANN001 - AppContext, imported lazily by the CLI
    if args.models_command == "predict-mammo":
        return predict_mammo.run(args, ctx)
    return model_tools.run(args)

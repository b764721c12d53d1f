"""The model tools' command line, and the one entry from the appliance into them.

`edgescreen models evaluate|domain-calibrate`: appliance.cli.models_cmd adds these parsers to its own and
hands their runs here. Only the standard library is imported at parse time (`edgescreen --help` needs no
numpy), each tool when it runs. Layers point down: nothing in models/ imports the appliance's CLI
(tests/test_architecture.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

MINI_MIAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini-mias"


def add_evaluate_arguments(ap: argparse.ArgumentParser) -> None:
    """The held-out report's options (models/evaluate.py, models/evaluate_domain.py)."""
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
    gate.add_argument("--mini-mias", type=Path, default=MINI_MIAS, help="mini-MIAS folder (labels.csv, mdb*.png)")


def add_calibrate_arguments(ap: argparse.ArgumentParser) -> None:
    """Calibration of the validated domain and the operating points (models/domain_calibrate.py)."""
    ap.add_argument("--models", type=Path, default=None, help="folder with the ONNX models and cards (default: models/)")
    ap.add_argument("--n", type=int, default=60, help="calibration CT phantoms (default 60)")
    ap.add_argument("--seed-base", type=int, default=100_100, help="first calibration seed (100000-100999)")
    ap.add_argument("--stats-n", type=int, default=0, help="more phantoms for the body statistics alone (no models)")
    ap.add_argument("--mini-mias", type=Path, default=MINI_MIAS, help="mini-MIAS folder (labels.csv, mdb*.png)")
    ap.add_argument("--skip-ct", action="store_true", help="mammography only")
    ap.add_argument("--backend", default="onnxruntime", help="runtime for the FP32 models (openvino is faster on x86)")
    ap.add_argument("--save", type=Path, default=None, help="also save the sections and per-study rows as JSON here")
    ap.add_argument("--write", action="store_true", help="write the sections into the cards (default: print them)")


# name -> (help, options); the order is the order --help lists them
TOOLS = {
    "evaluate": ("evaluate the reference models on held-out phantoms and write models/REPORT.md/.json",
                 add_evaluate_arguments),
    "domain-calibrate": ("measure the validated domain and the operating points on calibration phantoms and "
                         "write them into the model cards", add_calibrate_arguments),
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add one sub-parser per tool to a caller's sub-parsers (`edgescreen models ...`)."""
    for name, (help_text, add_arguments) in TOOLS.items():
        parser = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(parser)
        parser.set_defaults(model_tool=name)


def run(args: argparse.Namespace) -> int:
    """Run the tool whose parser `add_parsers` made (its name is in `args.model_tool`)."""
    if args.model_tool == "evaluate":
        from edgescreen.models.evaluate import run_from_args

        return run_from_args(args)
    if args.model_tool == "domain-calibrate":
        from edgescreen.models.domain_calibrate import run_from_args as calibrate

        return calibrate(args)
    raise ValueError(f"no model tool {args.model_tool!r}: use one of {', '.join(TOOLS)}")

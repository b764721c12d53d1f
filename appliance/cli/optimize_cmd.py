"""`edgescreen optimize`: quantise, compile and validate the models for this box into a signed bundle.

The appliance never imports the optimiser (a Jetson in the field has no NNCF): this module only
declares the arguments, with the standard library, and imports ``optimize`` inside `run`. A box
without the optimiser's extras gets one clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

MISSING = "the optimiser is not installed on this box (pip install edgescreen[optimize])"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # dest differs from the top-level --profile: argparse would let a subcommand's default of None
    # overwrite `edgescreen --profile X optimize`.
    parser.add_argument("--profile", dest="optimize_profile", metavar="PROFILE",
                        help="hardware profile name or TOML (default: the global --profile, then the site config)")
    parser.add_argument("--models", metavar="DIR", help="directory of FP32 ONNX models and their cards "
                        "(default: the reference models shipped in models/)")
    parser.add_argument("--calibration", metavar="DIR", help="a clinic's own calibration tensors: DIR/<role>/*.npz "
                        "with arrays named as the card's inputs (default: phantom cases)")
    parser.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write")
    parser.add_argument("--roles", metavar="ROLE[,ROLE]", help="only these models (e.g. pancreas.stage1,mammo)")
    parser.add_argument("--select", choices=["latency", "energy"], default="latency",
                        help="choose the fastest passing candidate (default) or the lowest energy per inference")
    parser.add_argument("--calibration-cases", type=int, default=16, metavar="N")
    parser.add_argument("--heldout-cases", type=int, default=24, metavar="N",
                        help="held-out gate cases per model (disjoint seeds; a third normal, the rest lesions)")
    parser.add_argument("--bench-runs", type=int, default=10, metavar="N", help="timed runs per candidate (>= 10)")
    parser.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed runs before timing")
    parser.add_argument("--ort-calibration", default="minmax", metavar="M[,M]",
                        help="ONNX Runtime / TensorRT INT8 calibration methods to try in order until one passes the "
                        "gate: minmax, percentile, entropy (default minmax; each retry costs a calibration pass)")
    parser.add_argument("--ov-preset", default="performance,mixed", metavar="P[,P]",
                        help="NNCF presets for OpenVINO INT8, tried in order until one passes the gate "
                        "(performance: symmetric, fastest; mixed: asymmetric activations, more accurate)")
    parser.add_argument("--no-accuracy-control", action="store_true",
                        help="do not fall back to nncf.quantize_with_accuracy_control when INT8 fails the gate")
    parser.add_argument("--dynamic-shapes", action="store_true",
                        help="keep dynamic input dims in OpenVINO/TensorRT artifacts (default: the card's fixed shape)")
    parser.add_argument("--threads", type=int, metavar="N", help="inference threads (default: the profile's)")
    parser.add_argument("--batches", default="1,2,4", metavar="B[,B]",
                        help="tiles per call to measure for a tiled model (stage 1); the fastest per tile is kept")
    parser.add_argument("--volume-cases", type=int, default=3, metavar="N",
                        help="held-out phantom volumes on which a tiled model's window (tile size, overlap, tiles per "
                        "call) is gated and timed; 0 keeps the card's window without a whole-volume gate")
    parser.add_argument("--key", metavar="PATH", help="Ed25519 signing key (default: <data_dir>/keys/bundle_ed25519, "
                        "created if missing)")
    parser.add_argument("--cache", metavar="DIR", help="cache of rendered phantom cases and TensorRT timing "
                        "(default: <data_dir>/cache/optimize)")
    parser.add_argument("--work", metavar="DIR", help="keep every built candidate here (default: a temp dir, removed)")
    parser.add_argument("--install", action="store_true", help="install the bundle into the data dir when done")


def run(args: argparse.Namespace, ctx) -> int:  # noqa: ANN001 - AppContext, imported lazily by the CLI
    if importlib.util.find_spec("edgescreen.optimize") is None or importlib.util.find_spec("onnx") is None:
        print(f"edgescreen optimize: {MISSING}", file=sys.stderr)
        return 3
    try:
        from edgescreen.optimize.cli import run_optimize
    except ImportError as exc:
        print(f"edgescreen optimize: {MISSING} ({exc})", file=sys.stderr)
        return 3
    return run_optimize(args, ctx)

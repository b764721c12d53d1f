"""`edgescreen analyze PATH... --out DIR`: analyse one study from files, folders or a zip.

Exit 0: analysed (findings.json, key images and DICOM outputs in DIR). Exit 2: the input cannot be
analysed (the reason on stderr, one line). Exit 1: the models or runtime are not usable here.
Heavy imports live inside `run` so `edgescreen --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files, folders or zip files of one study")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--bundle", type=Path, metavar="DIR", help="optimised model bundle (manifest.json) to use")
    parser.add_argument("--models", type=Path, metavar="DIR", help="reference models directory (default: models/)")
    parser.add_argument("--threshold", type=float, metavar="X", help="operating point (default: site config, then card)")
    parser.add_argument("--backend", default="onnxruntime", metavar="NAME", help="runtime backend (default onnxruntime)")
    parser.add_argument("--threads", type=int, metavar="N", help="inference threads (default: hardware profile)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="sliding-window tiles per model call")


class _Bar:
    """A one-line progress bar on stderr, only when stderr is a terminal (logs stay clean)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and fraction < 1.0):
            return
        self.last = now
        filled = int(30 * max(0.0, min(fraction, 1.0)))
        sys.stderr.write(f"\r{stage:<8} [{'#' * filled}{'.' * (30 - filled)}] {100 * fraction:5.1f}%")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def _defaults(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """Site config and hardware profile fill in what the command line left open."""
    bundle, threads = args.bundle, args.threads
    site_thresholds: dict[str, float | None] = {}
    if ctx is not None:
        config = getattr(ctx, "config", None)
        if config is not None:
            site_thresholds = {"pancreas": config.triage.pancreas_threshold, "mammo": config.triage.mammo_threshold}
        if bundle is None and config is not None and config.hardware.bundle:
            bundle = Path(config.hardware.bundle)
        if threads is None:
            try:
                threads = ctx.profile.threads.inference
            except Exception:  # a profile problem must not stop an analysis that can use defaults
                threads = None
    trusted = getattr(ctx, "data_dir", None) if ctx is not None else None
    return {"site_thresholds": site_thresholds, "bundle": bundle, "threads": threads, "trusted_keys": trusted}


def run(args: argparse.Namespace, ctx: Any = None) -> int:
    from appliance.modelcard import CardError
    from appliance.pipeline.analyze import InputError, analyze_study
    from appliance.pipeline.ctload import SeriesError
    from appliance.pipeline.findings import summary_lines
    from appliance.pipeline.pancreas import PipelineError
    from appliance.runtime import BackendUnavailable

    defaults = _defaults(args, ctx)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        print(f"edgescreen analyze: --threshold {args.threshold} is outside [0, 1]", file=sys.stderr)
        return 2
    bar = _Bar()
    try:
        findings = analyze_study(list(args.paths), args.out, models_dir=args.models, bundle_dir=defaults["bundle"],
                                 threshold=args.threshold, site_thresholds=defaults["site_thresholds"], progress=bar, backend=args.backend,
                                 threads=defaults["threads"], batch_size=args.batch_size,
                                 trusted_keys=defaults["trusted_keys"] if defaults["bundle"] else None)
    except (InputError, SeriesError) as exc:
        bar.close()
        print(f"edgescreen analyze: unusable input: {exc}", file=sys.stderr)
        return 2
    except (PipelineError, CardError, BackendUnavailable) as exc:
        bar.close()
        print(f"edgescreen analyze: cannot run the models: {exc}", file=sys.stderr)
        return 1
    bar.close()
    for line in summary_lines(findings):
        print(line)
    print(f"findings: {Path(args.out) / 'findings.json'}")
    return 0

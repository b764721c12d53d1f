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
    parser.add_argument("--operating-point", metavar="NAME",
                        help="one of the card's calibrated operating points, e.g. spec99, spec95, spec90, sens95 "
                             "(default: the site config's [triage] choice, then the card's default)")
    parser.add_argument("--threshold", type=float, metavar="X",
                        help="a hand-set threshold instead of a calibrated operating point (research use)")
    parser.add_argument("--backend", default="onnxruntime", metavar="NAME", help="runtime backend (default onnxruntime)")
    parser.add_argument("--threads", type=int, metavar="N", help="inference threads (default: hardware profile)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="sliding-window tiles per model call")
    parser.add_argument("--enqueue-sync", action="store_true",
                        help="also queue the results for sync (cloud items, and the PACS when configured)")


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


def _request(args: argparse.Namespace, ctx: Any) -> Any:
    """The analysis request: the command line first, then the site config and hardware profile."""
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, AnalysisSettings

    config = getattr(ctx, "config", None) if ctx is not None else None
    bundle, threads = args.bundle, args.threads
    if bundle is None and config is not None and config.hardware.bundle:
        bundle = Path(config.hardware.bundle)
    if threads is None and ctx is not None:
        try:
            threads = ctx.profile.threads.inference
        except Exception:  # a profile problem must not stop an analysis that can use defaults
            threads = None
    kwargs = {"backend": args.backend, "threads": threads, "batch_size": args.batch_size, "threshold": args.threshold}
    if args.operating_point:
        settings = AnalysisSettings(operating_points={"pancreas": args.operating_point, "mammo": args.operating_point},
                                    operating_point_source="override", **kwargs)
    elif config is not None:
        settings = AnalysisSettings.from_triage(config.triage, **kwargs)
    else:
        settings = AnalysisSettings(**kwargs)
    trusted = getattr(ctx, "key_home", getattr(ctx, "data_dir", None)) if ctx is not None and bundle else None
    return AnalysisRequest(list(args.paths), args.out, models_dir=args.models, bundle_dir=bundle, trusted_keys=trusted,
                           settings=settings, progress=_Bar())


def run(args: argparse.Namespace, ctx: Any = None) -> int:
    from edgescreen.appliance.modelcard import CardError
    from edgescreen.appliance.pipeline.analyze import InputError, analyze_study
    from edgescreen.appliance.pipeline.ctload import SeriesError
    from edgescreen.appliance.pipeline.findings import summary_lines
    from edgescreen.appliance.pipeline.operating_point import OperatingPointError
    from edgescreen.appliance.pipeline.pancreas import PipelineError
    from edgescreen.appliance.runtime import BackendUnavailable

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        print(f"edgescreen analyze: --threshold {args.threshold} is outside [0, 1]", file=sys.stderr)
        return 2
    request = _request(args, ctx)
    bar = request.progress
    try:
        findings = analyze_study(request)
    except (InputError, SeriesError) as exc:
        bar.close()
        print(f"edgescreen analyze: unusable input: {exc}", file=sys.stderr)
        return 2
    except (PipelineError, CardError, BackendUnavailable, OperatingPointError) as exc:
        bar.close()
        print(f"edgescreen analyze: cannot run the models: {exc}", file=sys.stderr)
        return 1
    bar.close()
    for line in summary_lines(findings):
        print(line)
    print(f"findings: {Path(args.out) / 'findings.json'}")
    if getattr(args, "enqueue_sync", False) and ctx is not None:
        from edgescreen.appliance.sync.enqueue import enqueue_result

        ids = enqueue_result(ctx.store, ctx.config, findings=findings, out_dir=args.out)
        print(f"queued for sync: outbox item(s) {', '.join(map(str, ids))}")
    return 0

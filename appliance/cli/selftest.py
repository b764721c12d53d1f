"""`edgescreen selftest`: golden phantom cases through the whole path, compared with the bundle's expected findings.

Runs a scratch DICOM listener on loopback and the real worker in a scratch data directory, so phantom
patients never reach the clinic's worklist; a technician's explicit test, it runs whatever the scanner is
doing (as a run-now would). Exit 0 when every case matches, 1 with the differences when one does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, metavar="DIR", help="test this bundle (default: the active one)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="copy the scratch appliance (cases, store, "
                        "outputs) here for inspection")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def report_lines(result) -> list[str]:  # noqa: ANN001 - appliance.selftest.SelftestResult
    lines = []
    for case in result.cases:
        status = "PASS" if case.passed else "FAIL"
        lines.append(f"{status}  {case.name:<14} triage {case.triage or '-'} (expected {case.expected_triage or '-'}), "
                     f"{case.seconds:.0f} s")
        lines += [f"      - {d}" for d in case.differences]
    for skip in result.skipped:
        lines.append(f"skip  {skip['case']:<14} {skip['reason']}")
    if result.error:
        lines.append(f"FAIL  self-test: {result.error}")
    verdict = "passed" if result.passed else "FAILED"
    lines.append(f"self-test {verdict} with bundle {result.bundle_id or '-'} in {result.seconds:.0f} s")
    return lines


def run(args: argparse.Namespace, ctx) -> int:  # noqa: ANN001 - AppContext
    from edgescreen.appliance.selftest import record, run_selftest

    def say(msg: str) -> None:
        print(f"selftest: {msg}", file=sys.stderr, flush=True)

    result = run_selftest(ctx, bundle=args.bundle, keep=args.keep, progress=None if args.json else say)
    try:
        record(ctx.data_dir, result)
    except OSError as exc:
        say(f"could not record the result in {ctx.data_dir} ({exc.strerror}); doctor will not show it")
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print("\n".join(report_lines(result)))
    return 0 if result.passed else 1

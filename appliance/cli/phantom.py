"""`edgescreen phantom ct|mg`: synthetic studies for demos, tests and field self-tests."""

from __future__ import annotations

import argparse
from pathlib import Path

LESIONS = ("pdac", "pnet", "spt", "ipmn", "mcn", "scn", "cp", "other", "none")
FINDINGS = ("benign", "malignant", "calcification", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    ct = kinds.add_parser("ct", help="one non-contrast abdominal CT series (one .dcm per slice) plus ground truth")
    ct.add_argument("--seed", type=int, required=True, help="the synthetic patient (deterministic)")
    ct.add_argument("--out", type=Path, required=True, help="output folder")
    ct.add_argument("--lesion", choices=LESIONS, default="none", help="pancreatic lesion class (default none)")
    ct.add_argument("--slices", type=int, help="number of slices, 60-400 (default: from the seed's slice thickness)")
    mg = kinds.add_parser("mg", help="one four-view mammography exam (RCC, LCC, RMLO, LMLO) plus labels")
    mg.add_argument("--seed", type=int, required=True, help="the synthetic patient (deterministic)")
    mg.add_argument("--out", type=Path, required=True, help="output folder")
    mg.add_argument("--finding", choices=FINDINGS, default="none", help="finding in one breast (default none)")


def run(args: argparse.Namespace, ctx) -> int:
    import sys
    import time

    start = time.perf_counter()
    if args.kind == "ct":
        from edgescreen.models.phantom.ct import write_ct_study

        if args.slices is not None and not 60 <= args.slices <= 400:
            print(f"edgescreen phantom: --slices {args.slices}: use 60 to 400", file=sys.stderr)
            return 2
        lesion = None if args.lesion == "none" else args.lesion
        phantom = write_ct_study(args.out, args.seed, lesion=lesion, slices=args.slices)
        n = phantom.hu.shape[0]
        print(f"wrote CT phantom seed {args.seed} ({n} slices, lesion {args.lesion}) to {args.out} "
              f"in {time.perf_counter() - start:.1f} s")
    else:
        from edgescreen.models.phantom.mg import write_mg_exam

        finding = None if args.finding == "none" else args.finding
        write_mg_exam(args.out, args.seed, finding=finding)
        print(f"wrote mammography phantom seed {args.seed} (finding {args.finding}) to {args.out} "
              f"in {time.perf_counter() - start:.1f} s")
    return 0

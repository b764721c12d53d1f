"""`edgescreen studies`: what arrived, per series, with instance counts and state."""

from __future__ import annotations

import argparse
import json
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print as JSON")
    parser.add_argument("--limit", type=int, default=None, help="only the newest N studies")


def run(args: argparse.Namespace, ctx) -> int:
    from appliance.store.instances import list_studies

    studies = list_studies(ctx.store, args.limit)
    if args.json:
        print(json.dumps(studies, indent=2, default=str))
        return 0
    if not studies:
        print(f"no studies in {ctx.data_dir}")
    for st in studies:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st["received_at"]))
        print(f"{when}  {st['patient_name'] or '-'}  {st['description'] or ''}  [{st['study_uid']}]")
        for se in st["series"]:
            reason = f"  ({se['reason']})" if se.get("reason") else ""
            print(f"    {se['modality'] or '?':3} {se['instances']:4d} images  {se['state']:<12} "
                  f"{se['description'] or ''}{reason}")
    return 0

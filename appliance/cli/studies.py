"""`edgescreen studies`: what arrived, per study (the worklist's state and reason) and per series (images, state).

It reads through appliance.store.worklist, the same derivation the web worklist shows, so the technician's
terminal and the clinic's screen never disagree about a study.
"""

from __future__ import annotations

import argparse
import json
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print as JSON")
    parser.add_argument("--limit", type=int, default=None, help="only the newest N studies")


def run(args: argparse.Namespace, ctx) -> int:
    from edgescreen.appliance.store.worklist import list_studies

    studies = list_studies(ctx.store, args.limit)
    if args.json:
        print(json.dumps(studies, indent=2, default=str))
        return 0
    if not studies:
        print(f"no studies in {ctx.data_dir}")
    for st in studies:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st["received_at"]))
        triage = f"  {st['triage']}" if st.get("triage") else ""
        reason = f" ({st['reason']})" if st.get("reason") else ""
        print(f"{when}  {st['patient_name'] or '-'}  {st['description'] or ''}  [{st['study_uid']}]")
        print(f"    {st['state']}{reason}{triage}{'  reviewed' if st.get('reviewed') else ''}")
        for se in st["series"]:
            reason = f"  ({se['reason']})" if se.get("reason") else ""
            print(f"    {se['modality'] or '?':3} {se['instances']:4d} images  {se['state']:<12} "
                  f"{se['description'] or ''}{reason}")
    return 0

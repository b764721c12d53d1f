"""`edgescreen quarantine`: instances the DICOM service refused, with why, from whom and what it answered."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print as JSON")
    parser.add_argument("--limit", type=int, default=None, help="show only the newest N")


def run(args: argparse.Namespace, ctx) -> int:
    import json
    import time

    from edgescreen.appliance.store.instances import list_quarantine

    items = list_quarantine(ctx.store, args.limit)
    for item in items:
        if item.get("status") is not None:
            item["status_hex"] = f"0x{item['status']:04X}"
    if args.json:
        print(json.dumps(items, indent=2, default=str))
        return 0
    if not items:
        print(f"quarantine is empty ({ctx.data_dir})")
    for item in items:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["received_at"]))
        sender = f"{item['calling_ae'] or '?'}@{item['peer'] or '?'}"
        print(f"#{item['id']}  {when}  {item.get('status_hex', '-'):6}  from {sender}  {item['reason']}")
        if item["path"]:
            print(f"      file: {ctx.data_dir / item['path']}")
    return 0

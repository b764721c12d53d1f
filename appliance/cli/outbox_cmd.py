"""`edgescreen outbox list|retry ID`: what waits to leave the box, and a technician's "try again now".

`list` shows each item's kind, state, attempts and last error (never its payload: that names local files
and the original study), plus the PACS and cloud summary. `retry ID` makes a failed item due again;
it is audited with the technician's name (--actor, default the login name).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list outbox items (newest first)")
    ls.add_argument("--state", choices=["pending", "sending", "sent", "failed", "superseded"], action="append",
                    help="only these states (repeatable; default: all but superseded)")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rt = sub.add_parser("retry", help="make a failed item due again (audited)")
    rt.add_argument("id", type=int)
    rt.add_argument("--actor", help="who asks (default: the login name)")


def run(args: argparse.Namespace, ctx) -> int:
    import getpass
    import json
    import sys
    import time

    from edgescreen.appliance.store import outbox
    from edgescreen.appliance.sync.status import describe_item, summary

    store = ctx.store
    if args.action == "retry":
        try:
            row = outbox.retry(store, args.id, args.actor or getpass.getuser())
        except outbox.OutboxError as exc:
            print(f"edgescreen outbox: {exc}", file=sys.stderr)
            return 2
        print(f"outbox item {row['id']} ({row['kind']}) is due again; the sync service sends it at its next round")
        return 0
    states = tuple(args.state or ("pending", "sending", "sent", "failed"))
    items = [describe_item(r) for r in outbox.list_items(store, states=states, limit=args.limit)]
    status = summary(store)
    if args.json:
        print(json.dumps({"summary": status, "items": items}, indent=2, default=str))
        return 0

    def when(ts: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"

    for dest, s in status.items():
        held = f" ({s['blocked']} behind a failed item of their study)" if s.get("blocked") else ""
        print(f"{dest}: {s['pending']} pending{held}, {s['failed']} failed, {s['sent']} sent; last success "
              f"{when(s['last_success'])}; last error {s['last_error'] or '-'}")
    print(f"{'id':>6}  {'kind':<14} {'state':<10} {'tries':>5}  {'created':<19}  last error")
    for it in items:
        print(f"{it['id']:>6}  {it['kind']:<14} {it['state']:<10} {it['attempts']:>5}  {when(it['created_at']):<19}  "
              f"{(it['last_error'] or '')[:100]}")
    return 0

"""`edgescreen sync`: send results out of the outbox (PACS exports, de-identified cloud items, heartbeats).

    edgescreen sync            the service: runs until SIGTERM (systemd/edgescreen-sync.service)
    edgescreen sync --once     deliver what is pending now, retrying transient failures; exit 0 when
                               nothing is left, 1 when items remain (then `edgescreen outbox list` says why)

The receiver URL comes from [sync] url or EDGESCREEN_CLOUD_URL.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="deliver what is pending, then exit (0: all delivered)")
    parser.add_argument("--url", help="the fleet receiver for this run (default: [sync] url, EDGESCREEN_CLOUD_URL)")
    parser.add_argument("--max-attempts", type=int, default=6, metavar="N",
                        help="with --once: attempts per item before giving up for this run (default 6)")
    parser.add_argument("--deadline", type=float, default=600.0, metavar="SECONDS",
                        help="with --once: stop retrying after this long (default 600)")
    parser.add_argument("--poll", type=float, metavar="SECONDS", help="service: idle poll (default [sync] interval_s)")


def run(args: argparse.Namespace, ctx) -> int:
    import contextlib
    import json
    import os
    import signal
    import sys

    from edgescreen.appliance.sync.service import SyncConfigError, SyncService
    from edgescreen.appliance.sync.status import summary

    try:
        service = SyncService(ctx, url=args.url)
    except SyncConfigError as exc:
        print(f"edgescreen sync: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop.set())
    with contextlib.suppress(OSError):
        os.nice(10)  # results can wait a little; inference and the UI cannot
    try:
        if args.once:
            if service.client is None and ctx.config.dicom.pacs is None:
                print("edgescreen sync: nothing to send to: no [dicom.pacs] and no cloud URL ([sync] url or "
                      "EDGESCREEN_CLOUD_URL)", file=sys.stderr)
                return 2
            code = service.run_once(max_attempts=args.max_attempts, deadline_s=args.deadline)
            status = summary(ctx.store)
            print(json.dumps(status, default=str))
            if code != 0:
                for dest, s in status.items():
                    if s["pending"] or s["failed"]:
                        held = (f" ({s['blocked']} of them wait behind a failed item of their study: "
                                "`edgescreen outbox list`, fix it, `edgescreen outbox retry ID`)" if s["blocked"] else "")
                        print(f"edgescreen sync: {dest}: {s['pending']} pending{held}, {s['failed']} failed; last "
                              f"error: {s['last_error']}", file=sys.stderr)
            return code
        from edgescreen.appliance import sdnotify

        watchdog = sdnotify.start_watchdog(service.healthy, "sync")
        sdnotify.ready("sync running")
        try:
            service.run_forever(poll_s=args.poll)
        finally:
            sdnotify.stopping("sync stopping")
            if watchdog is not None:
                watchdog.stop()
        return 0
    finally:
        service.close()

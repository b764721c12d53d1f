"""`edgescreen dicom`: the DICOM service (C-ECHO, C-STORE, MPPS; result export to the PACS).

Serves until SIGTERM or SIGINT, then stops cleanly (running associations get a grace period).
Command-line options override the site config's [dicom] section for this run only.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="TCP port to listen on (config dicom.port, default 11112)")
    parser.add_argument("--bind", help="address to listen on (config dicom.bind, default 0.0.0.0)")
    parser.add_argument("--ae-title", help="our AE title (config dicom.ae_title)")
    parser.add_argument("--allow-any-ae", action="store_true",
                        help="accept every calling AE title (tests, first set-up); normally [[dicom.allowed]] decides")
    parser.add_argument("--stable-after", type=float, metavar="SECONDS",
                        help="a series is complete after this long without a new instance (config dicom.stable_after_s)")
    parser.add_argument("--min-free-mb", type=float,
                        help="refuse C-STORE with 0xA700 below this much free disk (config dicom.min_free_mb)")
    parser.add_argument("--max-pdu", type=int, help="maximum PDU we receive, 0 = unlimited (config dicom.max_pdu)")
    parser.add_argument("--receive-path", choices=["fast", "stock"],
                        help="fast: the validated fast receive path (default); stock: pynetdicom's own acceptor "
                             "(config dicom.receive_path)")
    parser.add_argument("--export-pending", action="store_true",
                        help="send due result exports to the PACS once, print the counts as JSON, and exit")


def _overrides(args: argparse.Namespace) -> dict:
    pairs = {"port": args.port, "bind": args.bind, "ae_title": args.ae_title, "stable_after_s": args.stable_after,
             "min_free_mb": args.min_free_mb, "max_pdu": args.max_pdu, "receive_path": args.receive_path}
    out = {k: v for k, v in pairs.items() if v is not None}
    if args.allow_any_ae:
        out["allow_any_ae"] = True
    return out


def run(args: argparse.Namespace, ctx) -> int:
    import json
    import signal
    import sys
    import threading

    from pydantic import ValidationError

    from edgescreen.appliance.config.site import Dicom
    from edgescreen.appliance.dicom.scp import DicomService

    try:
        dicom = Dicom.model_validate({**ctx.config.dicom.model_dump(), **_overrides(args)})
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"edgescreen dicom: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    config = ctx.config.model_copy(update={"dicom": dicom})

    if args.export_pending:
        from edgescreen.appliance.dicom.export import export_pending

        if dicom.pacs is None:
            print("edgescreen dicom: no [dicom.pacs] section in the site config; nothing to export to",
                  file=sys.stderr)
            return 2
        print(json.dumps(export_pending(ctx.store, config)))
        return 0

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service = DicomService(ctx.store, config)
    try:
        service.start()
    except OSError as exc:
        print(f"edgescreen dicom: cannot listen on {dicom.bind}:{dicom.port}: {exc.strerror}; is another DICOM "
              "service running there? choose another --port", file=sys.stderr)
        return 2
    from edgescreen.appliance import (
        sdnotify,  # systemd: ready now; watchdog fed while its heartbeat and port live
    )
    from edgescreen.appliance.store.heartbeat import BEAT_EVERY_S

    host, port = service.address
    sdnotify.start_watchdog(lambda: sdnotify.dicom_health(ctx.store, host, port, BEAT_EVERY_S), "dicom")
    sdnotify.ready(f"listening on {host}:{port} as {dicom.ae_title}")
    try:
        stop.wait()
        sdnotify.stopping()
    finally:
        service.stop()
    return 0

"""`edgescreen cloud-receiver`: the fleet receiver (runs in the cloud, not on the box).

    edgescreen cloud-receiver --port 8443 --data-dir /srv/fleet --database-url postgresql://...
    edgescreen cloud-receiver --data-dir /srv/fleet --add-device clinic-7 --site "Clinic 7"

Several processes may serve one PostgreSQL database behind a load balancer; the database keeps every
item exactly once. Stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8443, help="TCP port (default 8443)")
    parser.add_argument("--data-dir", dest="receiver_data_dir", metavar="DIR",
                        help="where the SQLite database lives (default: the global --data-dir)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="listen address (default 127.0.0.1: TLS is terminated by the proxy in front)")
    parser.add_argument("--database-url", metavar="URL",
                        help="postgresql://user@host:port/db for a fleet (default: SQLite in the data dir)")
    parser.add_argument("--allow-any-device", action="store_true",
                        help="accept devices without a token, named by X-Edgescreen-Device (tests and demos only)")
    parser.add_argument("--add-device", metavar="NAME", help="register a device, print its token, and exit")
    parser.add_argument("--site", help="with --add-device: the site's name shown on the page")
    parser.add_argument("--threads", type=int, default=8, help="request threads (default 8)")


def run(args: argparse.Namespace, ctx) -> int:
    import os
    import signal
    import sys

    from edgescreen.appliance.cloud.db import ReceiverDB, ReceiverDBError, create_schema, engine_for
    from edgescreen.appliance.logs import get_logger

    log = get_logger("edgescreen.appliance.cloud")
    from pathlib import Path

    url = args.database_url or os.environ.get("EDGESCREEN_DATABASE_URL")
    data_dir = Path(args.receiver_data_dir) if args.receiver_data_dir else ctx.data_dir
    try:
        engine = engine_for(url, data_dir)
        create_schema(engine)
    except ReceiverDBError as exc:
        print(f"edgescreen cloud-receiver: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - an unreachable database is a clear error, not a traceback
        print(f"edgescreen cloud-receiver: cannot use the database ({type(exc).__name__}: {str(exc)[:300]}); "
              "check --database-url and that the server is up", file=sys.stderr)
        return 2
    db = ReceiverDB(engine)
    if args.add_device:
        token = db.add_device(args.add_device, args.site)
        print(token)
        return 0

    from waitress.server import create_server

    from edgescreen.appliance.cloud.app import create_app

    app = create_app(db, allow_any_device=args.allow_any_device)
    try:
        server = create_server(app, host=args.host, port=args.port, threads=args.threads, ident="edgescreen-cloud")
    except OSError as exc:
        print(f"edgescreen cloud-receiver: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return 2

    def _stop(signum, frame) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    log.info("cloud receiver listening", url=f"http://{args.host}:{args.port}/", database=engine.dialect.name,
             allow_any_device=args.allow_any_device, pid=os.getpid())
    print(f"cloud receiver listening on http://{args.host}:{args.port}/", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        engine.dispose()
        log.info("cloud receiver stopped")
    return 0

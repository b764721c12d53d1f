"""`edgescreen serve`: the web UI under waitress, the production WSGI server that needs nothing native.

On a box with no user yet it creates `admin` with a one-time password and prints it once (to the
terminal, never to the log), so the first login is possible without a separate step; the admin must
choose a new password at that login. It listens on `[web] host` (127.0.0.1 by default): opening it to
the LAN is a technician's decision (`doctor` says how).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (default: [web] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: [web] port, 8080)")


def print_first_admin(ctx, url: str) -> None:
    """Create the first admin if the box has no user, and print its one-time password once."""
    from edgescreen.appliance.accounts import FIRST_ADMIN, ensure_first_admin

    password = ensure_first_admin(ctx.store)
    if password is not None:
        print(f"\n  First start: log in at {url} as '{FIRST_ADMIN}' with the one-time password\n\n"
              f"      {password}\n\n  (shown only now; you will choose your own password at that login)\n",
              flush=True)


def run(args: argparse.Namespace, ctx) -> int:
    from waitress.server import create_server

    from edgescreen.appliance import sdnotify
    from edgescreen.appliance.logs import get_logger
    from edgescreen.appliance.store.worklist import ensure_worklist
    from edgescreen.appliance.web import create_app

    host = args.host or ctx.config.web.host
    port = args.port or ctx.config.web.port
    ctx.store  # noqa: B018 - open and migrate before the first request, so a bad data dir fails here
    ensure_worklist(ctx.store)
    app = create_app(ctx)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print_first_admin(ctx, url)
    server = create_server(app, host=host, port=port, threads=ctx.config.web.threads, ident="edgescreen",
                           channel_timeout=60, clear_untrusted_proxy_headers=True)
    log = get_logger(__name__)

    def _stop(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        log.info("web stopping", signal=signum)
        server.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, _stop)
    log.info("web listening", url=f"http://{host}:{port}/", data_dir=str(ctx.data_dir))
    # systemd: ready now, and a watchdog fed while /healthz answers (both no-ops outside systemd)
    sdnotify.start_watchdog(lambda: sdnotify.http_ok(host, port), "web")
    sdnotify.ready(f"listening on {host}:{port}")
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        server.run()
    return 0

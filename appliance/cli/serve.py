"""`edgescreen serve`: the web UI under waitress, the production WSGI server that needs nothing native."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (default: [web] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: [web] port, 8080)")


def run(args: argparse.Namespace, ctx) -> int:
    from waitress import serve

    from appliance.logs import get_logger
    from appliance.web import create_app

    host = args.host or ctx.config.web.host
    port = args.port or ctx.config.web.port
    app = create_app(ctx)
    ctx.store  # noqa: B018 - open and migrate before the first request, so a bad data dir fails here
    get_logger(__name__).info("web listening", url=f"http://{host}:{port}/", data_dir=str(ctx.data_dir))
    serve(app, host=host, port=port, threads=ctx.config.web.threads, ident="edgescreen")
    return 0

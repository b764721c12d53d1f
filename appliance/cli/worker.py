"""`edgescreen worker`: run queued jobs whenever the scanner and the power allow."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true",
                        help="exit when no job is queued or running (a dead worker's job is waited for and taken "
                             "over) instead of waiting for more")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between gate checks while idle (default 2)")


def run(args: argparse.Namespace, ctx) -> int:
    from edgescreen.appliance import sdnotify
    from edgescreen.appliance.scheduler.worker import Worker

    worker = Worker(ctx, poll_s=args.poll, once=args.once)
    worker.install_signal_handlers()
    # systemd: ready now; the watchdog is fed while the loop or its job's safe points keep moving (a tile batch
    # or a model load takes seconds; WatchdogSec=300 in the unit)
    sdnotify.start_watchdog(lambda: sdnotify.loop_health(lambda: worker.alive_at, 240.0, "the worker loop"), "worker")
    sdnotify.ready("waiting for jobs")
    worker.run_forever()
    sdnotify.stopping()
    return 0

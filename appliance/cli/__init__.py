"""The `edgescreen` command. Each subcommand lives in its own module that provides
`add_arguments(parser)` and `run(args, ctx) -> int`. Command modules import only the standard library
at the top and their heavy dependencies inside `run`, so `--help` stays fast and a box without the
optimiser's extras (a Jetson in the field) still has every other command.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from edgescreen.appliance import RESEARCH_USE_BANNER, __version__

# name -> (module, one-line help). Order is the order --help shows.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("edgescreen.appliance.cli.demo", "generate phantom studies and run the whole appliance on http://127.0.0.1:8080"),
    "serve": ("edgescreen.appliance.cli.serve", "run the web UI (waitress)"),
    "users": ("edgescreen.appliance.cli.users", "web UI accounts: add, list, disable, reset-password, role, API token (audited)"),
    "doctor": ("edgescreen.appliance.cli.doctor", "diagnose this box: services, ports, DICOM, UPS, clock, disk, bundle, "
               "backends, cloud, UI exposure (OK/WARN/FAIL with fixes)"),
    "phantom": ("edgescreen.appliance.cli.phantom", "write synthetic phantom DICOM studies (CT, mammography)"),
    "analyze": ("edgescreen.appliance.cli.analyze", "analyse a study (folder, zip or files): findings, key images, DICOM SEG/SR/PDF"),
    "models": ("edgescreen.appliance.cli.models_cmd", "evaluate the reference models; score mammograms from image files"),
    "studies": ("edgescreen.appliance.cli.studies", "list received studies with their series and state"),
    "dicom": ("edgescreen.appliance.cli.dicom_cmd", "run the DICOM service: C-STORE/C-ECHO/MPPS receiver, result export to PACS"),
    "quarantine": ("edgescreen.appliance.cli.quarantine", "list instances the DICOM service refused, with their reasons"),
    "config": ("edgescreen.appliance.cli.config_cmd", "validate and show the site config and hardware profile"),
    "worker": ("edgescreen.appliance.cli.worker", "run queued analyses whenever the scanner is idle and power allows"),
    "jobs": ("edgescreen.appliance.cli.jobs", "list the job queue; mark a job urgent or run-now; retry a failed job (audited)"),
    "scanner": ("edgescreen.appliance.cli.scanner", "set the scanner switch busy|idle|auto, or show what the gate sees"),
    "scheduler": ("edgescreen.appliance.cli.scheduler", "pause or resume all analysis (audited), or show whether it is paused"),
    "simulate": ("edgescreen.appliance.cli.simulate", "replay a clinic-day trace through the real scheduler"),
    "optimize": ("edgescreen.appliance.cli.optimize_cmd", "quantise, compile and validate the models for this box into a signed bundle"),
    "bundle": ("edgescreen.appliance.cli.bundle_cmd", "verify, install, roll back or list signed model bundles"),
    "sync": ("edgescreen.appliance.cli.sync", "send results out: PACS exports and de-identified cloud items (--once: then exit)"),
    "outbox": ("edgescreen.appliance.cli.outbox_cmd", "list what waits to leave the box; retry a failed item (audited)"),
    "cloud-receiver": ("edgescreen.appliance.cli.cloud_receiver", "run the fleet receiver (cloud side; SQLite or PostgreSQL)"),
    "provision": ("edgescreen.appliance.cli.provision", "turn this box into a running appliance: config, user, keys, bundle, "
                  "first admin, systemd units, self-test"),
    "selftest": ("edgescreen.appliance.cli.selftest", "golden phantom cases through DICOM, the worker and the outputs, "
                 "compared with the bundle's expected findings"),
    "purge": ("edgescreen.appliance.cli.purge", "apply the retention policy now (--dry-run: only show what it deletes)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgescreen",
        description=f"Offline cancer-screening appliance. {RESEARCH_USE_BANNER}",
    )
    parser.add_argument("--version", action="version", version=f"edgescreen {__version__}")
    parser.add_argument("--data-dir", help="data directory (default: $EDGESCREEN_DATA_DIR, config data_dir, then "
                        "/var/lib/edgescreen on a provisioned box, else ~/.local/share/edgescreen)")
    parser.add_argument("--config", help="site config TOML (default: $EDGESCREEN_CONFIG, /etc/edgescreen/site.toml)")
    parser.add_argument("--profile", help="hardware profile name or TOML path (overrides the config)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


# The long-running services: each installs its own SIGTERM handler once it is running (stop accepting, finish
# or checkpoint what is in hand, exit 0). Until then a SIGTERM must still be a clean stop, see main().
SERVICES = frozenset({"dicom", "worker", "sync", "serve", "cloud-receiver"})


def _stop_while_starting(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
    """SIGTERM before a service's own handler is in place: nothing is received, claimed or sent yet, so exit 0.

    systemd stopping a unit that has just (re)started, or a drill restarting a box, must see a clean stop,
    not death by signal; the store is crash-safe, so leaving in the middle of its opening loses nothing."""
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    if args.command in SERVICES:
        signal.signal(signal.SIGTERM, _stop_while_starting)
    # deferred: keeps --help and --version light, and a service's SIGTERM handler (above) in place before the
    # heavy imports (pydantic, the store) that take most of its start-up
    from edgescreen.appliance.config import ConfigError, load_site_config, resolve_paths
    from edgescreen.appliance.config.load import find_config
    from edgescreen.appliance.context import AppContext
    from edgescreen.appliance.logs import setup_logging
    from edgescreen.appliance.store import StoreError

    try:
        config_path = find_config(args.config)
        config = load_site_config(config_path)
        setup_logging(args.log_level or config.logging.level)
        ctx = AppContext(config=config, data_dir=resolve_paths(args.data_dir, config, config_path),
                         config_path=config_path, _profile_override=args.profile)
        return int(args._run(args, ctx) or 0)
    except ConfigError as exc:
        print(f"edgescreen: config error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"edgescreen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

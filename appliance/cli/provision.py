"""`edgescreen provision`: turn a fresh box into a running, self-tested appliance, in one idempotent command.

Writes the validated site config, creates the service user and the data directory, makes the device's
signing key (root-only), installs a bundle that fits this box (a prebuilt signed one, else the optimiser
runs here, with a progress bar), creates the first admin and prints its one-time password, installs the
systemd units with this install's path, opts the optimiser's libraries out of telemetry, runs the
self-test and starts the services. Run it again with the same options: it says nothing changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # dest differs from the top-level --profile, which argparse would otherwise let a None here overwrite
    parser.add_argument("--profile", dest="provision_profile", required=True, metavar="PROFILE",
                        help="hardware profile of this box (x86-cpu, x86-nvidia, jetson-orin-nano, ...)")
    parser.add_argument("--site-id", required=True, help="the clinic's site identifier (letters, digits, . _ -)")
    parser.add_argument("--cloud", metavar="URL", help="fleet receiver URL: enables sync")
    parser.add_argument("--token-file", type=Path, metavar="FILE", help="this device's cloud token (copied to "
                        "/etc/edgescreen/cloud-token, readable only by root and the services)")
    parser.add_argument("--scanner-ae", metavar="AE", help="the scanner's calling AE title (allow-listed)")
    parser.add_argument("--scanner-host", metavar="IP", help="the scanner's IP address (pins the allow-list entry)")
    parser.add_argument("--pacs", metavar="AE@HOST:PORT", help="where results (SEG, SR, PDF) are sent")
    parser.add_argument("--dicom-port", type=int, metavar="PORT", help="DICOM listen port (default 11112; "
                        "104 gives the DICOM service CAP_NET_BIND_SERVICE, nothing else)")
    parser.add_argument("--web-host", metavar="ADDR", help="web UI listen address (default 127.0.0.1; 0.0.0.0 "
                        "for the clinic LAN, behind staff login)")
    parser.add_argument("--bundle", type=Path, action="append", default=[], metavar="DIR",
                        help="a prebuilt signed bundle, or a directory of them; used when one fits this box "
                        "(profile, CPU, runtime versions), else the optimiser runs here")
    parser.add_argument("--trust-key", type=Path, action="append", default=[], metavar="PUB",
                        help="public key of the box that built the prebuilt bundles (a fleet key)")
    parser.add_argument("--optimize-arg", action="append", default=[], metavar="ARG",
                        help="passed to `edgescreen optimize` when it runs (repeat; e.g. --optimize-arg=--select=energy)")
    parser.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                        help="install into a staging root (nothing started, no user created)")
    parser.add_argument("--no-start", action="store_true", help="do not start the services")
    parser.add_argument("--service-user", default=None, metavar="NAME", help="the services' user (default edgescreen)")
    parser.add_argument("--skip-selftest", action="store_true", help="do not run the self-test")
    parser.add_argument("--selftest", action="store_true", help="run the self-test even when nothing changed")


def run(args: argparse.Namespace, ctx) -> int:  # noqa: ANN001 - AppContext (unused: provisioning makes the config)
    from edgescreen.appliance.config.load import SERVICE_USER
    from edgescreen.appliance.provisioning import Options, ProvisionError, provision
    from edgescreen.appliance.selftest import SelftestError

    opts = Options(profile=args.provision_profile, site_id=args.site_id, root=args.root, cloud=args.cloud,
                   token_file=args.token_file, scanner_ae=args.scanner_ae, scanner_host=args.scanner_host,
                   pacs=args.pacs, web_host=args.web_host, dicom_port=args.dicom_port, no_start=args.no_start,
                   service_user=args.service_user or SERVICE_USER, bundle=args.bundle, trust_keys=args.trust_key,
                   optimize_args=args.optimize_arg, skip_selftest=args.skip_selftest, force_selftest=args.selftest)
    where = "" if opts.root.resolve() == Path("/") else f" into {opts.root}"
    print(f"provisioning site {opts.site_id} with profile {opts.profile}{where}", flush=True)
    try:
        out = provision(opts, say=lambda msg: print(msg, flush=True))
    except (ProvisionError, SelftestError) as exc:
        print(f"edgescreen provision: {exc}", file=sys.stderr)
        return 2
    if out.admin_password:
        print("\n  First web UI login: user admin, one-time password\n\n"
              f"      {out.admin_password}\n\n"
              "  It is shown only now. Write it down; the UI asks for a new one at first login.\n", flush=True)
    if out.selftest is not None:
        from edgescreen.appliance.cli.selftest import report_lines

        print("\n".join(report_lines(out.selftest)))
        if not out.selftest.passed:
            print("edgescreen provision: the self-test FAILED (differences above); the box is installed but must not "
                  "be used until `edgescreen selftest` passes (see docs/technician-guide.md)", file=sys.stderr)
            return 1
    print("no changes: this box was already provisioned with these options" if not out.changed
          else "provisioning done" + ("" if not where else f"; nothing started in the staging root{where}"))
    return 0

"""`edgescreen bundle verify|install|rollback|list`: manage the signed model bundles on this box.

Verification trusts the public key beside this box's signing key and ``keys/trusted/*.pub`` in the key home
(/etc/edgescreen on a provisioned box, the data dir elsewhere: see appliance.bundle.key_home).
Every failure prints one line naming the bundle and the file, and exits 1: a technician reads that
line on site, nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bundle_action", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check a bundle's signature and every file's sha256")
    verify.add_argument("path", help="bundle directory")
    verify.add_argument("--json", action="store_true", help="print the manifest's model entries as JSON")
    install = sub.add_parser("install", help="verify, copy into the data dir and make current (atomic switch)")
    install.add_argument("path", help="bundle directory")
    install.add_argument("--keep", type=int, default=3, help="installed bundles to keep (default 3)")
    sub.add_parser("rollback", help="make the previous bundle current again")
    listing = sub.add_parser("list", help="installed bundles, current and previous marked")
    listing.add_argument("--json", action="store_true")


def _summary(manifest) -> str:  # noqa: ANN001 - appliance.bundle.Manifest, imported lazily
    from edgescreen.appliance.pipeline.metrics import truncated  # figures truncated, never rounded up

    parts = []
    for role, m in sorted(manifest.models.items()):
        extra = m.model_extra or {}
        speed = f", {truncated(m.speedup, 2)}x vs ORT FP32" if m.speedup else ""
        window = extra.get("window")
        if window:
            speed += (f" per tile; window {'x'.join(map(str, window['patch']))}, {window['batch']} tile(s) per call"
                      + (f", {truncated(extra['volume_speedup'], 2)}x per volume" if extra.get("volume_speedup") else ""))
        parts.append(f"  {role}: {m.backend}/{m.device}/{m.precision}{speed}, gate {'passed' if m.gate.passed else 'FAILED'}")
    return "\n".join(parts)


def run(args: argparse.Namespace, ctx) -> int:  # noqa: ANN001 - AppContext
    from edgescreen.appliance.bundle import BundleError, install_bundle, list_bundles, rollback, verify_bundle

    data_dir, keys = ctx.data_dir, ctx.key_home
    try:
        if args.bundle_action == "verify":
            manifest = verify_bundle(args.path, keys)
            if args.json:
                print(json.dumps({r: m.model_dump(mode="json") for r, m in manifest.models.items()}, indent=2))
            else:
                print(f"bundle {manifest.bundle_id} ({manifest.profile}, {manifest.created_at}): valid, signed by "
                      f"{manifest.signer.fingerprint[:23]}...")
                print(_summary(manifest))
        elif args.bundle_action == "install":
            dest = install_bundle(args.path, data_dir, keep=args.keep, key_home=keys)
            print(f"installed {dest.name}; it is now current")
        elif args.bundle_action == "rollback":
            manifest = rollback(data_dir, key_home=keys)
            print(f"rolled back: {manifest.bundle_id} ({manifest.created_at}) is current again")
        else:
            bundles = list_bundles(data_dir, key_home=keys)
            if args.json:
                print(json.dumps([{**b.__dict__, "path": str(b.path)} for b in bundles], indent=2))
                return 0
            if not bundles:
                print(f"no bundles installed in {data_dir / 'bundles'}")
            for b in bundles:
                mark = "current " if b.current else "previous" if b.previous else "        "
                state = f"INVALID: {b.problem}" if b.problem else f"{b.profile}, {', '.join(b.roles)}"
                print(f"{mark}  {b.bundle_id}  {b.created_at or '-'}  {state}")
    except BundleError as exc:
        print(f"edgescreen bundle {args.bundle_action}: {exc}", file=sys.stderr)
        return 1
    return 0

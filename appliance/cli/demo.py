"""`edgescreen demo`: the whole appliance on one machine, fed with phantom studies over real DICOM.

The demo runs the same services a box runs (DICOM listener, worker, web) as child processes on the
same data directory, then sends the phantoms to the listener by C-STORE, as a scanner would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_CT = ((101, "pdac"), (102, None), (103, "ipmn"))
DEMO_MG = ((201, "malignant"), (202, None))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="web listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="web port (default 8080)")
    parser.add_argument("--dicom-port", type=int, default=11112, help="DICOM listener port (default 11112)")
    parser.add_argument("--slices", type=int, default=120, help="slices per phantom CT (default 120)")
    parser.add_argument("--no-send", action="store_true", help="start the services without sending phantoms")
    parser.add_argument("--exam-s", type=float, default=45.0,
                        help="how long the simulated scanner exam (MPPS) keeps the scanner busy (default 45 s)")
    parser.add_argument("--cloud-port", type=int, help="the demo's fleet receiver port (default: web port + 1)")


def _generate(phantom_dir: Path, slices: int) -> list[Path]:
    from edgescreen.models.phantom.ct import write_ct_study
    from edgescreen.models.phantom.mg import write_mg_exam

    folders = []
    for seed, lesion in DEMO_CT:
        out = phantom_dir / f"ct-{seed}-{lesion or 'normal'}"
        if not (out / "truth.json").exists():
            write_ct_study(out, seed, lesion=lesion, slices=slices)
        folders.append(out)
    for seed, finding in DEMO_MG:
        out = phantom_dir / f"mg-{seed}-{finding or 'normal'}"
        if not (out / "truth.json").exists():
            write_mg_exam(out, seed, finding=finding)
        folders.append(out)
    return folders


DEMO_CONFIG = """# Written by `edgescreen demo`: short waits so a demo shows the whole flow in a minute.
[site]
name = "edgescreen demo"

[dicom]
allow_any_ae = true
stable_after_s = 5

[scheduler]
idle_grace_s = 10
store_quiet_s = 5
"""


# the demo's own fleet receiver on loopback (issue 12): a short link backoff, so findings arrive within
# seconds of the link coming back
DEMO_SYNC = """
[sync]
enabled = true
url = "http://127.0.0.1:{port}"
retry_base_s = 2
retry_max_s = 8
heartbeat_s = 30
interval_s = 2
"""


def run(args: argparse.Namespace, ctx) -> int:
    from edgescreen.appliance.config import load_site_config
    from edgescreen.appliance.demo import run_demo

    if ctx.config_path is None:  # a site config given with --config is used as it is
        path = ctx.data_dir / "demo-site.toml"
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        cloud = args.cloud_port or args.port + 1
        path.write_text(DEMO_CONFIG + DEMO_SYNC.format(port=cloud))
        ctx.config, ctx.config_path = load_site_config(path), path
    ctx.store  # noqa: B018 - create and migrate the store before the services start
    print(f"generating phantom studies in {ctx.data_dir / 'phantoms'} ...", flush=True)
    folders = _generate(ctx.data_dir / "phantoms", args.slices)
    from urllib.parse import urlsplit

    sync_url = urlsplit(ctx.config.sync.url or "") if ctx.config.sync.enabled else None
    # the demo runs the receiver itself only where the config's receiver is on this machine
    cloud_port = sync_url.port if sync_url and sync_url.hostname in ("127.0.0.1", "localhost") else None
    return run_demo(ctx, folders, web=(args.host, args.port), dicom_port=args.dicom_port, send=not args.no_send,
                    cloud_port=cloud_port, exam_s=args.exam_s)

"""`edgescreen config`: validate the site config and profile and show the values in force."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the effective config as JSON")


def run(args: argparse.Namespace, ctx) -> int:
    profile = ctx.profile  # raises ConfigError (exit 2) when invalid
    effective = {"config_file": str(ctx.config_path) if ctx.config_path else None, "data_dir": str(ctx.data_dir),
                 "site": ctx.config.model_dump(mode="json"), "profile": profile.model_dump(mode="json")}
    if args.json:
        print(json.dumps(effective, indent=2))
    else:
        print(f"config: {effective['config_file'] or 'built-in defaults'}")
        print(f"data dir: {ctx.data_dir}")
        print(f"profile: {profile.name} ({profile.description})")
        print("valid")
    return 0

"""The optimiser's command: `edgescreen optimize` (appliance.cli.optimize_cmd) declares the arguments and
calls `run_optimize`, its one entry into this package. Nothing here imports the appliance's CLI, so the
layers only point down (appliance.cli -> optimize -> appliance's runtime, config and cards).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edgescreen.appliance.bundle import ensure_signing_key, install_bundle
from edgescreen.appliance.config import ConfigError, load_profile
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.modelcard import CardError
from edgescreen.appliance.selftest import write_expected_findings
from edgescreen.optimize import report as report_mod
from edgescreen.optimize.candidates import CandidateSpec
from edgescreen.optimize.quantize_ort import METHODS
from edgescreen.optimize.run import Options, cleanup, find_cards, manifest_entry, optimise

log = get_logger(__name__)

DEFAULT_MODELS = Path(__file__).resolve().parents[1] / "models"


def options_from_args(args: argparse.Namespace, profile_name: str, cache_dir: Path) -> Options:
    methods = tuple(m.strip().lower() for m in args.ort_calibration.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--ort-calibration: unknown method(s) {unknown}; use {', '.join(METHODS)}")
    presets = tuple(p.strip().lower() for p in args.ov_preset.split(",") if p.strip())
    if not presets or any(p not in ("performance", "mixed") for p in presets):
        raise ConfigError(f"--ov-preset: {args.ov_preset!r}; use performance, mixed or both in the order to try")
    if args.bench_runs < 10:
        raise ConfigError("--bench-runs must be at least 10 (p95 of fewer runs is noise)")
    try:
        batches = tuple(int(b) for b in str(args.batches).split(",") if b.strip())
    except ValueError as exc:
        raise ConfigError(f"--batches: {args.batches!r} is not a list of integers (e.g. 1,2,4)") from exc
    if not batches or any(b < 1 or b > 16 for b in batches):
        raise ConfigError(f"--batches: {args.batches!r}; each must be 1..16")
    if args.volume_cases < 0:
        raise ConfigError("--volume-cases must be 0 or more")
    return Options(
        profile=load_profile(profile_name), n_calibration=args.calibration_cases, n_heldout=args.heldout_cases,
        bench_runs=args.bench_runs, bench_warmup=args.warmup, select=args.select, ort_methods=methods,
        ov_presets=presets, accuracy_control=not args.no_accuracy_control,
        static_shapes=not args.dynamic_shapes, calibration_dir=Path(args.calibration) if args.calibration else None,
        cache_dir=cache_dir, threads=args.threads, batches=batches, volume_cases=args.volume_cases,
    )


def build_and_sign(card_paths: list[Path], opts: Options, out: Path, key: Path,
                   work_dir: Path | None = None) -> tuple[dict[str, Any], int]:
    """Optimise, then write the signed bundle if every model has a selected candidate.

    Returns (report, exit code): 0 bundle written; 1 some model had no passing candidate (nothing written:
    a bundle missing a model would fail later, at the first study, instead of now).
    """
    outcomes, report, work = optimise(card_paths, opts, work_dir)
    try:
        missing = [m.role for m in outcomes if m.selected is None]
        if missing:
            return report, 1
        from edgescreen.optimize.bundle import write_bundle

        threads = opts.threads or opts.profile.threads.inference
        chosen = {}
        for m in outcomes:
            sel = m.selected
            assert sel is not None and sel.artifact is not None
            chosen[m.role] = {"artifact": sel.artifact, "files": sel.files, "card_path": m.card_path,
                              "card_file": m.card.file, "source": m.card_path.parent / m.card.file,
                              "entry": manifest_entry(m, threads)}
        manifest = write_bundle(out, profile=opts.profile.name, chosen=chosen, report=report,
                                render_md=report_mod.markdown, key_path=key)
        report["bundle_id"] = manifest.bundle_id
        return report, 0
    finally:
        if work_dir is None:
            cleanup(work)


def run_optimize(args: argparse.Namespace, ctx: Any) -> int:
    profile_name = args.optimize_profile or getattr(ctx, "_profile_override", None) or ctx.config.hardware.profile
    data_dir = Path(ctx.data_dir)
    cache = Path(args.cache) if args.cache else data_dir / "cache" / "optimize"
    opts = options_from_args(args, profile_name, cache)
    models_dir = Path(args.models) if args.models else DEFAULT_MODELS
    roles = [r.strip() for r in args.roles.split(",")] if args.roles else None
    cards = find_cards(models_dir, roles)
    if not cards:
        print(f"edgescreen optimize: no model cards{' for ' + args.roles if roles else ''} in {models_dir}",
              file=sys.stderr)
        return 2
    key_home = getattr(ctx, "key_home", data_dir)  # root-owned /etc/edgescreen on a provisioned box
    key = Path(args.key) if args.key else ensure_signing_key(key_home)
    out = Path(args.out)
    print(f"optimising {len(cards)} model(s) for profile {opts.profile.name}: "
          f"{', '.join(p.stem for p in cards)}", file=sys.stderr)
    try:
        report, code = build_and_sign(cards, opts, out, key, Path(args.work) if args.work else None)
    except (CardError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        # a bad card, missing calibration data, an --out that is not a bundle: one line, no traceback
        print(f"edgescreen optimize: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(report_mod.text_table(report))
    if code != 0:
        failed = [m["role"] for m in report["models"] if m["selected"] is None]
        print(f"edgescreen optimize: no candidate passed the gates for {', '.join(failed)}; no bundle written "
              "(see the table above for each candidate's figures)", file=sys.stderr)
        return code
    write_expected_findings(out, key, threads=opts.threads, progress=lambda msg: print(msg, file=sys.stderr))
    print(f"bundle {report['bundle_id']} written to {out} (signed; report in {out / 'report.md'}), "
          f"{report['elapsed_s']:.0f} s")
    if args.install:
        dest = install_bundle(out, data_dir, key_home=key_home)
        print(f"installed as {dest}")
    return 0


def parse_candidates(text: str) -> list[CandidateSpec]:
    """'openvino/CPU/int8,onnxruntime/CPU/fp32' -> specs (for scripts and tests)."""
    specs = []
    for item in text.split(","):
        backend, device, precision = item.strip().split("/")
        specs.append(CandidateSpec(backend, device, precision))
    return specs

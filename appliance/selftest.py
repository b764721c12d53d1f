"""The field self-test: golden phantom cases through the whole path, compared with what the bundle found when built.

Why this shape: a box can hold a perfectly signed bundle and still produce different answers (a library
that changed under it, a CPU without the instruction set the artifact was compiled for, a damaged disk,
a DICOM output writer that broke in an upgrade). So the optimiser, right after it signs a bundle, runs
the golden cases through the analysis with that very bundle and stores the findings beside it as a
separate signed file (`write_expected_findings`; ``selftest/expected.json`` + ``expected.sig``, bound to
the manifest by its sha256). The self-test on the box renders the same cases, sends them over DICOM to a
scratch DICOM service on loopback, lets the real worker analyse them with the active bundle (SEG, SR and
PDF outputs included) and compares: any difference fails loudly with the list of differences.

The scratch appliance has its own data directory (removed afterwards): the self-test never puts phantom
patients in the clinic's worklist and changes nothing in the real data directory but ``selftest.json``,
the record of the last run that `edgescreen doctor` reports.

A pipeline takes part only if the bundle holds every one of its models: otherwise its findings would
depend on models the bundle's signature does not cover.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgescreen.appliance.logs import get_logger

log = get_logger(__name__)

SCHEMA = 1
LAST_RUN = "selftest.json"  # in the data dir: the last self-test's outcome, for doctor
PIPELINE_ROLES = {"pancreas": ("pancreas.stage1", "pancreas.stage2", "pancreas.stage3"), "mammo": ("mammo",)}
# the site's receive settings the scratch listener keeps, so the self-test receives as the service does
RECEIVE_SETTINGS = ("max_pdu", "fsync_dir", "receive_path", "max_associations")
PROBABILITY_TOL = 0.02  # absolute: threads and vector widths move fp32 sums by far less than this
MEASURE_TOL = 0.05  # relative, for volumes (a one-voxel change in a small organ is well under it)
# DICOM SOP classes of the outputs: the kinds must match, whatever the files are called
OUTPUT_KINDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.104.1": "PDF",
}


@dataclass(frozen=True)
class GoldenCase:
    name: str
    pipeline: str
    seed: int
    lesion: str | None = None  # CT lesion class, or the mammography finding
    slices: int | None = None

    def render(self, out_dir: Path) -> Path:
        """Write the case's DICOM files (deterministic in the seed) into out_dir."""
        if self.pipeline == "pancreas":
            from edgescreen.models.phantom.ct import write_ct_study

            write_ct_study(out_dir, self.seed, lesion=self.lesion, slices=self.slices)
        else:
            from edgescreen.models.phantom.mg import write_mg_exam

            write_mg_exam(out_dir, self.seed, finding=self.lesion)
        return out_dir


# Seeds apart from every training, calibration and gate range (optimize.calibration); the smallest CT
# the phantom renders (60 slices is its minimum) keeps a CPU-only box's self-test near a minute.
GOLDEN_CASES = (
    GoldenCase("ct-ipmn", "pancreas", 910_001, "ipmn", 64),
    GoldenCase("mg-malignant", "mammo", 910_002, "malignant"),
)


class SelftestError(RuntimeError):
    """The self-test could not run or could not be trusted; the message says what to do."""


# ------------------------------------------------------------------------------------- expectations


def _manifest_sha(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def _bundle_roles(bundle: Path) -> set[str]:
    return set(json.loads((bundle / "manifest.json").read_text()).get("models", {}))


def summarize(findings: dict[str, Any], out_dir: Path | None = None) -> dict[str, Any]:
    """The part of a findings document that must come out the same on every box running this bundle."""
    summary: dict[str, Any] = {k: findings.get(k) for k in ("pipeline", "triage", "abnormal_probability", "threshold",
                                                           "pancreas_volume_ml", "organs")}
    domain = findings.get("domain")
    if isinstance(domain, dict):
        summary["domain"] = {"in_domain": domain.get("in_domain"), "reasons": domain.get("reasons")}
    summary["lesions"] = [{k: v for k, v in lesion.items() if not isinstance(v, (list, dict)) or k == "probabilities"}
                          for lesion in findings.get("lesions") or []]
    mammo = findings.get("mammo")
    if mammo:
        summary["mammo"] = {
            "breasts": mammo.get("breasts"), "exam_score": mammo.get("exam_score"),
            "images": sorted(({k: img.get(k) for k in ("laterality", "view", "abnormal_probability",
                                                       "malignant_probability")} for img in mammo.get("images", [])),
                             key=lambda i: (str(i["laterality"]), str(i["view"]))),
        }
    if out_dir is not None:
        summary["outputs"] = output_kinds(out_dir, findings.get("outputs") or [])
    return summary


def output_kinds(out_dir: Path, names: list[str]) -> list[str]:
    """The kinds of DICOM output written (SEG, SR, PDF), each read back as DICOM: a file that does not parse
    counts as missing."""
    import pydicom

    kinds = []
    for name in names:
        if not str(name).endswith(".dcm"):  # key images, label maps: not DICOM outputs
            continue
        try:
            ds = pydicom.dcmread(Path(out_dir) / name, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable output is reported, not raised
            kinds.append(f"unreadable {name}: {exc}")
            continue
        uid = str(ds.get("SOPClassUID", ""))
        kinds.append(OUTPUT_KINDS.get(uid, "SR" if ds.get("Modality") == "SR" else f"other:{uid}"))
    return sorted(kinds)


def compare(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Differences between an expected and an actual summary, one readable line each."""
    where = path or "(top)"
    if isinstance(expected, dict) and isinstance(actual, dict):
        diffs = []
        for key in sorted(set(expected) | set(actual)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in actual:
                diffs.append(f"{sub}: expected {json.dumps(expected[key])[:80]}, missing")
            elif key not in expected:
                diffs.append(f"{sub}: unexpected {json.dumps(actual[key])[:80]}")
            else:
                diffs += compare(expected[key], actual[key], sub)
        return diffs
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: expected {len(expected)} item(s) {json.dumps(expected)[:120]}, "
                    f"got {len(actual)} {json.dumps(actual)[:120]}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True)) for d in compare(e, a, f"{path}[{i}]")]
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) and not isinstance(expected, bool) \
            and not isinstance(actual, bool):
        probability = "prob" in path or "score" in path or path.startswith("mammo.breasts") or path == "threshold"
        ok = (abs(expected - actual) <= PROBABILITY_TOL if probability
              else math.isclose(expected, actual, rel_tol=MEASURE_TOL, abs_tol=0.5))
        return [] if ok else [f"{where}: expected {expected:.4g}, got {actual:.4g}"]
    return [] if expected == actual else [f"{where}: expected {json.dumps(expected)}, got {json.dumps(actual)}"]


def _public_keys(key_path: Path) -> list[Any]:
    from edgescreen.appliance.bundle import load_private_key

    return [load_private_key(key_path).public_key()]


def write_expected_findings(bundle_dir: Path | str, key_path: Path | str, *, threads: int | None = None,
                            cases: tuple[GoldenCase, ...] = GOLDEN_CASES,
                            progress: Callable[[str], None] | None = None) -> Path:
    """Run the golden cases with the bundle just built and write its signed expected findings; return the path.

    Called by the optimiser right after it signs a bundle. Pipelines the bundle does not fully hold are
    listed as skipped (a bundle of toy models in a test, or one optimised for CT only).
    """
    from edgescreen.appliance.bundle import EXPECTED_FINDINGS, EXPECTED_SIGNATURE, sign_bytes, verify_bundle
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, AnalysisSettings, analyze_study
    from edgescreen.appliance.store.files import atomic_write

    bundle = Path(bundle_dir)
    manifest = verify_bundle(bundle, _public_keys(Path(key_path)))
    roles = set(manifest.models)
    entries, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="edgescreen-golden-") as tmp:
        for case in cases:
            missing = [r for r in PIPELINE_ROLES[case.pipeline] if r not in roles]
            if missing:
                skipped.append({"case": case.name, "reason": f"the bundle holds no {', '.join(missing)}"})
                continue
            if progress:
                progress(f"golden case {case.name}: rendering and analysing with bundle {manifest.bundle_id}")
            entry: dict[str, Any] = {"name": case.name, "pipeline": case.pipeline, "seed": case.seed,
                                     "lesion": case.lesion, "slices": case.slices}
            try:
                src = case.render(Path(tmp) / case.name)
                out = Path(tmp) / f"{case.name}-out"
                findings = analyze_study(AnalysisRequest(
                    [src], out, bundle_dir=bundle, trusted_keys=_public_keys(Path(key_path)),
                    settings=AnalysisSettings(threads=threads, require_dicom_outputs=True)))
                entry["expected"] = summarize(findings, out)
                entry["inputs_sha256"] = inputs_digest(src)
            except Exception as exc:  # noqa: BLE001 - recorded: the self-test on the box then fails loudly
                log.error("golden case failed with the new bundle", case=case.name, error=f"{type(exc).__name__}: {exc}")
                entry["build_error"] = f"{type(exc).__name__}: {exc}"
            entries.append(entry)
    document = {"schema": SCHEMA, "bundle_id": manifest.bundle_id, "manifest_sha256": _manifest_sha(bundle),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tolerance": {"probability_abs": PROBABILITY_TOL, "measure_rel": MEASURE_TOL},
                "cases": entries, "skipped": skipped}
    data = (json.dumps(document, indent=2, default=str) + "\n").encode()
    atomic_write(bundle / EXPECTED_FINDINGS, data)
    atomic_write(bundle / EXPECTED_SIGNATURE, (json.dumps(sign_bytes(Path(key_path), data), indent=2) + "\n").encode())
    log.info("expected findings written", bundle=manifest.bundle_id, cases=len(entries), skipped=len(skipped))
    return bundle / EXPECTED_FINDINGS


def load_expected(bundle_dir: Path | str, trusted_keys: Any) -> dict[str, Any]:
    """The bundle's expected findings, after checking their signature and that they belong to this manifest."""
    import base64

    from cryptography.exceptions import InvalidSignature

    from edgescreen.appliance.bundle import (
        EXPECTED_FINDINGS,
        EXPECTED_SIGNATURE,
        fingerprint,
        load_trusted_keys,
    )

    bundle = Path(bundle_dir)
    keys = load_trusted_keys(trusted_keys) if isinstance(trusted_keys, (str, Path)) else list(trusted_keys)
    try:
        data = (bundle / EXPECTED_FINDINGS).read_bytes()
        sig = json.loads((bundle / EXPECTED_SIGNATURE).read_text())
    except FileNotFoundError:
        raise SelftestError(f"bundle {bundle.name} has no expected findings ({EXPECTED_FINDINGS}): it was built "
                            "by an optimiser older than the self-test; rebuild it (edgescreen optimize) or "
                            "re-provision") from None
    except (OSError, ValueError) as exc:
        raise SelftestError(f"bundle {bundle.name}: {EXPECTED_SIGNATURE}: unreadable ({exc}); rebuild the bundle") from None
    by_fp = {fingerprint(k): k for k in keys}
    key = by_fp.get(str(sig.get("key_fingerprint")))
    if key is None:
        raise SelftestError(f"bundle {bundle.name}: expected findings signed by a key this box does not trust")
    try:
        key.verify(base64.b64decode(sig["signature"]), data)
    except (InvalidSignature, KeyError, ValueError):
        raise SelftestError(f"bundle {bundle.name}: {EXPECTED_FINDINGS}: signature does not match; the expected "
                            "findings were modified after signing; rebuild the bundle") from None
    document = json.loads(data)
    if document.get("manifest_sha256") != _manifest_sha(bundle):
        raise SelftestError(f"bundle {bundle.name}: expected findings belong to another bundle "
                            f"({document.get('bundle_id')}); rebuild the bundle")
    return document


# --------------------------------------------------------------------------------------------- running


@dataclass
class CaseResult:
    name: str
    pipeline: str
    triage: str | None = None
    expected_triage: str | None = None
    seconds: float = 0.0
    differences: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.differences


@dataclass
class SelftestResult:
    bundle_id: str | None
    cases: list[CaseResult] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    finished_at: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.cases) and all(c.passed for c in self.cases)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "bundle_id": self.bundle_id, "error": self.error,
                "seconds": round(self.seconds, 1), "finished_at": self.finished_at, "skipped": self.skipped,
                "cases": [{"name": c.name, "pipeline": c.pipeline, "passed": c.passed, "triage": c.triage,
                           "expected_triage": c.expected_triage, "seconds": round(c.seconds, 1),
                           "differences": c.differences} for c in self.cases]}


def active_bundle(ctx: Any) -> Path | None:
    """The bundle the worker would use: the site config's, else the installed current one."""
    from edgescreen.appliance.bundle import current_bundle

    if ctx.config.hardware.bundle:
        return Path(ctx.config.hardware.bundle)
    return current_bundle(ctx.data_dir)


def _scratch_context(ctx: Any, scratch: Path, bundle: Path) -> Any:
    """A throwaway appliance: DICOM on loopback only, no waiting for a quiet scanner, the real profile and bundle."""
    from edgescreen.appliance.config.site import SiteConfig
    from edgescreen.appliance.context import AppContext

    config = SiteConfig.model_validate({
        "site": {"name": "edgescreen self-test"},
        "data_dir": str(scratch / "data"),
        "dicom": {**{k: v for k, v in ctx.config.dicom.model_dump().items() if k in RECEIVE_SETTINGS},
                  "ae_title": "EDGESCREEN", "bind": "127.0.0.1", "port": 1, "allow_any_ae": True,
                  "stable_after_s": 1.0, "min_free_mb": 0},
        "scheduler": {"idle_grace_s": 0, "store_quiet_s": 0, "failsafe": "idle"},
        "hardware": {"profile": ctx._profile_override or ctx.config.hardware.profile, "bundle": str(bundle)},
    })
    return AppContext(config=config, data_dir=scratch / "data", key_dir=ctx.key_home)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _receive(sctx: Any, folders: list[Path], timeout_s: float) -> None:
    """Run the real DICOM service on loopback, send the folders as a scanner would, wait for their jobs."""
    from edgescreen.appliance.demo import send_folders
    from edgescreen.appliance.dicom.scp import DicomService

    dicom = sctx.config.dicom.model_copy(update={"port": _free_port()})
    service = DicomService(sctx.store, sctx.config.model_copy(update={"dicom": dicom}))
    service.start()
    try:
        host, port = service.address
        sent = send_folders(folders, host, port, dicom.ae_title)
        if sent == 0:
            raise SelftestError("the scratch DICOM service accepted no image over loopback")
        deadline = time.monotonic() + timeout_s
        while sctx.store.query_one("SELECT COUNT(DISTINCT study_uid) FROM jobs")[0] < len(folders):
            if time.monotonic() > deadline:
                raise SelftestError(f"DICOM receive: {len(folders)} studies sent, only "
                                    f"{sctx.store.query_one('SELECT COUNT(*) FROM jobs')[0]} queued after "
                                    f"{timeout_s:.0f} s")
            time.sleep(0.2)
    finally:
        service.stop(grace_s=2.0)


def _analyse(sctx: Any, timeout_s: float) -> None:
    """The real worker loop until the queue is empty; the scanner switch says idle and every job is run-now
    (a technician's explicit test, as the staff's run-now override: grace periods and battery thresholds
    do not hold it back)."""
    from edgescreen.appliance.scheduler.scanner import set_manual
    from edgescreen.appliance.scheduler.worker import Worker
    from edgescreen.appliance.store import jobs

    set_manual(sctx.store, "idle", actor="selftest")
    for row in sctx.store.query("SELECT id FROM jobs WHERE state = 'queued'"):
        jobs.set_flag(sctx.store, row["id"], "run_now", actor="selftest")
    worker = Worker(sctx, poll_s=0.2, once=True)
    thread = threading.Thread(target=worker.run_forever, name="selftest-worker", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        worker.stop.set()
        thread.join(60)
        raise SelftestError(f"analysis did not finish within {timeout_s:.0f} s")


def inputs_digest(folder: Path) -> str:
    """sha256 over the case's pixel data, file by file: tells "the phantom generator changed" (an upgrade since
    the bundle was built) apart from "this box computes differently"."""
    import pydicom

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix == ".dcm"):
        digest.update(bytes(pydicom.dcmread(path).PixelData))
    return digest.hexdigest()


def _study_uid(folder: Path) -> str:
    import pydicom

    first = next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm")
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def run_selftest(ctx: Any, *, bundle: Path | None = None, keep: Path | None = None,
                 progress: Callable[[str], None] | None = None, timeout_s: float = 1800.0) -> SelftestResult:
    """Run every golden case the bundle has expectations for; never raises for a failed case."""
    from edgescreen.appliance.bundle import BundleError, verify_bundle

    say = progress or (lambda _msg: None)
    started = time.monotonic()
    result = SelftestResult(bundle_id=None)
    scratch = Path(tempfile.mkdtemp(prefix="edgescreen-selftest-"))
    try:
        bundle = bundle or active_bundle(ctx)
        if bundle is None:
            raise SelftestError("no model bundle is active: install one (edgescreen bundle install DIR) or run "
                                "edgescreen provision")
        try:
            manifest = verify_bundle(bundle, ctx.key_home)
        except BundleError as exc:
            raise SelftestError(str(exc)) from None
        result.bundle_id = manifest.bundle_id
        expected = load_expected(bundle, ctx.key_home)
        result.skipped = list(expected.get("skipped", []))
        cases = [GoldenCase(c["name"], c["pipeline"], int(c["seed"]), c.get("lesion"), c.get("slices"))
                 for c in expected["cases"]]
        if not cases:
            raise SelftestError(f"bundle {manifest.bundle_id} has no golden case to compare (it holds no complete "
                                "pipeline: " + "; ".join(s["reason"] for s in result.skipped) + ")")
        sctx = _scratch_context(ctx, scratch, bundle)
        folders = []
        for case in cases:
            say(f"rendering golden case {case.name} (seed {case.seed})")
            folders.append(case.render(scratch / "cases" / case.name))
        say(f"sending {len(cases)} studies over DICOM to a scratch listener on loopback")
        _receive(sctx, folders, timeout_s=120.0)
        say(f"analysing with bundle {manifest.bundle_id} (the worker, as in service)")
        t0 = time.monotonic()
        _analyse(sctx, timeout_s)
        elapsed = time.monotonic() - t0
        by_study = {}
        for row in sctx.store.query("SELECT j.study_uid, j.state, j.error, r.findings, r.output_dir, j.started_at, "
                                    "j.finished_at FROM jobs j LEFT JOIN results r ON r.job_id = j.id"):
            by_study[row["study_uid"]] = dict(row)
        for case, folder, entry in zip(cases, folders, expected["cases"], strict=True):
            res = CaseResult(case.name, case.pipeline, expected_triage=(entry.get("expected") or {}).get("triage"))
            row = by_study.get(_study_uid(folder))
            if "build_error" in entry:
                res.differences.append(f"the bundle already failed this case when it was built ({entry['build_error']}); "
                                       "rebuild the bundle")
            elif row is None or row["findings"] is None:
                state = "not received" if row is None else f"{row['state']}: {row['error'] or 'no result'}"
                res.differences.append(f"no result ({state})")
            else:
                findings = json.loads(row["findings"])
                res.triage = findings.get("triage")
                res.seconds = (row["finished_at"] or 0) - (row["started_at"] or 0) if row["started_at"] else elapsed
                res.differences = compare(entry["expected"], summarize(findings, Path(row["output_dir"])))
                if res.differences and entry.get("inputs_sha256") not in (None, inputs_digest(folder)):
                    res.differences.insert(0, "the golden case's images differ from those the bundle was built with "
                                              "(the phantom generator changed in an upgrade): rebuild the bundle "
                                              "(sudo edgescreen provision ...) before trusting this comparison")
            result.cases.append(res)
    except SelftestError as exc:
        result.error = str(exc)
    except Exception as exc:  # a self-test reports every failure as its result, never as a traceback
        log.exception("self-test failed")
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.monotonic() - started
        result.finished_at = time.time()
        if keep is not None:
            shutil.copytree(scratch, keep, dirs_exist_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def record(data_dir: Path, result: SelftestResult) -> Path:
    """Keep the outcome for `edgescreen doctor` (the only file the self-test writes in the data dir)."""
    from edgescreen.appliance.store.files import atomic_write_text

    return atomic_write_text(Path(data_dir) / LAST_RUN, json.dumps(result.as_dict(), indent=2) + "\n")


def last_run(data_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(data_dir) / LAST_RUN).read_text())
    except (OSError, ValueError):
        return None

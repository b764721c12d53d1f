"""Analyse one study: pick the pipeline, run it, gate it, write findings, key images, labels and DICOM outputs.

`analyze_study(AnalysisRequest(...))` is the one entry the CLI, the worker, the self-test, the
evaluation and the tests share. The request holds the study's files, folders or zips, where to write,
the models (a models directory or a bundle), the settings (backend, threads, the operating point chosen
by name), a progress callback, and, for the worker, the gate and a checkpoint directory: when the gate
says stop at a safe point the finished stages stay saved and `Preempted` propagates; the same request
again resumes. Which series a pipeline accepts is decided by appliance.pipeline.accepts; the validated-
domain gate (appliance.pipeline.domain) runs before any triage, so a study outside the models' domain
reads `indeterminate` with its reasons and never `not_suspicious`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.pipeline import accepts
from edgescreen.appliance.pipeline.checkpoint import Gate, Preempted, check_gate, remove_states
from edgescreen.appliance.pipeline.findings import validate_findings, write_findings

log = get_logger("edgescreen.appliance.pipeline.analyze")

__all__ = ["AnalysisRequest", "AnalysisSettings", "InputError", "Preempted", "analyze_study", "default_models_dir"]

Progress = Callable[[str, float], None]
_HEADER_TAGS = ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "Rows", "PixelData",
                *accepts.HEADER_TAGS]
_MAX_ZIP_BYTES = 8 << 30
_MODEL_CACHE: dict[tuple, Any] = {}


class InputError(ValueError):
    """The input cannot be analysed (no image series, mixed studies, wrong modality): exit 2 with this reason."""


@dataclass(frozen=True)
class AnalysisSettings:
    """How to run: not what to analyse. `operating_points` maps a pipeline ("pancreas", "mammo") to the name
    of one of its card's operating points (the site's [triage] choice); `threshold` is a hand-set override
    for research runs that beats it; `operating_point_source` says who named it ("site" or "override")."""

    backend: str = "onnxruntime"
    threads: int | None = None
    batch_size: int = 1
    operating_points: dict[str, str | None] = field(default_factory=dict)
    operating_point_source: str = "site"
    threshold: float | None = None
    require_dicom_outputs: bool = False
    load_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_triage(cls, triage: Any, **kwargs: Any) -> AnalysisSettings:
        """Settings with the operating points the site config's [triage] section names."""
        return cls(operating_points={"pancreas": getattr(triage, "pancreas_operating_point", None),
                                     "mammo": getattr(triage, "mammo_operating_point", None)}, **kwargs)


@dataclass(frozen=True)
class AnalysisRequest:
    """One analysis: the study, where its results go, which models, and the worker's gate and checkpoint."""

    paths: list[Path]
    out_dir: Path
    models_dir: Path | None = None
    bundle_dir: Path | None = None
    trusted_keys: Any = None  # a data dir or Ed25519 public keys: verify the bundle's signature first
    settings: AnalysisSettings = field(default_factory=AnalysisSettings)
    progress: Progress | None = None
    gate: Gate | None = None
    checkpoint_dir: Path | None = None


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass
class SeriesInfo:
    uid: str
    study_uid: str
    modality: str
    sop_class: str
    description: str
    files: list[Path] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list, repr=False)
    images: int = 0

    def describe(self) -> str:
        from pydicom.uid import UID

        name = UID(self.sop_class).name if self.sop_class else "unknown SOP class"
        what = f"{self.images} image(s)" if self.images else "no pixel data"
        return f"{self.modality or '?'} series {self.uid or '?'} ({name}, {len(self.files)} file(s), {what})"


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip refusing absolute paths, '..' and zip bombs (the input may come from anywhere)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            total = 0
            for info in zf.infolist():
                target = (dest / info.filename).resolve()
                if not str(target).startswith(str(dest.resolve())):
                    raise InputError(f"{archive}: member {info.filename!r} would extract outside the target")
                total += info.file_size
                if total > _MAX_ZIP_BYTES:
                    raise InputError(f"{archive}: expands to more than {_MAX_ZIP_BYTES >> 30} GiB")
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{archive}: not a readable zip file ({exc})") from exc


@contextmanager
def expanded_inputs(paths: list[Path]):
    """Every file under the given files, folders and zips (zips extracted to a temp dir, removed after)."""
    tmp: Path | None = None
    files: list[Path] = []
    try:
        for path in map(Path, paths):
            if path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.is_file())
            elif path.is_file() and zipfile.is_zipfile(path):
                tmp = tmp or Path(tempfile.mkdtemp(prefix="edgescreen-zip-"))
                dest = tmp / f"{len(list(tmp.iterdir()))}"
                dest.mkdir()
                _safe_extract(path, dest)
                files += sorted(p for p in dest.rglob("*") if p.is_file())
            elif path.is_file():
                files.append(path)
            else:
                raise InputError(f"{path}: no such file or directory")
        yield files
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _read_brief(path: Path) -> Any | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=False, specific_tags=_HEADER_TAGS, defer_size=256)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def group_series(files: list[Path]) -> tuple[dict[str, SeriesInfo], list[Path]]:
    """DICOM files grouped by SeriesInstanceUID, and the files that are not DICOM."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        headers = list(pool.map(_read_brief, files))
    series: dict[str, SeriesInfo] = {}
    skipped: list[Path] = []
    for path, ds in zip(files, headers, strict=True):
        if ds is None or "SOPClassUID" not in ds:
            skipped.append(path)
            continue
        try:
            _add_to_series(series, path, ds)
        except (ValueError, TypeError, AttributeError, KeyError):  # malformed values (an IS of '1A', ...)
            skipped.append(path)
    return series, skipped


def _add_to_series(series: dict[str, SeriesInfo], path: Path, ds: Any) -> None:
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    info = SeriesInfo(uid, str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("Modality", "") or ""),
                      str(ds.SOPClassUID), str(ds.get("SeriesDescription", "") or ""))
    images = int(ds.get("NumberOfFrames", 1) or 1) if "PixelData" in ds else 0
    info = series.setdefault(uid, info)
    info.files.append(path)
    info.headers.append(ds)
    info.images += images


def choose_pipeline(series: dict[str, SeriesInfo], skipped: list[Path]) -> tuple[str, list[SeriesInfo], list[str]]:
    """("pancreas" | "mammo", the series to analyse, warnings); InputError when nothing fits.

    Each series is judged by appliance.pipeline.accepts, the same rules series assembly applies."""
    if not series:
        example = f" (e.g. {skipped[0].name})" if skipped else ""
        raise InputError(f"no DICOM files in the input: {len(skipped)} file(s) that are not DICOM{example}")
    decisions = {uid: accepts.decide(accepts.series_facts(info.headers)) for uid, info in series.items()}
    chosen = [info for uid, info in series.items() if decisions[uid].pipeline]
    if not chosen:
        imaging = [s for s in series.values() if s.modality in ("CT", "MG") and s.images]
        if not imaging:
            found = "; ".join(s.describe() for s in list(series.values())[:3])
            raise InputError(f"no CT or MG image series to analyse: found {found}. Only CT (pancreas) and MG "
                             "(mammography) images can be analysed")
        raise InputError("no series the pipelines accept: " + "; ".join(
            f"{s.describe()}: {decisions[s.uid].reason}" for s in imaging[:3]))
    studies = sorted({s.study_uid for s in chosen})
    if len(studies) > 1:
        raise InputError(f"input holds {len(studies)} studies ({', '.join(studies[:3])}); analyse one study at a time")
    pipelines = {decisions[s.uid].pipeline for s in chosen}
    if len(pipelines) > 1:
        raise InputError("input mixes CT and MG images; analyse the CT and the mammography exam separately")
    warnings = []
    if skipped:
        warnings.append(f"ignored {len(skipped)} file(s) that are not DICOM")
    others = [s for s in series.values() if not decisions[s.uid].pipeline]
    if others:
        warnings.append(f"ignored {len(others)} series: " + "; ".join(
            f"{s.describe()}: {decisions[s.uid].reason}" for s in others[:3]))
    pipeline = pipelines.pop()
    if pipeline == "mammo":
        return "mammo", chosen, warnings
    ranked = sorted(chosen, key=lambda s: s.images, reverse=True)
    if len(ranked) > 1:
        warnings.append(f"input holds {len(ranked)} CT series; analysed the largest ({ranked[0].images} images, "
                        f"{ranked[0].description or ranked[0].uid}), ignored the others")
    return "pancreas", ranked[:1], warnings


# ----------------------------------------------------------------------------------------------
# models


def default_models_dir() -> Path:
    """models/ beside appliance/, in the checkout and in site-packages alike."""
    return Path(__file__).resolve().parents[2] / "models"


@dataclass(frozen=True)
class ModelChoice:
    role: str
    card: Path
    artifact: Path | None  # None: the ONNX file the card names
    backend: str
    precision: str
    device: str
    threads: int | None = None  # the bundle's measured best thread count, when it names one
    window: tuple[tuple[int, ...], float, int] | None = None  # a tiled model's (patch, overlap, tiles per call)
    fallbacks: tuple[tuple[str, str, str], ...] = ()  # the bundle's hardware profile: (backend, device, precision)


def read_bundle(bundle_dir: Path, trusted_keys: Any = None) -> tuple[str | None, dict[str, dict[str, Any]], list[str]]:
    """(bundle id, role -> manifest entry, warnings). With trusted keys (a data dir or key list) the
    bundle's signature and every checksum are verified first (appliance.bundle); without, the manifest
    is read as is and the findings say so."""
    if not bundle_dir.is_dir():
        raise InputError(f"bundle {bundle_dir} does not exist or is not a directory")
    if trusted_keys is not None:
        from edgescreen.appliance.bundle import BundleError, verify_bundle

        try:
            manifest = verify_bundle(bundle_dir, trusted_keys)
        except BundleError as exc:
            raise InputError(str(exc)) from exc
        return manifest.bundle_id, {r: m.model_dump() for r, m in manifest.models.items()}, []
    manifest_path = bundle_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"bundle {bundle_dir} has no manifest.json") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{manifest_path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    roles = manifest.get("models", manifest.get("roles", {}))
    if isinstance(roles, list):
        roles = {entry["role"]: entry for entry in roles if isinstance(entry, dict) and "role" in entry}
    if not isinstance(roles, dict):
        raise InputError(f"{manifest_path}: 'models' must map a role to its artifact")
    bundle_id = manifest.get("bundle_id", manifest.get("id"))
    warning = f"bundle {bundle_id or bundle_dir.name}: signature not verified (no trusted keys given)"
    return (str(bundle_id) if bundle_id is not None else None), roles, [warning]


def resolve_models(roles: tuple[str, ...], models_dir: Path, bundle_dir: Path | None, backend: str,
                   trusted_keys: Any = None) -> tuple[dict[str, ModelChoice], str | None, list[str]]:
    """Per role: the bundle's artifact, card, backend and precision where it names them, else models_dir."""
    from edgescreen.appliance.runtime.select import profile_candidates

    bundle_id, entries, warnings = (None, {}, [])
    fallbacks: tuple[tuple[str, str, str], ...] = ()
    if bundle_dir is not None:
        bundle_id, entries, warnings = read_bundle(Path(bundle_dir), trusted_keys)
        try:  # the profile the bundle was built for orders the run-time fallbacks (appliance.runtime.select)
            profile = json.loads((Path(bundle_dir) / "manifest.json").read_text()).get("profile")
        except (OSError, ValueError):
            profile = None
        fallbacks = tuple((c["backend"], c["device"], c["precision"]) for c in profile_candidates(profile))
    choices = {}
    for role in roles:
        entry = entries.get(role) or {}
        card = Path(bundle_dir) / entry["card"] if bundle_dir and entry.get("card") else models_dir / f"{role}.json"
        artifact = Path(bundle_dir) / entry["artifact"] if bundle_dir and entry.get("artifact") else None
        win = entry.get("window") if isinstance(entry.get("window"), dict) else None
        choices[role] = ModelChoice(role, card, artifact, str(entry.get("backend") or backend),
                                    str(entry.get("precision") or "fp32"), str(entry.get("device") or "CPU"),
                                    entry.get("threads"),
                                    (tuple(win["patch"]), float(win["overlap"]), int(win.get("batch") or 1)) if win else None,
                                    fallbacks)
    return choices, bundle_id, warnings


def load_models(choices: dict[str, ModelChoice], threads: int | None, batch_size: int) -> dict[str, Any]:
    """Stage models, cached across studies (the worker analyses many; loading a session costs seconds)."""
    from edgescreen.appliance.pipeline.pancreas import load_stage_model

    models = {}
    for role, c in choices.items():
        artifact = c.artifact or c.card
        stamp = tuple(p.stat().st_mtime if p.exists() else 0.0 for p in (c.card, artifact))
        key = (c, stamp, threads, batch_size)
        if key not in _MODEL_CACHE:
            window = {"patch": c.window[0], "overlap": c.window[1], "batch": c.window[2]} if c.window else None
            _MODEL_CACHE[key] = load_stage_model(
                role, c.card, artifact=c.artifact, backend=c.backend, precision=c.precision, device=c.device,
                threads=threads or c.threads, batch_size=batch_size, window=window,
                profile_candidates=[{"backend": b, "device": d, "precision": p} for b, d, p in c.fallbacks])
        models[role] = _MODEL_CACHE[key]
    return models


def fallback_warnings(models: Any) -> list[str]:
    """One line per model that does not run as the bundle asked (its backend refused at load time)."""
    lines = []
    for m in models:
        if m.refused:
            first = m.refused[0]
            lines.append(f"{m.role}: running on {m.backend}/{m.device}/{m.precision} because the bundle's "
                         f"{first['backend']}/{first['device']}/{first['precision']} could not be loaded "
                         f"({first['reason'][:160]}); the reference model runs instead, slower than the bundle's")
    return lines


# ----------------------------------------------------------------------------------------------
# outputs


def _dicom_outputs(findings: dict[str, Any], datasets: list, masks: dict[str, np.ndarray], out_dir: Path,
                   warnings: list[str], required: bool) -> list[Path]:
    """DICOM SEG / SR / PDF; a failure is a warning (the findings stand) unless outputs are required."""
    from edgescreen.appliance.pipeline.outputs import write_dicom_outputs

    try:
        return [Path(p) for p in write_dicom_outputs(findings, datasets, masks, out_dir)]
    except Exception as exc:  # an output writer bug must not lose the findings themselves
        if required:
            raise
        log.exception("dicom outputs failed", study=findings.get("study_uid"))
        warnings.append(f"DICOM SEG/SR/PDF not written: {type(exc).__name__}: {exc}")
        return []


def _relative(paths: list[Path], out_dir: Path) -> list[str]:
    out = []
    for p in paths:
        try:
            out.append(str(Path(p).resolve().relative_to(out_dir.resolve())))
        except ValueError:
            out.append(str(p))
    return out


def _lesion_caption(lesion: dict[str, Any]) -> str:
    subtype = (f"{lesion['top_subtype'].upper()} {lesion['top_subtype_probability']:.2f}"
               if lesion.get("top_subtype") else "subtype n/a")
    return (f"{lesion['id']}: pancreatic {lesion['location']}, {lesion['longest_diameter_mm']:.1f} mm, "
            f"{lesion['volume_ml']:.2f} mL, p(abnormal) {lesion['abnormal_probability']:.2f}, {subtype}")


def _ct_key_images(result: Any, masks: dict[str, np.ndarray], findings: dict[str, Any], out_dir: Path) -> list[Path]:
    from edgescreen.appliance.pipeline.keyimages import ct_key_image
    from edgescreen.appliance.pipeline.preprocess import bbox_centre

    hu = result.ct.hu
    spacing_yx = result.ct.grid.spacing[1:]
    lesion_keys = [k for k in masks if k.startswith("lesion_")]

    def lesions_at(z: int) -> np.ndarray | None:  # one slice at a time: a union of whole masks costs 78 MB each
        return np.logical_or.reduce([masks[k][z] for k in lesion_keys]) if lesion_keys else None

    pancreas = masks.get("pancreas")
    centre = bbox_centre(pancreas) if pancreas is not None else None  # None: empty on the full-resolution grid
    written = []
    triage = findings["triage"].replace("_", " ")
    if centre is not None:
        z = centre[0]
        score = findings["abnormal_probability"]
        caption = (f"Pancreas ({findings['pancreas_volume_ml']:.1f} mL): {triage}"
                   + (f", score {score:.2f} (threshold {findings['threshold']:.2f})" if score is not None else "")
                   + ("" if findings["domain"]["in_domain"] else " - outside the validated domain"))
        written.append(ct_key_image(hu[z], spacing_yx, pancreas[z], lesions_at(z), caption,
                                    out_dir / "key_pancreas.png"))
    else:  # nothing found is a result too: show the middle slice with the reason and the triage as it stands
        z = hu.shape[0] // 2
        what = "No pancreas found by stage 1" if pancreas is None else "Pancreas too small to show on the source slices"
        written.append(ct_key_image(hu[z], spacing_yx, None, None, f"{what}: result {triage}",
                                    out_dir / "key_pancreas.png"))
    for lesion in findings["lesions"]:
        mask = masks.get(lesion["id"])
        lesion_centre = bbox_centre(mask) if mask is not None else None
        if lesion_centre is None:
            continue
        z = lesion_centre[0]
        path = ct_key_image(hu[z], spacing_yx, None if pancreas is None else pancreas[z], mask[z],
                            _lesion_caption(lesion), out_dir / f"key_{lesion['id']}.png")
        lesion["key_image"] = path.name
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# pipelines


@dataclass
class _Run:
    """Per-call state: the request, what to tell, how long each step took."""

    request: AnalysisRequest
    models_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return Path(self.request.out_dir)

    @property
    def gate(self) -> Gate | None:
        return self.request.gate

    @property
    def settings(self) -> AnalysisSettings:
        return self.request.settings

    def report(self, stage: str, fraction: float) -> None:
        if self.request.progress is not None:
            self.request.progress(stage, fraction)

    @contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def resolve(self, roles: tuple[str, ...]) -> tuple[dict[str, ModelChoice], str | None]:
        req = self.request
        choices, bundle_id, warnings = resolve_models(roles, self.models_dir, Path(req.bundle_dir) if req.bundle_dir else None,
                                                      self.settings.backend, req.trusted_keys)
        self.warnings += warnings
        return choices, bundle_id

    def operating_point(self, pipeline: str, card: Any) -> dict[str, Any]:
        from edgescreen.appliance.pipeline.operating_point import resolve

        s = self.settings
        return resolve(card, name=s.operating_points.get(pipeline), name_source=s.operating_point_source,
                       threshold=s.threshold)


def _run_pancreas(run: _Run, series: SeriesInfo) -> dict[str, Any]:
    from edgescreen.appliance.pipeline.domain.gate import assess_ct
    from edgescreen.appliance.pipeline.outputs.labels import FILE_NAME, write_labels
    from edgescreen.appliance.pipeline.pancreas import (
        ROLES,
        CascadeSettings,
        canonical_masks,
        load_canonical,
        run_cascade,
    )

    settings = run.settings
    check_gate(run.gate, "pancreas.load")
    with run.timed("load"):
        ct = load_canonical(series.files, progress=run.request.progress, **settings.load_args)
    with run.timed("models"):
        choices, bundle_id = run.resolve(ROLES)
        models = load_models(choices, settings.threads, settings.batch_size)
        run.warnings += fallback_warnings(models.values())
        cards = {r: models[r].card for r in ROLES}
        op = run.operating_point("pancreas", cards["pancreas.stage2"])
    result = run_cascade(ct, models, settings=CascadeSettings(threshold=op["threshold"]),
                         checkpoint_dir=run.request.checkpoint_dir, gate=run.gate, progress=run.request.progress)
    run.timings.update(result.timings)
    with run.timed("domain"):
        domain = assess_ct(cards, ct, result.stage1, result.stage2)
        result.in_domain = domain.in_domain
    check_gate(run.gate, "pancreas.outputs")
    with run.timed("outputs"):
        findings = {
            "pipeline": "pancreas", "triage": result.triage, "abnormal_probability": result.stage2.abnormal_probability,
            "threshold": result.threshold, **result.measurements, "timings_s": {}, "domain": domain.to_json(),
            "operating_point": op, "models": [models[r].ref() for r in ROLES], "bundle": bundle_id,
            "study_uid": ct.volume.study_uid, "series_uid": ct.volume.series_uid,
            "warnings": run.warnings + result.warnings,
        }
        masks = canonical_masks(result)
        key_images = _ct_key_images(result, masks, findings, run.out_dir)
        findings["key_images"] = _relative(key_images, run.out_dir)
        source_masks = {name: ct.to_source(mask) for name, mask in masks.items()}
        del masks
        write_labels(run.out_dir / FILE_NAME, source_grid=ct.source_grid, slice_uids=ct.slice_uids,
                     organs=result.stage1.labels, organs_grid=result.stage1.grid, organ_classes=result.stage1.classes,
                     source_masks=source_masks)
        outputs = _dicom_outputs(validate_findings({**findings, "timings_s": dict(run.timings)}), ct.volume.datasets,
                                 source_masks, run.out_dir, findings["warnings"], settings.require_dicom_outputs)
        findings["outputs"] = _relative([run.out_dir / FILE_NAME, *outputs], run.out_dir)
    if run.request.checkpoint_dir is not None:
        remove_states(run.request.checkpoint_dir)  # findings exist now: a rerun of the job starts clean
    return findings


def _run_mammo(run: _Run, series: list[SeriesInfo]) -> dict[str, Any]:
    from edgescreen.appliance.modelcard import Percentile
    from edgescreen.appliance.pipeline import mammo
    from edgescreen.appliance.pipeline.domain.gate import assess_mg
    from edgescreen.appliance.pipeline.keyimages import mammo_heatmap_overlay, mammo_key_image

    settings = run.settings
    files = [f for s in series for f in s.files]
    choices, bundle_id = run.resolve(("mammo",))
    role_choice = choices["mammo"]
    check_gate(run.gate, "mammo.inference")
    with run.timed("models"):  # cached across exams like the CT stages; the same run-time fallback
        model = load_models(choices, settings.threads, 1)["mammo"]
        run.warnings += fallback_warnings([model])
        card, session = model.card, model.session
        op = run.operating_point("mammo", card)
    run.report("mammo", 0.0)
    with run.timed("mammo"):
        try:
            result = mammo.analyze_mammo_images(files, card_path=role_choice.card, session=session,
                                                threshold=op["threshold"])
        except mammo.MammoInputError as exc:
            raise InputError(str(exc)) from exc
    run.report("mammo", 1.0)
    headers = _headers(files)
    check_gate(run.gate, "mammo.outputs")
    with run.timed("outputs"):
        images, keys, gate_inputs = [], [], []
        norm = card.preprocessing.normalization
        for i, (img, header) in enumerate(zip(result.images, headers, strict=True)):
            caption = (f"{img.laterality} {img.view}: p(abnormal) {img.abnormal_probability:.2f}, "
                       f"p(malignant) {img.malignant_probability:.2f}")
            pixels = mammo.read_mammogram(img.path).pixels
            if isinstance(norm, Percentile):
                gate_inputs.append((header, pixels, mammo.percentile_scale(pixels, norm.low, norm.high), img.features))
            key = mammo_key_image(pixels, img.heatmap, caption, run.out_dir / f"key_mammo_{i + 1}_{img.laterality}_{img.view}.png")
            keys.append(key)
            heat = mammo_heatmap_overlay(img.heatmap, run.out_dir / f"heatmap_mammo_{i + 1}_{img.laterality}_{img.view}.png")
            images.append({"path": str(img.path.name), "laterality": img.laterality, "view": img.view,
                           "abnormal_probability": float(img.abnormal_probability),
                           "malignant_probability": float(img.malignant_probability), "key_image": key.name,
                           "heatmap": heat.name, "notes": list(img.notes)})
        domain = assess_mg(card, gate_inputs)
        findings = {
            "pipeline": "mammo", "triage": result.triage if domain.in_domain else "indeterminate",
            "abnormal_probability": float(result.exam_score), "threshold": float(result.threshold),
            "mammo": {"images": images, "breasts": {k: float(v) for k, v in result.breasts.items()},
                      "exam_score": float(result.exam_score)},
            "timings_s": {}, "domain": domain.to_json(), "operating_point": op,
            "models": [model.ref()],
            "bundle": bundle_id, "study_uid": series[0].study_uid,
            "series_uid": series[0].uid if len(series) == 1 else None,
            "key_images": _relative(keys, run.out_dir), "warnings": run.warnings,
        }
        outputs = _dicom_outputs(validate_findings({**findings, "timings_s": dict(run.timings)}), headers, {},
                                 run.out_dir, findings["warnings"], settings.require_dicom_outputs)
        findings["outputs"] = _relative(outputs, run.out_dir)
    return findings


def _headers(files: list[Path]) -> list:
    import pydicom

    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def analyze_study(request: AnalysisRequest) -> dict[str, Any]:
    """Analyse the request's study; write out_dir/findings.json, key images, labels, DICOM outputs; return the findings.

    Raises `InputError` / `SeriesError` (unusable input: exit 2), `Preempted` (the gate said stop;
    the same request again resumes from its checkpoint_dir), `PipelineError` / `CardError` /
    `OperatingPointError` (model setup). `findings["timings_s"]["total"]` is the whole call's time.
    """
    t0 = time.perf_counter()
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = Path(request.models_dir) if request.models_dir is not None else default_models_dir()
    if request.bundle_dir is not None and not Path(request.bundle_dir).is_dir():
        raise InputError(f"bundle {request.bundle_dir} does not exist or is not a directory")
    run = _Run(request, models_dir)
    with expanded_inputs([Path(p) for p in request.paths]) as files:
        with run.timed("inputs"):
            series, skipped = group_series(files)
            pipeline, chosen, warnings = choose_pipeline(series, skipped)
        run.warnings += warnings
        bound = log.bind(study=chosen[0].study_uid, series=chosen[0].uid, pipeline=pipeline)
        bound.info("analysis started", files=sum(len(s.files) for s in chosen))
        findings = _run_pancreas(run, chosen[0]) if pipeline == "pancreas" else _run_mammo(run, chosen)
    run.timings["total"] = time.perf_counter() - t0
    findings["timings_s"] = {k: round(v, 4) for k, v in run.timings.items()}
    write_findings(out_dir / "findings.json", findings)
    bound.info("analysis done", triage=findings["triage"], in_domain=findings["domain"]["in_domain"],
               seconds=round(run.timings["total"], 3))
    return validate_findings(findings)

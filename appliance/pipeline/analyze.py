"""Analyse one study: pick the pipeline, run it, write findings, key images and DICOM outputs.

`analyze_study` is the one entry the CLI, the worker and the tests share. It takes files, folders or
zips, groups the DICOM files by series and chooses by modality / SOP class: a CT series goes to the
pancreas cascade, MG images to the mammography model; anything else is refused with `InputError`
naming what was found. Models come from the models directory (card + ONNX per role) or from a bundle
(manifest.json: per role an artifact optimised for this box, its backend and precision).

The worker passes a gate and a checkpoint directory: when the gate says stop at a safe point the
finished stages stay saved and `Preempted` propagates; calling again with the same directory resumes.
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

from appliance.logs import get_logger
from appliance.pipeline.checkpoint import Gate, Preempted, check_gate, remove_states
from appliance.pipeline.findings import validate_findings, write_findings

log = get_logger("appliance.pipeline.analyze")

__all__ = ["InputError", "Preempted", "analyze_study", "default_models_dir"]

Progress = Callable[[str, float], None]
CT_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "ImageType",
                "SeriesDescription", "NumberOfFrames", "Rows", "PixelData"]
_MAX_ZIP_BYTES = 8 << 30
_MODEL_CACHE: dict[tuple, Any] = {}


class InputError(ValueError):
    """The input cannot be analysed (no image series, mixed studies, wrong modality): exit 2 with this reason."""


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
    images: int = 0
    localizer: bool = False

    @property
    def kind(self) -> str:
        if self.modality == "CT" and self.images:
            return "ct"
        if self.modality == "MG" and self.images:
            return "mg"
        return "other"

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
    localizer = "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]
    info = series.setdefault(uid, info)
    info.files.append(path)
    info.images += images
    info.localizer = info.localizer or localizer


def choose_pipeline(series: dict[str, SeriesInfo], skipped: list[Path]) -> tuple[str, list[SeriesInfo], list[str]]:
    """("pancreas" | "mammo", the series to analyse, warnings); InputError when nothing fits."""
    if not series:
        example = f" (e.g. {skipped[0].name})" if skipped else ""
        raise InputError(f"no DICOM files in the input: {len(skipped)} file(s) that are not DICOM{example}")
    ct = [s for s in series.values() if s.kind == "ct"]
    mg = [s for s in series.values() if s.kind == "mg"]
    if not ct and not mg:
        found = "; ".join(s.describe() for s in list(series.values())[:3])
        raise InputError(f"no CT or MG image series to analyse: found {found}. Only CT (pancreas) and MG "
                         "(mammography) images can be analysed")
    studies = sorted({s.study_uid for s in ct + mg})
    if len(studies) > 1:
        raise InputError(f"input holds {len(studies)} studies ({', '.join(studies[:3])}); analyse one study at a time")
    if ct and mg:
        raise InputError("input mixes CT and MG images; analyse the CT and the mammography exam separately")
    warnings = []
    if skipped:
        warnings.append(f"ignored {len(skipped)} file(s) that are not DICOM")
    others = [s for s in series.values() if s.kind == "other"]
    if others:
        warnings.append(f"ignored {len(others)} series that are not CT/MG images: "
                        + "; ".join(s.describe() for s in others[:3]))
    if mg:
        return "mammo", mg, warnings
    ranked = sorted(ct, key=lambda s: (not s.localizer, s.images), reverse=True)
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


def read_bundle(bundle_dir: Path, trusted_keys: Any = None) -> tuple[str | None, dict[str, dict[str, Any]], list[str]]:
    """(bundle id, role -> manifest entry, warnings). With trusted keys (a data dir or key list) the
    bundle's signature and every checksum are verified first (appliance.bundle); without, the manifest
    is read as is and the findings say so."""
    if not bundle_dir.is_dir():
        raise InputError(f"bundle {bundle_dir} does not exist or is not a directory")
    if trusted_keys is not None:
        from appliance.bundle import BundleError, verify_bundle

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
    bundle_id, entries, warnings = (None, {}, [])
    if bundle_dir is not None:
        bundle_id, entries, warnings = read_bundle(Path(bundle_dir), trusted_keys)
    choices = {}
    for role in roles:
        entry = entries.get(role) or {}
        card = Path(bundle_dir) / entry["card"] if bundle_dir and entry.get("card") else models_dir / f"{role}.json"
        artifact = Path(bundle_dir) / entry["artifact"] if bundle_dir and entry.get("artifact") else None
        choices[role] = ModelChoice(role, card, artifact, str(entry.get("backend") or backend),
                                    str(entry.get("precision") or "fp32"), str(entry.get("device") or "CPU"),
                                    entry.get("threads"))
    return choices, bundle_id, warnings


def load_models(choices: dict[str, ModelChoice], threads: int | None, batch_size: int) -> dict[str, Any]:
    """Stage models, cached across studies (the worker analyses many; loading a session costs seconds)."""
    from appliance.pipeline.pancreas import load_stage_model

    models = {}
    for role, c in choices.items():
        artifact = c.artifact or c.card
        stamp = tuple(p.stat().st_mtime if p.exists() else 0.0 for p in (c.card, artifact))
        key = (c, stamp, threads, batch_size)
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load_stage_model(role, c.card, artifact=c.artifact, backend=c.backend,
                                                 precision=c.precision, device=c.device,
                                                 threads=threads or c.threads, batch_size=batch_size)
        models[role] = _MODEL_CACHE[key]
    return models


# ----------------------------------------------------------------------------------------------
# outputs


def _dicom_outputs(findings: dict[str, Any], datasets: list, masks: dict[str, np.ndarray], out_dir: Path,
                   warnings: list[str], required: bool) -> list[Path]:
    """DICOM SEG / SR / PDF through the outputs module; its absence is a warning unless required."""
    try:
        from appliance.pipeline.dicom_outputs import write_dicom_outputs
    except ImportError as exc:
        if required:
            raise
        warnings.append(f"DICOM SEG/SR/PDF not written: appliance.pipeline.dicom_outputs unavailable ({exc})")
        return []
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
    from appliance.pipeline.keyimages import ct_key_image
    from appliance.pipeline.preprocess import bbox_centre

    hu = result.ct.hu
    spacing_yx = result.ct.grid.spacing[1:]
    lesion_keys = [k for k in masks if k.startswith("lesion_")]

    def lesions_at(z: int) -> np.ndarray | None:  # one slice at a time: a union of whole masks costs 78 MB each
        return np.logical_or.reduce([masks[k][z] for k in lesion_keys]) if lesion_keys else None

    pancreas = masks.get("pancreas")
    written = []
    if pancreas is not None:
        z = bbox_centre(pancreas)[0]  # type: ignore[index]
        caption = (f"Pancreas ({findings['pancreas_volume_ml']:.1f} mL): {findings['triage'].replace('_', ' ')}, "
                   f"score {findings['abnormal_probability']:.2f} (threshold {findings['threshold']:.2f})")
        written.append(ct_key_image(hu[z], spacing_yx, pancreas[z], lesions_at(z), caption,
                                    out_dir / "key_pancreas.png"))
    else:  # nothing found is a result too: show the middle slice with the reason
        z = hu.shape[0] // 2
        written.append(ct_key_image(hu[z], spacing_yx, None, None, "No pancreas found by stage 1: result indeterminate",
                                    out_dir / "key_pancreas.png"))
    for lesion in findings["lesions"]:
        mask = masks.get(lesion["id"])
        if mask is None or not mask.any():
            continue
        z = bbox_centre(mask)[0]  # type: ignore[index]
        path = ct_key_image(hu[z], spacing_yx, None if pancreas is None else pancreas[z], mask[z],
                            _lesion_caption(lesion), out_dir / f"key_{lesion['id']}.png")
        lesion["key_image"] = path.name
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# pipelines


@dataclass
class _Run:
    """Per-call state: where things go, what to tell, how long each step took."""

    out_dir: Path
    gate: Gate | None
    progress: Progress | None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def report(self, stage: str, fraction: float) -> None:
        if self.progress is not None:
            self.progress(stage, fraction)

    @contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _run_pancreas(run: _Run, series: SeriesInfo, models_dir: Path, bundle_dir: Path | None, *, backend: str,
                  trusted_keys: Any, threads: int | None, batch_size: int, threshold: float | None, checkpoint_dir: Path | None,
                  require_dicom_outputs: bool, load_args: dict[str, Any]) -> dict[str, Any]:
    from appliance.pipeline.pancreas import (
        ROLES,
        CascadeSettings,
        canonical_masks,
        load_canonical,
        run_cascade,
    )

    check_gate(run.gate, "pancreas.load")
    with run.timed("load"):
        ct = load_canonical(series.files, progress=run.progress, **load_args)
    with run.timed("models"):
        choices, bundle_id, bundle_warnings = resolve_models(ROLES, models_dir, bundle_dir, backend, trusted_keys)
        run.warnings += bundle_warnings
        models = load_models(choices, threads, batch_size)
    result = run_cascade(ct, models, settings=CascadeSettings(threshold=threshold), checkpoint_dir=checkpoint_dir,
                         gate=run.gate, progress=run.progress)
    run.timings.update(result.timings)
    check_gate(run.gate, "pancreas.outputs")
    with run.timed("outputs"):
        findings = {
            "pipeline": "pancreas", "triage": result.triage, "abnormal_probability": result.stage2.abnormal_probability,
            "threshold": result.threshold, **result.measurements, "timings_s": {},
            "models": [models[r].ref() for r in ROLES], "bundle": bundle_id,
            "study_uid": ct.volume.study_uid, "series_uid": ct.volume.series_uid,
            "warnings": run.warnings + result.warnings,
        }
        masks = canonical_masks(result)
        key_images = _ct_key_images(result, masks, findings, run.out_dir)
        findings["key_images"] = _relative(key_images, run.out_dir)
        source_masks = {name: ct.to_source(mask) for name, mask in masks.items()}
        del masks
        outputs = _dicom_outputs(validate_findings({**findings, "timings_s": dict(run.timings)}), ct.volume.datasets,
                                 source_masks, run.out_dir, findings["warnings"], require_dicom_outputs)
        findings["outputs"] = _relative(outputs, run.out_dir)
    if checkpoint_dir is not None:
        remove_states(checkpoint_dir)  # findings exist now: a rerun of the job starts clean
    return findings


def _run_mammo(run: _Run, series: list[SeriesInfo], models_dir: Path, bundle_dir: Path | None, *, backend: str,
               trusted_keys: Any,
               threads: int | None, threshold: float | None, require_dicom_outputs: bool) -> dict[str, Any]:
    try:
        from appliance.pipeline import mammo
    except ImportError as exc:
        raise InputError(f"mammography pipeline is not installed here ({exc})") from exc
    from appliance.modelcard import load_card, model_path
    from appliance.pipeline.keyimages import mammo_key_image
    from appliance.pipeline.pancreas import file_sha256

    files = [f for s in series for f in s.files]
    choices, bundle_id, bundle_warnings = resolve_models(("mammo",), models_dir, bundle_dir, backend, trusted_keys)
    run.warnings += bundle_warnings
    role_choice = choices["mammo"]
    check_gate(run.gate, "mammo.inference")
    with run.timed("models"):
        card = load_card(role_choice.card, verify_file=role_choice.artifact is None)
        artifact = role_choice.artifact or model_path(role_choice.card, card)
        from appliance.runtime import get_backend

        session = get_backend(role_choice.backend).load(artifact, device=role_choice.device,
                                                         precision=role_choice.precision,
                                                         threads=threads or role_choice.threads)
    run.report("mammo", 0.0)
    with run.timed("mammo"):
        try:
            result = mammo.analyze_mammo_images(files, card_path=role_choice.card, session=session, threshold=threshold)
        except mammo.MammoInputError as exc:
            raise InputError(str(exc)) from exc
    run.report("mammo", 1.0)
    check_gate(run.gate, "mammo.outputs")
    with run.timed("outputs"):
        images, keys = [], []
        for i, img in enumerate(result.images):
            caption = (f"{img.laterality} {img.view}: p(abnormal) {img.abnormal_probability:.2f}, "
                       f"p(malignant) {img.malignant_probability:.2f}")
            pixels = mammo.read_mammogram(img.path).pixels
            key = mammo_key_image(pixels, img.heatmap, caption, run.out_dir / f"key_mammo_{i + 1}_{img.laterality}_{img.view}.png")
            keys.append(key)
            images.append({"path": str(img.path.name), "laterality": img.laterality, "view": img.view,
                           "abnormal_probability": float(img.abnormal_probability),
                           "malignant_probability": float(img.malignant_probability), "key_image": key.name,
                           "notes": list(img.notes)})
        findings = {
            "pipeline": "mammo", "triage": result.triage, "abnormal_probability": float(result.exam_score),
            "threshold": float(result.threshold),
            "mammo": {"images": images, "breasts": {k: float(v) for k, v in result.breasts.items()},
                      "exam_score": float(result.exam_score)},
            "timings_s": {}, "models": [{"role": "mammo", "name": card.name, "version": card.version,
                                          "sha256": file_sha256(Path(artifact)), "backend": role_choice.backend,
                                          "precision": role_choice.precision, "device": role_choice.device}],
            "bundle": bundle_id, "study_uid": series[0].study_uid,
            "series_uid": series[0].uid if len(series) == 1 else None,
            "key_images": _relative(keys, run.out_dir), "warnings": run.warnings,
        }
        datasets = _headers(files)
        outputs = _dicom_outputs(validate_findings({**findings, "timings_s": dict(run.timings)}), datasets, {},
                                 run.out_dir, findings["warnings"], require_dicom_outputs)
        findings["outputs"] = _relative(outputs, run.out_dir)
    return findings


def _headers(files: list[Path]) -> list:
    import pydicom

    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def analyze_study(
    paths: list[Path],
    out_dir: Path,
    *,
    models_dir: Path | None = None,
    bundle_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    gate: Gate | None = None,
    threshold: float | None = None,
    progress: Progress | None = None,
    site_thresholds: dict[str, float | None] | None = None,
    backend: str = "onnxruntime",
    threads: int | None = None,
    batch_size: int = 1,
    require_dicom_outputs: bool = False,
    load_args: dict[str, Any] | None = None,
    trusted_keys: Any = None,
) -> dict[str, Any]:
    """Analyse the study in `paths`; write out_dir/findings.json, key images, DICOM outputs; return the findings.

    `threshold` overrides the operating point of whichever pipeline runs; `site_thresholds`
    ({"pancreas": x, "mammo": y}, from the site config) apply when it is None, else the card's own.
    `trusted_keys` (a data dir or Ed25519 public keys): verify the bundle's signature before using it.
    Raises `InputError` / `SeriesError` (unusable input: exit 2), `Preempted` (the gate said stop;
    call again with the same checkpoint_dir to resume), `PipelineError` / `CardError` (model setup).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    if bundle_dir is not None and not Path(bundle_dir).is_dir():
        raise InputError(f"bundle {bundle_dir} does not exist or is not a directory")
    run = _Run(out_dir, gate, progress)
    with expanded_inputs([Path(p) for p in paths]) as files:
        with run.timed("inputs"):
            series, skipped = group_series(files)
            pipeline, chosen, warnings = choose_pipeline(series, skipped)
        run.warnings += warnings
        bound = log.bind(study=chosen[0].study_uid, series=chosen[0].uid, pipeline=pipeline)
        bound.info("analysis started", files=sum(len(s.files) for s in chosen))
        if threshold is None:
            threshold = (site_thresholds or {}).get(pipeline)
        if pipeline == "pancreas":
            findings = _run_pancreas(run, chosen[0], models_dir, bundle_dir, backend=backend,
                                     trusted_keys=trusted_keys, threads=threads,
                                     batch_size=batch_size, threshold=threshold, checkpoint_dir=checkpoint_dir,
                                     require_dicom_outputs=require_dicom_outputs, load_args=load_args or {})
        else:
            findings = _run_mammo(run, chosen, models_dir, bundle_dir, backend=backend, trusted_keys=trusted_keys,
                                  threads=threads,
                                  threshold=threshold, require_dicom_outputs=require_dicom_outputs)
    run.timings["total"] = time.perf_counter() - t0
    findings["timings_s"] = {k: round(v, 4) for k, v in run.timings.items()}
    write_findings(out_dir / "findings.json", findings)
    bound.info("analysis done", triage=findings["triage"], seconds=round(run.timings["total"], 3))
    return validate_findings(findings)

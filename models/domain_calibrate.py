"""Calibrate the validated-domain gate and the operating points, and write them into the model cards.

    edgescreen models domain-calibrate [--models models] [--n 60] [--seed-base 100100] [--write]

What it measures, on in-domain calibration phantoms (calibration seeds 100000-100999, never trained on,
never the held-out 200000+ that `edgescreen models evaluate` reports on), each rendered as a DICOM
series with the default (validated) acquisition and analysed by the appliance's own pipeline:

- the body intensity statistics the gate checks (appliance.pipeline.domain.intensity): each card's
  `domain.intensity` gets the mean and SD and an accepted range of mean +/- 5 SD, widened to at least
  the calibration range plus a quarter of its width (so a held-out in-domain study is rarely outside);
- stage 1's organs: volumes and core densities (ranges: published adult figures unioned with the
  calibration spread), whether the pancreas is one piece, the relations that held on every study;
- each model's pooled features (where the card declares a features output): the mean and principal
  subspace from the first half of the studies, the threshold at the largest distance of the second
  half times 1.1 (the OOD check then flags none of the calibration set, and about 1% or fewer of new
  in-domain studies: `edgescreen models evaluate` measures that on held-out seeds);
- stage 2's study score on the calibration normals and lesions: thresholds for specificity 0.99, 0.95,
  0.90 and sensitivity 0.95 (`operating_points`; spec99 is the default and the card's decision).
The mammography card's operating points come from the patient-level cross-validation's out-of-fold
scores (models/mammo_cv.json) and its domain from the training data (mini-MIAS: digitised film).

Without --write it prints what it would write. Figures are from synthetic phantoms only.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.pipeline.metrics import threshold_for_sensitivity, threshold_for_specificity

MODELS_DIR = Path(__file__).resolve().parent
CT_ROLES = ("pancreas.stage1", "pancreas.stage2", "pancreas.stage3")
LESIONS = ("pdac", "pnet", "spt", "ipmn", "mcn", "scn", "cp", "other")

# Published adult figures (mL) the organ volume ranges start from, before the phantom spread widens them:
# liver 1000-2500 (CT volumetry, e.g. Vauthey et al., Liver Transpl 2002); spleen 100-400 (Prassopoulos et
# al., Eur Radiol 1997: 107-314 mL); kidney 100-250 each (CT volumetry); pancreas 40-120 (Saisho et al.,
# Clin Anat 2007: about 72 mL in adults, smaller with age).
ADULT_VOLUME_ML = {"liver": (1000.0, 2500.0), "spleen": (100.0, 400.0), "right_kidney": (100.0, 250.0),
                   "left_kidney": (100.0, 250.0), "pancreas": (40.0, 120.0)}
# Relations an adult abdomen keeps (LPS): kept only where every calibration study satisfies them.
CANDIDATE_RELATIONS = (
    ("pancreas", "anterior_to", "aorta"), ("pancreas", "anterior_to", "left_kidney"),
    ("pancreas", "right_of", "spleen"), ("pancreas", "left_of", "liver"), ("pancreas", "above", "vertebrae"),
    ("liver", "right_of", "spleen"),
)
LEVEL_ORGANS = ("liver", "aorta", "left_kidney")
HU_ORGANS = ("aorta", "liver", "spleen", "right_kidney", "left_kidney", "pancreas")
SD_RANGE = 5.0


def plan(n: int, seed_base: int) -> list[tuple[int, str | None]]:
    """(seed, lesion): one third normal, the rest the 8 lesion classes in turn."""
    out: list[tuple[int, str | None]] = []
    for i in range(n):
        out.append((seed_base + i, None if i % 3 == 0 else LESIONS[(i // 3 + i) % len(LESIONS)]))
    return out


def measure_ct_study(files: list[Path], models: dict[str, Any]) -> dict[str, Any]:
    """What the gate and the operating points need from one study, computed by the appliance's own code."""
    from edgescreen.appliance.pipeline.domain import anatomy, intensity
    from edgescreen.appliance.pipeline.pancreas import CascadeSettings, load_canonical, run_cascade

    ct = load_canonical(files)
    result = run_cascade(ct, models, settings=CascadeSettings(threshold=1.0))  # no lesion extraction needed
    hu, grid = ct.hu, ct.grid

    def hu_at(lps: np.ndarray) -> np.ndarray:
        idx = np.clip(np.rint(grid.to_index(lps)).astype(np.int64), 0, np.asarray(hu.shape) - 1)
        return hu[tuple(idx.T)]

    s1 = result.stage1
    organs = anatomy.measure(s1.labels, s1.classes, s1.grid, hu_at)
    level = {}
    if "z_index" in organs.get("pancreas", {}):
        level = anatomy.level_presence(s1.labels, s1.classes, int(organs["pancreas"]["z_index"]))
    header = ct.volume.datasets[0]
    return {
        "stats": intensity.ct_statistics(hu, grid.spacing), "organs": organs, "level": level,
        "features": {"pancreas.stage1": s1.features, "pancreas.stage2": result.stage2.features},
        "score": result.stage2.abnormal_probability, "spacing": list(ct.volume.spacing_mm),
        "thickness": float(header.get("SliceThickness") or ct.volume.spacing_mm[0]),
    }


def _floor(name: str) -> float:
    """The least half-width a range gets beyond the calibration values, in the statistic's unit: what a
    scanner's calibration drift or a patient's habitus moves without any change of domain."""
    if name.endswith("_fraction"):
        return 0.02
    if name == "noise_hu":
        return 2.0
    if name == "noise_texture":
        return 0.05
    if name == "body_width_mm":
        return 20.0
    return 10.0  # HU


def _stat_range(values: list[float], clip: tuple[float, float] | None = None, floor: float = 0.0) -> dict[str, float]:
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    mean, std = float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    width = float(arr.max() - arr.min())
    low = min(mean - SD_RANGE * std, float(arr.min()) - max(0.25 * width, floor))
    high = max(mean + SD_RANGE * std, float(arr.max()) + max(0.25 * width, floor))
    if clip is not None:
        low, high = max(low, clip[0]), min(high, clip[1])
    return {"mean": round(mean, 4), "std": round(std, 4), "low": round(low, 4), "high": round(high, 4)}


_FRACTIONS = ("fat_fraction", "soft_tissue_fraction", "bone_fraction", "metal_fraction", "body_area_fraction",
              "body_edge_fraction")


def intensity_domain(rows: list[dict[str, Any]], source: str) -> dict[str, Any]:
    names = sorted(rows[0]["stats"])
    stats = {}
    for name in names:
        values = [r["stats"][name] for r in rows if name in r["stats"]]
        rng = _stat_range(values, (0.0, 1.0) if name in _FRACTIONS else None, _floor(name))
        if name == "metal_fraction":  # a few saturated voxels (calcified plaque) are not metal
            rng["high"] = max(min(rng["high"], 2e-4), float(max(values)) * 2, 1e-4)
        stats[name] = rng
    return {"region": "body", "statistics": stats, "source": source}


def anatomy_domain(rows: list[dict[str, Any]], classes: list[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """The anatomy rules, and notes on the candidate rules the calibration set itself broke (dropped)."""
    from edgescreen.appliance.pipeline.domain.anatomy import relation_holds

    notes = []
    volumes = {}
    for organ, (lo, hi) in ADULT_VOLUME_ML.items():
        if organ not in classes:
            continue
        vals = [float(r["organs"][organ]["volume_ml"]) for r in rows]
        volumes[organ] = {"min": round(min(lo, 0.6 * min(vals)), 1), "max": round(max(hi, 1.5 * max(vals)), 1)}
    hu = {}
    for organ in HU_ORGANS:
        vals = [float(r["organs"][organ]["hu_median"]) for r in rows if "hu_median" in r["organs"].get(organ, {})]
        if len(vals) >= 5:
            rng = _stat_range(vals, floor=10.0)
            hu[organ] = {"min": round(rng["low"], 1), "max": round(rng["high"], 1)}
    pieces = [int(r["organs"]["pancreas"].get("components", 0)) for r in rows]
    single = ["pancreas"] if all(p <= 1 for p in pieces) else []
    if not single:
        notes.append(f"pancreas in several pieces on {sum(p > 1 for p in pieces)} calibration studies: rule dropped")
    relations = []
    for subject, relation, reference in CANDIDATE_RELATIONS:
        if subject not in classes or reference not in classes:
            continue
        ok = [relation_holds(relation, 0.0, np.asarray(r["organs"][subject]["centre"]) - np.asarray(r["organs"][reference]["centre"]))
              for r in rows if "centre" in r["organs"][subject] and "centre" in r["organs"][reference]]
        if ok and all(ok):
            relations.append({"subject": subject, "relation": relation, "reference": reference})
        else:
            notes.append(f"{subject} {relation} {reference} failed on {len(ok) - sum(ok)} of {len(ok)} studies: dropped")
    level = [o for o in LEVEL_ORGANS if o in classes and all(r["level"].get(o, 0) >= 5 for r in rows if r["level"])]
    notes += [f"{o} not at the pancreas level on some calibration study: dropped" for o in LEVEL_ORGANS
              if o in classes and o not in level]
    return ({"output": "organs", "source": source, "organ_volume_ml": volumes, "organ_hu_median": hu,
             "single_component": single, "component_min_fraction": 0.2, "relations": relations,
             "present_at_level_of": {"pancreas": level} if level else {}}, notes)


def ood_domain(vectors: list[np.ndarray], output: str, source: str, k: int = 16) -> dict[str, Any]:
    """Fit on the first half, threshold at 1.1 x the largest distance of the second half."""
    from edgescreen.appliance.modelcard import OodDomain
    from edgescreen.appliance.pipeline.domain.ood import distance, fit

    x = np.stack(vectors)
    half = max(2, len(x) // 2)
    fitted = fit(x[:half], k=k)
    probe = OodDomain(output=output, threshold=1.0, calibration="probe", **fitted)
    held = [distance(v, probe) for v in x[half:]] or [distance(v, probe) for v in x]
    return {"output": output, **fitted, "threshold": round(1.1 * max(held), 4),
            "calibration": f"{source}: statistics from {half} studies, threshold 1.1 x the largest distance of the other "
                           f"{len(x) - half}", "target_flag_rate": 0.01}


def operating_points(normal: list[float], lesion: list[float], calibration_set: str) -> list[dict[str, Any]]:
    n, p = np.asarray(normal), np.asarray(lesion)
    out = []
    for name, target, value in (("spec99", "specificity", 0.99), ("spec95", "specificity", 0.95),
                                ("spec90", "specificity", 0.90), ("sens95", "sensitivity", 0.95)):
        thr = threshold_for_specificity(n, value) if target == "specificity" else threshold_for_sensitivity(p, value)
        # 6 decimals on the card, rounded the way that keeps the target: up for specificity, down for sensitivity
        thr = (math.ceil if target == "specificity" else math.floor)(thr * 1e6) / 1e6
        thr = float(min(max(thr, 0.0), 1.0))
        out.append({"name": name, "target": target, "target_value": value, "threshold": thr,
                    "calibration_set": calibration_set,
                    "measured": {"specificity": float(np.mean(n < thr)), "sensitivity": float(np.mean(p >= thr)),
                                 "n_normal": float(len(n)), "n_lesion": float(len(p))}})
    return out


def ct_attributes_domain(rows: list[dict[str, Any]], source: str) -> dict[str, Any]:
    pixel = [min(r["spacing"][1:]) for r in rows]
    return {"source": source, "modality": ["CT"], "body_part": ["ABDOMEN", "ABD", "PANCREAS"],
            "slice_thickness_mm": {"min": 1.0, "max": 5.0}, "slice_spacing_mm": {"min": 0.8, "max": 5.0},
            "pixel_spacing_mm": {"min": round(min(0.55, min(pixel) - 0.02), 3), "max": round(max(1.0, max(pixel) + 0.02), 3)},
            "kernel_family": ["standard"], "contrast_phase": ["non_contrast"]}


def statistics_rows(n: int, seed_base: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Body statistics of n in-domain series as rendered (the HU array the pipeline loads from their DICOM;
    the statistics do not depend on the orientation), without the models: cheap enough for many seeds."""
    from edgescreen.appliance.pipeline.domain.intensity import ct_statistics
    from edgescreen.models.phantom.ct import generate_ct_volume

    rows = []
    for i, (seed, lesion) in enumerate(plan(n, seed_base)):
        ph = generate_ct_volume(seed, lesion)
        rows.append({"seed": seed, "stats": ct_statistics(ph.hu, tuple(ph.spacing_mm))})
        if (i + 1) % 10 == 0:
            log(f"domain-calibrate: statistics {i + 1}/{n}")
    return rows


def calibrate_ct(models_dir: Path, n: int, seed_base: int, work: Path, log: Callable[[str], None],
                 backend: str = "onnxruntime", stats_n: int = 0) -> dict[str, Any]:
    """Render, analyse and summarise the calibration studies; return the new card sections per role."""
    from edgescreen.appliance.pipeline.analyze import ModelChoice, load_models
    from edgescreen.models.phantom.ct import write_ct_study

    choices = {r: ModelChoice(r, models_dir / f"{r}.json", None, backend, "fp32", "CPU") for r in CT_ROLES}
    models = load_models(choices, None, 1)
    rows, t0 = [], time.time()
    for i, (seed, lesion) in enumerate(plan(n, seed_base)):
        study = work / f"cal-{seed}"
        write_ct_study(study, seed, lesion=lesion)
        row = measure_ct_study(sorted(study.glob("*.dcm")), models)
        row.update(seed=seed, lesion=lesion)
        rows.append(row)
        for f in study.iterdir():
            f.unlink()
        study.rmdir()
        log(f"domain-calibrate: {i + 1}/{n} studies, {time.time() - t0:.0f} s")
    seeds = f"{seed_base}-{seed_base + n - 1}"
    source = f"{n} in-domain calibration phantoms (models.phantom.ct, default acquisition, seeds {seeds}), as analysed by the appliance"
    classes = list(models["pancreas.stage1"].card.output("organs").classes) if any(
        o.name == "organs" for o in models["pancreas.stage1"].card.outputs) else []
    anatomy, notes = anatomy_domain(rows, classes, "published adult volumes (module docstring) widened to " + source)
    out: dict[str, Any] = {"notes": notes, "rows": [{k: v for k, v in r.items() if k in ("seed", "lesion", "score", "stats")}
                                                    for r in rows]}
    base = ct_attributes_domain(rows, source)
    stats_rows = rows
    stats_source = source
    if stats_n > n:
        stats_rows = statistics_rows(stats_n, seed_base + n, log) + rows
        stats_source = (f"{len(stats_rows)} in-domain calibration phantoms (seeds {seed_base}-{seed_base + n + stats_n - 1}, "
                        "default acquisition), statistics of the series as rendered")
    # Stage 1 (trained on randomised acquisitions) states its own acquisition domain; it gets the anatomy
    # rules on its output. Stage 2 was trained and evaluated on the default (non-contrast, standard kernel)
    # acquisition: its card carries that domain and the body statistics of that distribution, so the gate
    # (which requires every card's domain) never clears what stage 2 was not validated on.
    out["pancreas.stage1"] = {"domain": {"anatomy": anatomy}, "base_domain": base}
    out["pancreas.stage2"] = {"domain": {**base, "intensity": intensity_domain(stats_rows, stats_source)}}
    for role in ("pancreas.stage1", "pancreas.stage2"):
        card = models[role].card
        feat = next((o for o in card.outputs if o.kind == "features"), None)
        vectors = [r["features"][role][feat.name] for r in rows if feat is not None and feat.name in r["features"][role]]
        if feat is not None and len(vectors) >= 8:
            out[role]["domain"]["ood"] = ood_domain(vectors, feat.name, source)
        else:
            notes.append(f"{role}: no features output, no OOD statistics (the card must declare kind 'features')")
    normal = [r["score"] for r in rows if r["lesion"] is None and r["score"] is not None]
    lesion = [r["score"] for r in rows if r["lesion"] is not None and r["score"] is not None]
    calib = (f"{len(normal)} normal and {len(lesion)} lesion calibration phantoms (seeds {seeds}), study score from "
             "the whole cascade on DICOM")
    out["pipeline_calibration_scores"] = {"set": calib, "normal": normal, "lesion": lesion,
                                          "operating_points_if_used": operating_points(normal, lesion, calib)}
    out["pancreas.stage2"]["operating_points"] = oracle_operating_points(models_dir, log=log)
    out["pancreas.stage2"]["default_operating_point"] = "spec99"
    return out


def oracle_operating_points(models_dir: Path, n_normal: int = 80, n_lesion: int = 16,
                            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Stage 2's operating points on the calibration set its trainer used: crops centred on the true pancreas
    (oracle inputs, as models/evaluate.py measures stage 2), normals 100000+, lesions 100500+ cycling the
    8 classes. Larger than what a whole-pipeline calibration can afford here, and the set the card names."""
    from edgescreen.appliance.modelcard import load_card
    from edgescreen.appliance.pipeline.activations import sigmoid
    from edgescreen.models.evaluate import _session, oracle_inputs
    from edgescreen.models.train.ct_data import fine_crops

    card = load_card(models_dir / "pancreas.stage2.json")
    session = _session(models_dir / card.file)
    decision = card.decision
    assert decision is not None
    scores: dict[str, list[float]] = {"normal": [], "lesion": []}
    plan = [(100_000 + i, None) for i in range(n_normal)] + [(100_500 + i, LESIONS[i % 8]) for i in range(n_lesion)]
    for i, (seed, lesion) in enumerate(plan):
        crop = fine_crops(seed, lesion)
        x = oracle_inputs(card, crop["s2_hu"], pancreas=crop["s2_pancreas"])
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, x), strict=True))
        scores["normal" if lesion is None else "lesion"].append(float(sigmoid(outputs[decision.output].reshape(-1)[0])))
        if (i + 1) % 16 == 0:
            log(f"domain-calibrate: operating points {i + 1}/{len(plan)}")
    calib = (f"{n_normal} normal calibration phantoms (seeds 100000-{100_000 + n_normal - 1}) and {n_lesion} with one "
             f"lesion each (seeds 100500-{100_500 + n_lesion - 1}, the 8 classes in turn); stage 2 on crops centred on "
             "the true pancreas, any pancreas_mask channel the true pancreas (oracle input, as in models/REPORT.md)")
    return operating_points(scores["normal"], scores["lesion"], calib)


def calibrate_mammo(models_dir: Path, data_dir: Path) -> dict[str, Any] | None:
    """Operating points from the out-of-fold CV scores, and the training data's domain (mini-MIAS)."""
    cv_path, labels = models_dir / "mammo_cv.json", data_dir / "labels.csv"
    if not cv_path.is_file() or not labels.is_file():
        return None
    import csv

    oof = json.loads(cv_path.read_text())["out_of_fold"]
    truth: dict[str, int] = {}
    patient: dict[str, int] = {}
    with open(labels, newline="") as fh:
        for row in csv.DictReader(fh):
            truth[row["image"]] = max(truth.get(row["image"], 0), int(row["abnormality"] != "NORM"))
            patient[row["image"]] = int(row["patient"])
    ids = [k for k in oof if k in truth]
    scores = np.array([float(oof[k]["abnormal"]) for k in ids])
    rule = json.loads((models_dir / "mammo.json").read_text()).get("contralateral")
    how = "out-of-fold scores"
    if rule:  # the card's decision score: each image read against its patient's other breast (the appliance's rule)
        from edgescreen.appliance.pipeline.activations import sigmoid
        from edgescreen.models.train.mammo_data import contralateral_logits

        logits = np.log(np.clip(scores, 1e-6, 1 - 1e-6) / np.clip(1 - scores, 1e-6, 1))
        scores = sigmoid(contralateral_logits(logits, np.array([patient[k] for k in ids]), rule["weight"],
                                              rule["lone_view_logit"])).astype(np.float64)
        how = f"out-of-fold scores read against the other breast (contralateral weight {rule['weight']:g})"
    pairs = [(truth[k], float(s)) for k, s in zip(ids, scores, strict=True)]
    normal = [s for t, s in pairs if t == 0]
    abnormal = [s for t, s in pairs if t == 1]
    calib = (f"mini-MIAS development two thirds ({len(pairs)} images: {len(normal)} normal, {len(abnormal)} abnormal), "
             f"patient-level 5-fold cross-validation {how} (models/mammo_cv.json)")
    domain = {
        "source": "mini-MIAS (Suckling et al. 1994): digitised screen-film MLO mammograms, 200 micron, 8-bit",
        "modality": ["MG"], "pixel_spacing_mm": {"min": 0.15, "max": 0.25}, "detector_type": ["FILM"],
        "bits_stored": {"min": 8, "max": 8},
    }
    # no default: the card's decision (Youden's J on the same scores) stays the default operating point
    return {"mammo": {"domain": domain, "operating_points": operating_points(normal, abnormal, calib)}}


def write_sections(models_dir: Path, sections: dict[str, Any]) -> list[Path]:
    """Write each role's domain and operating points into its card; the decision follows the default point."""
    from edgescreen.appliance.modelcard import load_card

    written = []
    for role, section in sections.items():
        if role in ("notes", "rows", "pipeline_calibration_scores"):
            continue
        path = models_dir / f"{role}.json"
        card = json.loads(path.read_text())
        base = section.get("base_domain") or {}
        domain = {**(card.get("domain") or base), **section.get("domain", {})}  # merged: the trainer's fields stay
        card.update({k: v for k, v in section.items() if k not in ("domain", "base_domain")})
        if domain:
            card["domain"] = domain
        default = section.get("default_operating_point")
        if default and card.get("decision"):
            op = next(o for o in section["operating_points"] if o["name"] == default)
            card["decision"]["threshold"] = op["threshold"]
            card["decision"]["meaning"] = (f"score >= threshold flags the study as suspicious; operating point {default} "
                                           f"({op['target']} {op['target_value']}) on {op['calibration_set']}")
        text = json.dumps(card, indent=2) + "\n"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        load_card(tmp, verify_file=False)  # refuse to write a card the appliance would refuse
        tmp.replace(path)
        written.append(path)
    return written


def run_from_args(args: argparse.Namespace) -> int:
    models_dir = args.models or MODELS_DIR
    sections: dict[str, Any] = {}
    if not args.skip_ct:
        with tempfile.TemporaryDirectory(prefix="edgescreen-calibrate-") as tmp:
            sections.update(calibrate_ct(models_dir, args.n, args.seed_base, Path(tmp), print, args.backend,
                                         args.stats_n))
    mammo = calibrate_mammo(models_dir, args.mini_mias) if args.mini_mias else None
    if mammo:
        sections.update(mammo)
    else:
        print(f"domain-calibrate: no mammo_cv.json or mini-MIAS labels under {args.mini_mias}: mammography skipped")
    if args.save:
        args.save.write_text(json.dumps(sections, indent=1, default=float) + "\n")
    for note in sections.get("notes", []):
        print(f"domain-calibrate: {note}")
    if args.write:
        for path in write_sections(models_dir, sections):
            print(f"domain-calibrate: wrote {path}")
    else:
        print(json.dumps({k: v for k, v in sections.items() if k != "rows"}, indent=1)[:20000])
    return 0


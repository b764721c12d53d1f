"""Held-out evaluation of the reference models: writes models/REPORT.md and models/REPORT.json.

Why oracle inputs: each pancreas stage is measured on what it is responsible for, with the true
inputs from the phantom (stage 1: the whole study; stage 2: the crop around the true pancreas; stage 3:
the crop around the true lesion with the true mask). End-to-end behaviour, where stage 1 errors feed
stage 2, is the pipeline's test, not this report's. Every model runs as its ONNX file in onnxruntime,
fed exactly as its card says. Held-out seeds (200000+) were never trained or calibrated on.
Uncertainty: percentile bootstrap over studies (1000 resamples, fixed seed).

    edgescreen models evaluate [--n 120] [--models models] [--seed-base 200000]   (options: models/cli.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgescreen.appliance import RESEARCH_USE_BANNER, __version__
from edgescreen.appliance.modelcard import ModelCard, load_card, sha256_file
from edgescreen.appliance.pipeline.activations import sigmoid, softmax
from edgescreen.appliance.pipeline.metrics import (
    N_BOOT,
    auc,
    balanced_accuracy,
    bootstrap_ci,
    dice,
    figure,
    sens_at_spec,
)
from edgescreen.models.train.ct_common import LESION_CLASSES, ORGAN_NAMES, sliding_window, window

MODELS_DIR = Path(__file__).resolve().parent
ROLES = ("pancreas.stage1", "pancreas.stage2", "pancreas.stage3")
AIMS = {"dice": 0.85, "auc": 0.95, "balanced_accuracy": 0.70}
MAMMO_AIM = 0.85  # abnormal vs normal AUC on mini-MIAS (patient-level cross-validation)
__all__ = ["N_BOOT", "auc", "bootstrap_ci", "evaluate", "sens_at_spec"]  # the metrics live in appliance.pipeline.metrics


def heldout_plan(n_ct: int, seed_base: int) -> list[tuple[int, str | None]]:
    """(seed, lesion) for each held-out study: 2/3 lesions spread evenly over the 8 classes, rest normal.

    With n_ct=120: 10 per lesion class and 40 normals. The order is shuffled (fixed seed) so that a
    shorter run still samples every class.
    """
    per_class = max(1, (2 * n_ct // 3) // len(LESION_CLASSES))
    n_normal = n_ct - per_class * len(LESION_CLASSES)
    kinds: list[str | None] = [None] * n_normal + [c for c in LESION_CLASSES for _ in range(per_class)]
    order = np.random.default_rng(seed_base).permutation(len(kinds))
    return [(seed_base + i, kinds[j]) for i, j in enumerate(order)]


def lesion_probability(card: ModelCard, seg: np.ndarray) -> np.ndarray:
    """The 'lesion' class of the card's segmentation output (C, *spatial) as probabilities, per its activation."""
    spec = next(o for o in card.outputs if o.kind == "segmentation")
    index = spec.classes.index("lesion")
    if spec.activation == "softmax":
        return softmax(seg, axis=0)[index]
    return sigmoid(seg[index])


def oracle_inputs(card: ModelCard, hu: np.ndarray, *, pancreas: np.ndarray | None = None,
                  lesion: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each input tensor of a crop model (batch of one), its channels named and ordered by the card.

    The phantom's truth stands in for what the cascade gives: ``ct`` is the HU crop windowed as the
    card says, ``pancreas_mask`` the true pancreas of the crop (stage 1's oracle), ``lesion_mask`` the
    true lesion (stage 2's oracle). The stacking is the pipeline's own
    (appliance.pipeline.pancreas._channel_stack), so a card naming a channel we lack is refused alike.
    """
    from edgescreen.appliance.pipeline.pancreas import _channel_stack

    norm = card.preprocessing.normalization
    available = {"ct": window(hu.astype(np.float32), norm.low, norm.high)}
    for channel, mask in (("pancreas_mask", pancreas), ("lesion_mask", lesion)):
        if mask is not None:
            available[channel] = (mask > 0).astype(np.float32)
    return {name: x[None] for name, x in _channel_stack(card, available).items()}


def _session(path: Path):  # noqa: ANN202
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("EDGESCREEN_EVAL_THREADS", "2"))
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _stat(values: list[float] | np.ndarray, fn: Callable[[np.ndarray], float] = np.mean) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"value": float(fn(arr)), "ci95": bootstrap_ci(arr, fn), "n": int(len(arr))}


def evaluate(
    models_dir: Path = MODELS_DIR,
    n_ct: int = 120,
    seed_base: int = 200_000,
    out_md: Path | None = None,
    out_json: Path | None = None,
    *,
    stage1_n: int | None = None,
    pipeline_n: int = 3,
    update_cards: bool = False,
    domain: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the three pancreas models on held-out phantoms; write and return the report dict."""
    from edgescreen.models.train.ct_data import PhantomError, fine_crops, prerender, stage1_volume

    t_start = time.time()
    models_dir = Path(models_dir)
    out_md = out_md or models_dir / "REPORT.md"
    out_json = out_json or models_dir / "REPORT.json"
    cards = {r: load_card(models_dir / f"{r}.json") for r in ROLES}
    sess = {r: _session(models_dir / cards[r].file) for r in ROLES}
    plan = heldout_plan(n_ct, seed_base)
    stage1_n = len(plan) if stage1_n is None else min(stage1_n, len(plan))
    prerender(fine_crops, plan)  # renders stage 1 volumes too (fine_crops locates the gland on them)

    c1, c2, c3 = cards["pancreas.stage1"], cards["pancreas.stage2"], cards["pancreas.stage3"]
    n1 = c1.preprocessing.normalization
    organ_dice: dict[str, list[float]] = {n: [] for n in ORGAN_NAMES[1:]}
    scores, truth, les_dice, pairs, rows = [], [], [], [], []
    t1 = t2 = t3 = 0.0
    spare = iter(range(seed_base + 100_000, seed_base + 200_000))  # stand-ins for seeds the generator rejects
    substituted: dict[int, int] = {}
    revisions: set[str] = set()  # phantom generator revisions (source hashes) the studies were rendered with
    used: list[tuple[int, str | None]] = []  # the studies actually evaluated (after substitutions)
    for i, (planned, lesion) in enumerate(plan):
        seed = planned
        while True:
            try:
                vol = stage1_volume(seed, lesion) if i < stage1_n else None
                fc = fine_crops(seed, lesion)
                break
            except PhantomError:
                seed = next(spare)
        if seed != planned:
            substituted[planned] = seed
        revisions.add(str(fc["phantom_revision"]))
        used.append((seed, lesion))
        row: dict = {"seed": seed, "lesion": lesion}
        if vol is not None:
            t = time.time()
            img = window(vol["hu"].astype(np.float32), n1.low, n1.high)[None]
            run1 = lambda x: sess["pancreas.stage1"].run(None, {c1.inputs[0].name: x})[0]  # noqa: E731
            pred = sliding_window(run1, img, c1.preprocessing.patch_size, c1.preprocessing.overlap, len(ORGAN_NAMES)).argmax(0)
            for k, name in enumerate(ORGAN_NAMES[1:], start=1):
                organ_dice[name].append(dice(pred == k, vol["labels"] == k))
            row["pancreas_dice"] = organ_dice["pancreas"][-1]
            t1 += time.time() - t
        t = time.time()
        seg, logit = sess["pancreas.stage2"].run(["lesion", "abnormal"], oracle_inputs(c2, fc["s2_hu"], pancreas=fc["s2_pancreas"]))
        score = float(sigmoid(logit.reshape(-1)[0]))
        scores.append(score)
        truth.append(int(lesion is not None))
        row["abnormal_prob"] = score
        if lesion is not None:
            les_dice.append(dice(lesion_probability(c2, seg[0]) >= 0.5, fc["s2_lesion"]))
            row["lesion_dice"] = les_dice[-1]
        t2 += time.time() - t
        if lesion is not None:
            t = time.time()
            probs = softmax(sess["pancreas.stage3"].run(None, oracle_inputs(c3, fc["s3_hu"], lesion=fc["s3_lesion"]))[0], axis=1)[0]
            pred3 = int(probs.argmax())
            pairs.append((LESION_CLASSES.index(lesion), pred3))
            row["subtype_pred"] = LESION_CLASSES[pred3]
            t3 += time.time() - t
        rows.append(row)
        if (i + 1) % 10 == 0:
            log(f"evaluate: {i + 1}/{len(plan)} studies, {time.time() - t_start:.0f} s")

    scores_a, truth_a = np.array(scores), np.array(truth)
    both = np.stack([truth_a, scores_a], axis=1)
    thr = c2.decision.threshold if c2.decision else 0.5
    flagged = scores_a >= thr
    pairs_a = np.array(pairs, dtype=int)
    cm = np.zeros((len(LESION_CLASSES), len(LESION_CLASSES)), dtype=int)
    for tr, pr in pairs_a:
        cm[tr, pr] += 1
    by_class_sens = {c: float(np.mean([f for f, (_, les) in zip(flagged, plan, strict=True) if les == c]))
                     for c in LESION_CLASSES}

    s1 = {
        "dice": _stat(organ_dice["pancreas"])["value"],
        "dice_ci95": _stat(organ_dice["pancreas"])["ci95"],
        "dice_per_organ": {n: _stat(v) for n, v in organ_dice.items()},
        "n_studies": stage1_n,
        "seconds": round(t1, 1),
    }
    s2 = {
        "auc": auc(truth_a, scores_a),
        "auc_ci95": bootstrap_ci(both, lambda a: auc(a[:, 0], a[:, 1])),
        "sensitivity_at_99_specificity": sens_at_spec(truth_a, scores_a),
        "sensitivity_at_99_specificity_ci95": bootstrap_ci(both, lambda a: sens_at_spec(a[:, 0], a[:, 1])),
        "threshold": thr,
        "sensitivity_at_threshold": float(np.mean(flagged[truth_a == 1])),
        "sensitivity_at_threshold_ci95": bootstrap_ci(flagged[truth_a == 1].astype(float), np.mean),
        "specificity_at_threshold": float(np.mean(~flagged[truth_a == 0])),
        "specificity_at_threshold_ci95": bootstrap_ci((~flagged[truth_a == 0]).astype(float), np.mean),
        "sensitivity_at_threshold_by_class": by_class_sens,
        "lesion_dice": float(np.mean(les_dice)),
        "lesion_dice_ci95": bootstrap_ci(np.array(les_dice), np.mean),
        "n_normal": int((truth_a == 0).sum()),
        "n_lesion": int((truth_a == 1).sum()),
        "seconds": round(t2, 1),
    }
    s3 = {
        "balanced_accuracy": balanced_accuracy(pairs_a),
        "balanced_accuracy_ci95": bootstrap_ci(pairs_a, balanced_accuracy),
        "accuracy": float(np.mean(pairs_a[:, 0] == pairs_a[:, 1])),
        "classes": list(LESION_CLASSES),
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_axes": "rows = truth, columns = prediction, in the order of classes",
        "n_lesion": int(len(pairs_a)),
        "seconds": round(t3, 1),
    }
    report = {
        "banner": RESEARCH_USE_BANNER,
        "pancreas.stage1": s1,
        "pancreas.stage2": s2,
        "pancreas.stage3": s3,
        "aims": AIMS,
        "heldout": {
            "seed_base": seed_base,
            "n_ct": len(plan),
            "seeds": [seed_base, seed_base + len(plan) - 1],
            "substituted_seeds": {str(k): v for k, v in substituted.items()},
            "phantom_revisions": sorted(revisions),
            "n_per_class": {"normal": sum(1 for _, les in plan if les is None),
                            **{c: sum(1 for _, les in plan if les == c) for c in LESION_CLASSES}},
            "inputs": ("oracle: stage 2 on the crop at the true pancreas bounding-box centre (any pancreas_mask channel: "
                       "the true pancreas), stage 3 at the true lesion centre with the true lesion mask"),
            "grids": "phantoms rendered directly at each card's target spacing (ct_data.stage1_volume, ct_data.fine_crops)",
        },
        "models": {r: {"file": cards[r].file, "version": cards[r].version,
                       "sha256": sha256_file(models_dir / cards[r].file)} for r in ROLES},
        "versions": _versions(),
        "studies": rows,
        "seconds": round(time.time() - t_start, 1),
    }
    if pipeline_n:
        report["pipeline_check"] = pipeline_check(models_dir, used[:pipeline_n], log)
    mammo = models_dir / "mammo_cv.json"
    if mammo.is_file():
        report["mammo"] = json.loads(mammo.read_text())
    report["operating_points"] = card_operating_points(models_dir)
    if domain is not None:
        report["domain_gate"] = run_domain_gate(models_dir, domain, log)
    _write(out_json, json.dumps(report, indent=2) + "\n")
    _write(out_md, render_markdown(report))
    if update_cards:
        _update_cards(models_dir, report)
    log(f"evaluate: wrote {out_md} and {out_json} in {report['seconds']:.0f} s")
    return report


def card_operating_points(models_dir: Path) -> dict[str, dict]:
    """Per card: its operating points and default as the card states them (the report and the cards agree)."""
    out = {}
    for role in (*ROLES, "mammo"):
        path = models_dir / f"{role}.json"
        if not path.is_file():
            continue
        card = load_card(path, verify_file=False)
        if card.operating_points:
            out[role] = {"default": card.default_operating_point,
                         "points": [op.model_dump() for op in card.operating_points]}
    return out


def run_domain_gate(models_dir: Path, options: dict, log: Callable[[str], None] = print) -> dict:
    """The gate's flag rates (models/evaluate_domain.py) with the options of `edgescreen models evaluate`."""
    import tempfile

    from edgescreen.models.evaluate_domain import evaluate_domain_gate

    with tempfile.TemporaryDirectory(prefix="edgescreen-gate-") as tmp:
        return evaluate_domain_gate(models_dir, Path(tmp), log=log, **options)


def merge_domain_gate(models_dir: Path, options: dict, out_md: Path | None = None, out_json: Path | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Measure only the gate (and re-read the cards' operating points) and merge them into an existing report."""
    out_md, out_json = out_md or models_dir / "REPORT.md", out_json or models_dir / "REPORT.json"
    report = json.loads(out_json.read_text()) if out_json.is_file() else {}
    report["operating_points"] = card_operating_points(models_dir)
    report["domain_gate"] = run_domain_gate(models_dir, options, log)
    _write(out_json, json.dumps(report, indent=2) + "\n")
    if "pancreas.stage1" in report:
        text = render_markdown(report)
        if report.get("end_to_end"):  # the section models/evaluate_e2e.py appends
            from edgescreen.models.evaluate_e2e import render as render_e2e

            text = text.rstrip("\n") + "\n" + render_e2e(report["end_to_end"])
        _write(out_md, text)
    log(f"evaluate: domain gate merged into {out_json}")
    return report


def pipeline_check(models_dir: Path, plan: list[tuple[int, str | None]], log: Callable[[str], None] = print) -> dict:
    """Do the models hold on what the appliance really feeds them? (native 512 series -> zoom order=1)

    Training and the main evaluation render phantoms straight at each model's grid. Here a few held-out
    studies are rendered as the seed's native series (512 x 512, its own slice thickness) in a slab
    around the pancreas, resampled exactly as the pipeline does, and run through stages 1 and 2; the
    same slab rendered directly at the model grid gives the paired comparison.
    """
    from edgescreen.appliance.pipeline.preprocess import bbox_centre
    from edgescreen.models.train.ct_common import STAGE1, STAGE2, crop, resample
    from edgescreen.models.train.ct_data import phantom

    gen = phantom().generate_ct_volume
    c1, c2 = load_card(models_dir / "pancreas.stage1.json"), load_card(models_dir / "pancreas.stage2.json")
    s1, s2 = _session(models_dir / c1.file), _session(models_dir / c2.file)
    n1 = c1.preprocessing.normalization
    rows = []
    for seed, lesion in plan:
        t = time.time()
        try:
            probe = gen(seed, None, matrix=16, slices=8)
        except ValueError:
            continue
        lo, hi = probe.truth["pancreas_z_range_mm"]
        zr = ((lo + hi) / 2 - 66.0, (lo + hi) / 2 + 66.0)
        fov, extent = probe.spacing_mm[1] * 16, probe.spacing_mm[0] * 8
        native = gen(seed, lesion, z_range_mm=zr)
        row: dict = {"seed": seed, "lesion": lesion, "native_spacing_mm": [round(v, 4) for v in native.spacing_mm]}
        for how in ("direct", "pipeline"):
            if how == "pipeline":
                hu = resample(native.hu.astype(np.float32), native.spacing_mm, STAGE1.spacing_mm)
                lab = resample(native.labels, native.spacing_mm, STAGE1.spacing_mm, labels=True)
            else:
                d = gen(seed, lesion, z_range_mm=zr, matrix=int(round(fov / STAGE1.spacing_mm[2])),
                        slices=int(round(extent / STAGE1.spacing_mm[0])))
                hu, lab = d.hu.astype(np.float32), d.labels
            img = window(hu, n1.low, n1.high)[None]
            run1 = lambda x: s1.run(None, {c1.inputs[0].name: x})[0]  # noqa: E731
            pred = sliding_window(run1, img, c1.preprocessing.patch_size, c1.preprocessing.overlap, len(ORGAN_NAMES)).argmax(0)
            row[f"stage1_pancreas_dice_{how}"] = dice(pred == 1, lab == 1)
            if how == "pipeline":
                hu2 = resample(native.hu.astype(np.float32), native.spacing_mm, STAGE2.spacing_mm)
                lab2 = resample(native.labels, native.spacing_mm, STAGE2.spacing_mm, labels=True)
            else:
                d2 = gen(seed, lesion, z_range_mm=zr, matrix=int(round(fov / STAGE2.spacing_mm[2])),
                         slices=int(round(extent / STAGE2.spacing_mm[0])))
                hu2, lab2 = d2.hu.astype(np.float32), d2.labels
            centre = bbox_centre(lab2 == 1)
            if centre is None:  # the phantom's own pancreas vanished on stage 2's grid: nothing to compare
                raise ValueError(f"seed {seed}: no pancreas on stage 2's grid ({how}); pick another seed")
            size = c2.preprocessing.crop_size
            x2 = oracle_inputs(c2, crop(hu2, centre, size, fill=-1000.0), pancreas=crop((lab2 == 1).astype(np.uint8), centre, size))
            _, logit = s2.run(["lesion", "abnormal"], x2)
            row[f"stage2_abnormal_prob_{how}"] = float(sigmoid(logit.reshape(-1)[0]))
        rows.append(row)
        log(f"pipeline check: seed {seed} ({lesion}) {time.time() - t:.0f} s: {row}")
    keys = ("stage1_pancreas_dice_direct", "stage1_pancreas_dice_pipeline")
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys} if rows else {}
    return {"studies": rows, **summary,
            "method": "native 512x512 series (own slice thickness) in a 132 mm slab, zoom(order=1) to the card grid"}


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"edgescreen": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _update_cards(models_dir: Path, report: dict) -> None:
    """Copy the held-out figures into each card's ``metrics`` (the ONNX file and its sha256 are untouched)."""
    from edgescreen.models.train.ct_export import write_card

    pick = {
        "pancreas.stage1": {"heldout_pancreas_dice": "dice", "heldout_pancreas_dice_ci95": "dice_ci95"},
        "pancreas.stage2": {"heldout_auc": "auc", "heldout_auc_ci95": "auc_ci95",
                            "heldout_sensitivity_at_99_specificity": "sensitivity_at_99_specificity",
                            "heldout_sensitivity_at_99_specificity_ci95": "sensitivity_at_99_specificity_ci95",
                            "heldout_sensitivity_at_threshold": "sensitivity_at_threshold",
                            "heldout_specificity_at_threshold": "specificity_at_threshold",
                            "heldout_lesion_dice": "lesion_dice", "heldout_lesion_dice_ci95": "lesion_dice_ci95"},
        "pancreas.stage3": {"heldout_balanced_accuracy": "balanced_accuracy",
                            "heldout_balanced_accuracy_ci95": "balanced_accuracy_ci95"},
    }
    for role, keys in pick.items():
        path = models_dir / f"{role}.json"
        card = json.loads(path.read_text())
        metrics = dict(card.get("metrics", {}))
        for dst, src in keys.items():
            v = report[role][src]
            metrics[dst] = {"low": v[0], "high": v[1]} if isinstance(v, list) else v
        if role == "pancreas.stage1":
            metrics["heldout_dice_per_organ"] = {k: v["value"] for k, v in report[role]["dice_per_organ"].items()}
        r = report[role]
        n = {"pancreas.stage1": r.get("n_studies"), "pancreas.stage3": r.get("n_lesion")}.get(role)
        metrics["heldout_n_studies"] = float(n if n is not None else r["n_normal"] + r["n_lesion"])
        metrics["heldout_seeds"] = f"{report['heldout']['seeds'][0]}-{report['heldout']['seeds'][1]} (oracle inputs)"
        card["metrics"] = metrics
        write_card(path, card)



def _aim(v: float, aim: float) -> str:
    return "reached" if v >= aim else "NOT reached"


def render_markdown(r: dict) -> str:
    s1, s2, s3 = r["pancreas.stage1"], r["pancreas.stage2"], r["pancreas.stage3"]
    h = r["heldout"]
    lines = [
        f"> **{r['banner']}**",
        "",
        "# edgescreen reference models: held-out evaluation",
        "",
        f"Held-out synthetic CT phantoms: seeds {h['seeds'][0]}-{h['seeds'][1]} ({h['n_ct']} studies; "
        + ", ".join(f"{k} {v}" for k, v in h["n_per_class"].items())
        + f"); phantom generator revision(s) {', '.join(h['phantom_revisions'])}"
        + (f"; seeds the generator rejected were replaced: {h['substituted_seeds']}" if h["substituted_seeds"] else "")
        + f". Inputs are {h['inputs']}; {h['grids']}. Figures are truncated (never rounded up) to 3 decimals; "
        "95% CIs are percentile bootstraps over studies (1000 resamples). These numbers describe synthetic "
        "phantoms only and say nothing about performance on patients.",
        "",
        "## pancreas.stage1: organ segmentation",
        "",
        f"Pancreas Dice {figure(s1['dice'], s1['dice_ci95'])} on {s1['n_studies']} studies. "
        f"Aim >= {AIMS['dice']}: **{_aim(s1['dice'], AIMS['dice'])}**.",
        "",
        "| organ | mean Dice (95% CI) |",
        "|---|---|",
        *[f"| {k} | {figure(v['value'], v['ci95'])} |" for k, v in s1["dice_per_organ"].items()],
        "",
        "## pancreas.stage2: lesion detection (abnormal vs normal) and lesion segmentation",
        "",
        f"- AUC {figure(s2['auc'], s2['auc_ci95'])} ({s2['n_lesion']} lesion studies vs {s2['n_normal']} normals). "
        f"Aim >= {AIMS['auc']}: **{_aim(s2['auc'], AIMS['auc'])}**.",
        f"- Sensitivity at 99% specificity on the held-out normals: {figure(s2['sensitivity_at_99_specificity'], s2['sensitivity_at_99_specificity_ci95'])}"
        f" (with {s2['n_normal']} normals, 99% specificity means no false positive).",
        f"- At the card's calibrated threshold {s2['threshold']:.6f}: sensitivity {figure(s2['sensitivity_at_threshold'], s2['sensitivity_at_threshold_ci95'])}, "
        f"specificity {figure(s2['specificity_at_threshold'], s2['specificity_at_threshold_ci95'])}.",
        f"- Lesion Dice on lesion studies: {figure(s2['lesion_dice'], s2['lesion_dice_ci95'])}.",
        "",
        "Sensitivity at the calibrated threshold by lesion class:",
        "",
        "| " + " | ".join(s2["sensitivity_at_threshold_by_class"]) + " |",
        "|" + "---|" * len(s2["sensitivity_at_threshold_by_class"]),
        "| " + " | ".join(figure(v, digits=2) for v in s2["sensitivity_at_threshold_by_class"].values()) + " |",
        "",
        "## pancreas.stage3: lesion subtype",
        "",
        f"Balanced accuracy {figure(s3['balanced_accuracy'], s3['balanced_accuracy_ci95'])} over {s3['n_lesion']} lesions "
        f"(accuracy {figure(s3['accuracy'])}). Aim >= {AIMS['balanced_accuracy']}: "
        f"**{_aim(s3['balanced_accuracy'], AIMS['balanced_accuracy'])}**.",
        "",
        "Confusion matrix (rows truth, columns prediction):",
        "",
        "| truth \\ pred | " + " | ".join(s3["classes"]) + " |",
        "|---|" + "---|" * len(s3["classes"]),
        *[f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(s3["classes"], s3["confusion_matrix"], strict=True)],
        "",
    ]
    pc = r.get("pipeline_check")
    if pc and pc.get("studies"):
        lines += [
            "## Check against the pipeline's resampling",
            "",
            f"{len(pc['studies'])} held-out studies: {pc['method']}, versus the same slab rendered directly at the grid.",
            "",
            "| seed | lesion | native spacing (mm) | stage 1 pancreas Dice direct | pipeline | stage 2 P(abnormal) direct | pipeline |",
            "|---|---|---|---|---|---|---|",
            *[f"| {x['seed']} | {x['lesion']} | {x['native_spacing_mm']} | {figure(x['stage1_pancreas_dice_direct'])} | "
              f"{figure(x['stage1_pancreas_dice_pipeline'])} | {figure(x['stage2_abnormal_prob_direct'])} | "
              f"{figure(x['stage2_abnormal_prob_pipeline'])} |" for x in pc["studies"]],
            "",
        ]
    m = r.get("mammo")
    lines += ["## mammo: cross-validation on mini-MIAS (from models/mammo_cv.json)", ""]
    if m:
        lines += [f"Patient-level {m.get('folds', 5)}-fold cross-validation on {m.get('n_images', '?')} images of "
                  f"{m.get('n_patients', '?')} patients; abnormal-vs-normal AUC aim >= {MAMMO_AIM}: "
                  f"**{'reached' if float(m['auc']) >= MAMMO_AIM else 'NOT reached'}**. Sensitivity, specificity and "
                  "accuracy are at the shipped threshold, chosen on the pooled out-of-fold scores (optimistic; "
                  "mammo_cv.json's nested_threshold has the figures with the threshold chosen on the other folds).", ""]
        for k in ("auc", "auc_malignant", "sensitivity", "specificity", "accuracy", "threshold"):
            if k in m:
                ci = m.get(f"{k}_ci95")
                lines.append(f"- {k}: {figure(float(m[k]), list(ci) if ci else None)}")
        if m.get("decision_score"):
            only = m.get("image_only") or {}
            lines += ["", f"The decision score is the paired one: {m['decision_score']} (weight "
                      f"{m['contralateral']['weight']:g}). The image alone: AUC "
                      f"{figure(float(only['auc']), only.get('auc_ci95'))}." if only.get("auc") is not None else ""]
        variants = (m.get("variants") or {}).get("variants") or {}
        if variants:
            lines += ["", "Every variant measured (patient-level CV AUC, 95% CI by patient bootstrap):", "",
                      "| variant | CV AUC (95% CI) |", "|---|---|",
                      *[f"| {name} | {figure(v['auc'], v['auc_ci95'])} |" for name, v in variants.items()]]
        lines.append("")
    else:
        lines += ["models/mammo_cv.json was not present when this report was written.", ""]
    ops = r.get("operating_points") or {}
    if ops:
        lines += ["## Operating points (from the cards)", "",
                  "| model | name | target | threshold | calibration set | measured there |", "|---|---|---|---|---|---|"]
        for role, entry in ops.items():
            for op in entry["points"]:
                measured = ", ".join(f"{k} {figure(v) if k.startswith(('sens', 'spec')) else int(v)}"
                                     for k, v in op.get("measured", {}).items())
                default = " (default)" if op["name"] == entry["default"] else ""
                lines.append(f"| {role} | {op['name']}{default} | {op['target']} {op['target_value']} | "
                             f"{op['threshold']:.6f} | {op['calibration_set']} | {measured} |")
        lines.append("")
    if r.get("domain_gate"):
        from edgescreen.models.evaluate_domain import render_markdown as render_gate

        lines += [*render_gate(r["domain_gate"]).splitlines(), ""]
    lines += [
        "## Models and provenance",
        "",
        "| role | file | version | sha256 |",
        "|---|---|---|---|",
        *[f"| {k} | {v['file']} | {v['version']} | `{v['sha256']}` |" for k, v in r["models"].items()],
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        + f". Evaluation took {r['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    models_dir = args.models or MODELS_DIR
    domain = None
    if args.domain_n or args.domain_shifted_n or args.domain_mammo_n:
        domain = {"n_in": args.domain_n, "n_shift": args.domain_shifted_n, "n_mammo": args.domain_mammo_n,
                  "backend": args.backend, "mini_mias": args.mini_mias}
    if args.domain_only:
        if domain is None:
            raise SystemExit("evaluate: --domain-only needs --domain-n, --domain-shifted-n or --domain-mammo-n")
        merge_domain_gate(models_dir, domain, args.out_md, args.out_json)
        return 0
    evaluate(models_dir, args.n, args.seed_base, args.out_md, args.out_json, stage1_n=args.stage1_n,
             pipeline_n=args.pipeline_n, update_cards=args.update_cards, domain=domain)
    return 0


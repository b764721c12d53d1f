"""(c) Is stage 1's organ map an adult abdomen? Volumes, densities, connectedness and relative positions.

On the two real CTs that the phantom-trained stage 1 failed, it drew a "pancreas" on bowel 15 cm too
low: far below the liver, in several pieces, not in front of the aorta. Those are the rules here, each
stated in the card (`domain.anatomy`) by class name, so a clinic's stage 1 with other classes states
its own. There is no duodenum class in the reference stage 1: the pancreas is placed by the aorta,
the left kidney, the spleen and the liver instead (a card with a duodenum class can add its rule).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from edgescreen.appliance.modelcard import AnatomyDomain
from edgescreen.appliance.pipeline.domain.verdict import DomainReport
from edgescreen.appliance.pipeline.preprocess import Grid

_FULL = ndimage.generate_binary_structure(3, 3)
_LEVEL_MIN_VOXELS = 5
_SAMPLE = 4000  # voxels per organ whose HU is read


def _centroid(mask: np.ndarray, grid: Grid) -> np.ndarray:
    return grid.to_lps(np.argwhere(mask).mean(axis=0))


_RELATIONS: dict[str, tuple[int, float, str]] = {  # LPS axis, sign of (subject - reference), words
    "anterior_to": (1, -1.0, "in front of"), "posterior_to": (1, 1.0, "behind"),
    "left_of": (0, 1.0, "to the patient's left of"), "right_of": (0, -1.0, "to the patient's right of"),
    "above": (2, 1.0, "above"), "below": (2, -1.0, "below"),
}


def measure(labels: np.ndarray, classes: list[str], grid: Grid, hu_at: Callable[[np.ndarray], np.ndarray] | None = None,
            *, component_min_fraction: float = 0.2) -> dict[str, dict[str, object]]:
    """Per organ class present: volume (mL), median HU of its core, number of significant pieces, centre
    (LPS mm) and the axial index of that centre; what the rules judge and what calibration summarises."""
    out: dict[str, dict[str, object]] = {}
    rng = np.random.default_rng(0)
    for index, organ in enumerate(classes):
        if organ == "background":
            continue
        mask = labels == index
        info: dict[str, object] = {"volume_ml": float(mask.sum()) * grid.voxel_ml}
        if mask.any():
            idx = np.argwhere(mask)
            info["centre"] = grid.to_lps(idx.mean(axis=0))
            info["z_index"] = int(round(float(idx[:, 0].mean())))
            comp, _ = ndimage.label(mask, structure=_FULL)
            sizes = np.sort(np.bincount(comp.ravel())[1:])[::-1]
            info["components"] = int((sizes >= component_min_fraction * sizes[0]).sum())
            if hu_at is not None:
                core = np.argwhere(ndimage.binary_erosion(mask))
                if len(core) >= 10:
                    if len(core) > _SAMPLE:
                        core = core[rng.choice(len(core), _SAMPLE, replace=False)]
                    info["hu_median"] = float(np.median(hu_at(grid.to_lps(core))))
        out[organ] = info
    return out


def level_presence(labels: np.ndarray, classes: list[str], z: int) -> dict[str, int]:
    """Voxels of each class on the axial slices z-1..z+1 of stage 1's grid."""
    band = labels[max(z - 1, 0): z + 2]
    counts = np.bincount(band.ravel(), minlength=len(classes))
    return {name: int(counts[i]) for i, name in enumerate(classes)}


def relation_holds(rule_relation: str, margin_mm: float, delta: np.ndarray) -> bool:
    if rule_relation == "level_with":
        return abs(float(delta[2])) <= margin_mm
    axis, sign, _ = _RELATIONS[rule_relation]
    return sign * float(delta[axis]) > margin_mm


def check(rules: AnatomyDomain, labels: np.ndarray, classes: list[str], grid: Grid, report: DomainReport,
          hu_at: Callable[[np.ndarray], np.ndarray] | None = None, check: str = "anatomy") -> None:
    """`labels` is stage 1's argmax on `grid`; `hu_at(lps points) -> HU` reads the CT for organ densities."""
    organs = measure(labels, classes, grid, hu_at if rules.organ_hu_median else None,
                     component_min_fraction=rules.component_min_fraction)
    for organ, allowed in rules.organ_volume_ml.items():
        volume = float(organs[organ]["volume_ml"])  # type: ignore[arg-type]
        report.measure(f"volume_ml_{organ}", volume)
        if not allowed.contains(volume):
            report.flag(check, f"{organ} volume {volume:.0f} mL is outside the adult range {allowed.describe()} mL")
    for organ, allowed in rules.organ_hu_median.items():
        median = organs[organ].get("hu_median")
        if median is None:
            continue  # too small to judge (its volume rule speaks for it)
        report.measure(f"hu_median_{organ}", float(median))  # type: ignore[arg-type]
        if not allowed.contains(float(median)):  # type: ignore[arg-type]
            report.flag(check, f"{organ} density {median:.0f} HU is outside the validated range "
                               f"{allowed.describe()} HU (contrast enhancement?)")
    for organ in rules.single_component:
        pieces = organs[organ].get("components")
        if pieces is None:
            continue
        report.measure(f"components_{organ}", float(pieces))  # type: ignore[arg-type]
        if int(pieces) > 1:  # type: ignore[call-overload]
            report.flag(check, f"{organ} is in {pieces} separate pieces, not one organ")
    for rule in rules.relations:
        missing = [name for name in (rule.subject, rule.reference) if "centre" not in organs[name]]
        if missing:
            report.flag(check, f"{' and '.join(missing)} not found: cannot place the {rule.subject}")
            continue
        delta = np.asarray(organs[rule.subject]["centre"]) - np.asarray(organs[rule.reference]["centre"])
        if not relation_holds(rule.relation, rule.margin_mm, delta):
            words = (f"within {rule.margin_mm:g} mm of the level of" if rule.relation == "level_with"
                     else _RELATIONS[rule.relation][2])
            report.flag(check, f"{rule.subject} is not {words} the {rule.reference}")
    for organ, others in rules.present_at_level_of.items():
        if "z_index" not in organs[organ]:
            continue
        present = level_presence(labels, classes, int(organs[organ]["z_index"]))  # type: ignore[call-overload]
        for other in others:
            if present[other] < _LEVEL_MIN_VOXELS:
                report.flag(check, f"no {other} at the level of the {organ} (an abdomen has it there): "
                                   f"the {organ} was probably found in the wrong place")
    report.passed(check)

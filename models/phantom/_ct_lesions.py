"""The eight PANDA lesion classes as they look on NON-contrast CT.

Why each looks the way it does (the models must learn the real cues, not a phantom artefact):
  pdac  ill-defined, only 5-20 HU below the gland, upstream duct dilated and tail atrophic
  pnet  solid, well defined, iso to slightly hypo, sometimes calcified
  spt   encapsulated, mixed solid and cystic (haemorrhagic) parts, peripheral calcification
  ipmn  grape-like cysts near water density, communicating with a dilated duct, mostly head
  mcn   uni- or few-loculated cyst with a wall in the body/tail, sometimes eggshell calcification
  scn   microcystic honeycomb with a central scar and calcification ('sunburst')
  cp    atrophic gland, many parenchymal/ductal calcifications, beaded dilated duct, focal mass
  other lymphoma-like homogeneous soft-tissue mass, or a hypo-attenuating metastasis
Lesion size (8-40 mm) and position come from the seed; the lesion class cannot move the patient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from edgescreen.models.phantom._canvas import F32, Block, Canvas, Ellipsoid, Painter, WaveField, smoothstep
from edgescreen.models.phantom._ct_anatomy import PANCREAS, SOLID_ORGANS, Abdomen, Pancreas

LESION_CLASSES: tuple[str, ...] = ("pdac", "pnet", "spt", "ipmn", "mcn", "scn", "cp", "other")

# (head, body, tail) probabilities and diameter range (mm) per class
_WHERE = {
    "pdac": ((0.6, 0.25, 0.15), (12, 40)),
    "pnet": ((0.35, 0.3, 0.35), (8, 30)),
    "spt": ((0.3, 0.35, 0.35), (18, 40)),
    "ipmn": ((0.65, 0.2, 0.15), (10, 35)),
    "mcn": ((0.04, 0.46, 0.5), (18, 40)),
    "scn": ((0.4, 0.35, 0.25), (14, 40)),
    "cp": ((0.65, 0.25, 0.1), (15, 35)),
    "other": ((0.4, 0.35, 0.25), (12, 40)),
}


@dataclass(frozen=True)
class LesionModel:
    """One sampled lesion: where, how big, and the patient as it changes around it."""

    cls: str
    centre: tuple[float, float, float]  # anatomical mm
    diameter: float
    location: str  # head | body | tail
    abdomen: Abdomen  # the patient with lesion-related changes (duct, atrophy, calcifications)
    painters: tuple[Painter, ...]


def sample_lesion(seed: int, cls: str, ab: Abdomen) -> LesionModel:
    """Draw the lesion of class ``cls`` for this patient (deterministic in seed and class)."""
    if cls not in LESION_CLASSES:
        raise ValueError(f"unknown lesion class {cls!r}")
    rng = np.random.default_rng([int(seed) % 2**63, 0x1E51, LESION_CLASSES.index(cls)])
    probs, (dmin, dmax) = _WHERE[cls]
    location = ("head", "body", "tail")[int(rng.choice(3, p=probs))]
    diameter = float(rng.uniform(dmin, dmax))
    centre = _place(rng, ab.pancreas, location, diameter / 2)
    location = ab.pancreas.location(centre[0])
    build = _BUILDERS[cls]
    abdomen, painters = build(rng, ab, centre, diameter / 2)
    return LesionModel(cls, centre, diameter, location, abdomen, painters)


def _place(rng: np.random.Generator, p: Pancreas, location: str, radius: float) -> tuple[float, float, float]:
    if location == "head":
        c = np.array(p.head.c) + rng.uniform(-0.3, 0.3, 3) * np.array(p.head.r)
        c[0] = min(c[0], p.x_neck - 3)
        return (float(c[0]), float(c[1]), float(c[2]))
    tip = float(p.tube.t[-1])
    if location == "body":
        lo, hi = p.x_neck + 0.3 * radius, p.x_body_tail
    else:
        lo, hi = p.x_body_tail + 2, max(p.x_body_tail + 4, tip - max(6.0, 0.5 * radius))
    x = float(rng.uniform(lo, max(lo + 1, hi)))
    cx, cy, cz = p.centre_at(x)
    jitter = p.half_thickness(x) * 0.25
    return (cx, float(cy + rng.uniform(-jitter, jitter)), float(cz + rng.uniform(-jitter, jitter)))


# ------------------------------------------------------------------------------------------- helpers


def _blob(rng: np.random.Generator, centre: tuple[float, float, float], radius: float, bumpiness: float) -> Ellipsoid:
    """A round-to-ovoid lesion outline with lobulation ``bumpiness`` (fraction of q)."""
    axes = tuple(radius * rng.uniform(0.85, 1.15, 3))
    waves = WaveField.random(rng, 6, (max(4.0, 0.7 * radius), max(6.0, 1.6 * radius)))
    return Ellipsoid(centre, axes, angle=float(rng.uniform(0, np.pi)), bumps=waves, bump_amp=bumpiness)


def _duct_profile(p: Pancreas, radius: Callable[[np.ndarray], np.ndarray]) -> Pancreas:
    r = np.maximum(p.duct.r1, radius(p.duct.t))
    return replace(p, duct=replace(p.duct, r1=r, r2=r))


def _paint_lesion(cv: Canvas, blk: Block, mask: np.ndarray, hu: float | np.ndarray) -> np.ndarray:
    return cv.paint(blk, mask, hu, PANCREAS, protect=SOLID_ORGANS, lesion=True)


def _dots(
    cv: Canvas, dots: list[tuple[float, float, float, float]], hu: float, *, lesion: bool, inside: Ellipsoid | None = None
) -> None:
    for x, y, z, r in dots:
        blk = cv.block((x - r, x + r, y - r, y + r, z - r, z + r))
        if blk is None:
            continue
        d2 = (blk.x - F32(x)) ** 2 + (blk.y - F32(y)) ** 2 + (blk.z - F32(z)) ** 2
        cv.paint(blk, d2 < F32(r * r), hu, PANCREAS, protect=SOLID_ORGANS, lesion=lesion)


def _random_points(rng: np.random.Generator, centre: tuple[float, float, float], radius: float, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return np.asarray(centre) + v * (radius * rng.random((n, 1)) ** (1 / 3))


Builder = Callable[[np.random.Generator, Abdomen, tuple[float, float, float], float], tuple[Abdomen, tuple[Painter, ...]]]


# ------------------------------------------------------------------------------------------- classes


def _pdac(rng: np.random.Generator, ab: Abdomen, c: tuple[float, float, float], r: float) -> tuple[Abdomen, tuple[Painter, ...]]:
    p = ab.pancreas
    shape = _blob(rng, c, r, 0.3)
    lesion_hu = p.typical_hu(ab.t.visceral_fat) - float(rng.uniform(10, 18))
    # upstream (tail-side) duct dilation with an abrupt cut-off at the tumour, and tail atrophy
    if p.location(c[0]) != "tail":
        dilated = float(rng.uniform(2.0, 3.8))
        p = _duct_profile(p, lambda t: np.where(t > c[0] + 0.3 * r, dilated, 0.0))
        p = replace(p, atrophy_from_x=c[0] + r, atrophy_scale=float(rng.uniform(0.55, 0.8)))
    cbd = ab.cbd
    if p.location(c[0]) == "head" and rng.random() < 0.6:  # 'double duct' sign
        wide = float(rng.uniform(5, 7))
        cbd = replace(cbd, r1=np.maximum(cbd.r1, wide), r2=np.maximum(cbd.r2, wide))
    abdomen = replace(ab, pancreas=p, cbd=cbd)
    halo = 1.7

    def paint(cv: Canvas) -> None:
        blk = cv.block(shape.bbox(r * 0.8))
        if blk is None:
            return
        q = shape.q(blk)
        core = q < 1
        _paint_lesion(cv, blk, core, F32(lesion_hu))
        # ill-defined margin: the gland fades into the tumour over a few mm (no lesion label there)
        rim = (q >= 1) & (q < halo) & (cv.labels[blk.sl] == PANCREAS) & (cv.lesion[blk.sl] == 0)
        w = smoothstep((F32(halo) - np.sqrt(np.maximum(q, 0))) / F32(halo - 1)) * F32(0.6)
        mixed = cv.hu[blk.sl] * (1 - w) + F32(lesion_hu) * w
        np.copyto(cv.hu[blk.sl], mixed, where=rim)

    return abdomen, (paint,)


def _pnet(rng: np.random.Generator, ab: Abdomen, c: tuple[float, float, float], r: float) -> tuple[Abdomen, tuple[Painter, ...]]:
    p = ab.pancreas
    shape = _blob(rng, c, r, 0.05)
    lesion_hu = p.typical_hu(ab.t.visceral_fat) + float(rng.uniform(-9, 3))
    dots = []
    if rng.random() < 0.35:
        dots = [(*pt, float(rng.uniform(0.9, 2.0))) for pt in _random_points(rng, c, 0.6 * r, int(rng.integers(1, 5)))]
    calc = ab.t.calcification

    def paint(cv: Canvas) -> None:
        blk = cv.block(shape.bbox(1))
        if blk is not None:
            _paint_lesion(cv, blk, shape.q(blk) < 1, F32(lesion_hu))
        _dots(cv, dots, calc, lesion=True)

    return ab, (paint,)


def _spt(rng: np.random.Generator, ab: Abdomen, c: tuple[float, float, float], r: float) -> tuple[Abdomen, tuple[Painter, ...]]:
    p = ab.pancreas
    shape = _blob(rng, c, r, 0.04)
    solid_hu = p.typical_hu(ab.t.visceral_fat) - float(rng.uniform(2, 8))
    cyst_hu = float(rng.uniform(10, 22))  # haemorrhagic / necrotic parts, a little above water
    parts = WaveField.random(rng, 6, (0.6 * r, 1.4 * r))
    threshold = float(rng.uniform(-0.6, 0.0))  # cystic where the field is above it: about half or more
    rim_field = WaveField.random(rng, 6, (6, 14))
    calcified = rng.random() < 0.75
    calc = ab.t.calcification

    def paint(cv: Canvas) -> None:
        blk = cv.block(shape.bbox(1))
        if blk is None:
            return
        q = shape.q(blk)
        inside = q < 1
        hu = np.where(parts(blk) > threshold, F32(cyst_hu), F32(solid_hu))
        painted = _paint_lesion(cv, blk, inside, hu)
        capsule = painted & (q > (1 - 1.5 / r) ** 2)
        _paint_lesion(cv, blk, capsule, F32(solid_hu + 8))
        if calcified:
            _paint_lesion(cv, blk, capsule & (rim_field(blk) > 0.75), F32(calc))

    return ab, (paint,)


def _ipmn(rng: np.random.Generator, ab: Abdomen, c: tuple[float, float, float], r: float) -> tuple[Abdomen, tuple[Painter, ...]]:
    p = ab.pancreas
    cyst_hu = float(rng.uniform(0, 12))
    cysts = [Ellipsoid(c, (r * 0.75, r * 0.7, r * 0.8))]
    for pt in _random_points(rng, c, 0.45 * r, int(rng.integers(1, 4))):
        rr = r * float(rng.uniform(0.35, 0.6))
        cysts.append(Ellipsoid(tuple(pt), (rr, rr * 0.9, rr)))
    main_duct = rng.random() < 0.5
    dilated = float(rng.uniform(2.5, 5.0) if main_duct else rng.uniform(1.8, 2.8))
    p = _duct_profile(p, lambda t: np.full_like(t, dilated))
    # a branch duct joining the cyst to the main duct: the 'communication' that defines IPMN
    dc = p.centre_at(c[0])
    branch = Ellipsoid(tuple((np.asarray(c) + np.asarray(dc)) / 2), (2.0, 2.0 + abs(c[1] - dc[1]) / 2, 2.0 + abs(c[2] - dc[2]) / 2))
    abdomen = replace(ab, pancreas=p)
    fluid = ab.t.fluid

    def paint(cv: Canvas) -> None:
        for e in cysts:
            blk = cv.block(e.bbox(1))
            if blk is not None:
                _paint_lesion(cv, blk, e.q(blk) < 1, F32(cyst_hu))
        blk = cv.block(branch.bbox(1))
        if blk is not None:
            cv.paint(blk, (branch.q(blk) < 1) & (cv.lesion[blk.sl] == 0), fluid, PANCREAS, protect=SOLID_ORGANS)

    return abdomen, (paint,)


def _mcn(rng: np.random.Generator, ab: Abdomen, c: tuple[float, float, float], r: float) -> tuple[Abdomen, tuple[Painter, ...]]:
    p = ab.pancreas
    shape = _blob(rng, c, r, 0.02)
    content = float(rng.uniform(2, 16))
    wall_hu = p.typical_hu(ab.t.visceral_fat) - float(rng.uniform(0, 8))
    septa = [rng.normal(size=3) for _ in range(0 if rng.random() < 0.6 else int(rng.integers(1, 3)))]
    offsets = [float(rng.uniform(-0.3, 0.3) * r) for _ in septa]
    eggshell = rng.random() < 0.15
    rim_field = WaveField.random(rng, 6, (8, 16))
    calc = ab.t.calcification

    def paint(cv: Canvas) -> None:
        blk = cv.block(shape.bbox(1))
        if blk is None:
            return
        q = shape.q(blk)
        inside = _paint_lesion(cv, blk, q < 1, F32(content))
        wall = inside & (q > (1 - 1.3 / r) ** 2)
        for n, off in zip(septa, offsets, strict=True):
            n = n / np.linalg.norm(n)
            d = (blk.x - F32(c[0])) * F32(n[0]) + (blk.y - F32(c[1])) * F32(n[1]) + (blk.z - F32(c[2])) * F32(n[2])
            wall = wall | (inside & (np.abs(d - F32(off)) < 0.7))
        _paint_lesion(cv, blk, wall, F32(wall_hu))
        if eggshell:
            _paint_lesion(cv, blk, wall & (q > (1 - 1.3 / r) ** 2) & (rim_field(blk) > 0.8), F32(calc))

    return ab, (paint,)


def _scn(rng: np.random.Generator, ab: Abdomen, c: tuple[float, float, float], r: float) -> tuple[Abdomen, tuple[Painter, ...]]:
    p = ab.pancreas
    shape = _blob(rng, c, r, 0.15)
    n_cells = int(np.clip((r / 3.2) ** 3 * 1.5, 12, 90))
    seeds = _random_points(rng, c, r * 1.05, n_cells).astype(np.float32)
    cell_hu = float(rng.uniform(2, 12))
    septum_hu = p.typical_hu(ab.t.visceral_fat) + float(rng.uniform(-4, 6))
    septum = float(rng.uniform(0.6, 1.0))
    scar_r = r * float(rng.uniform(0.15, 0.25))
    sunburst = rng.random() < 0.65
    calc_r = float(rng.uniform(1.5, 3.0))
    calc = ab.t.calcification + 150

    def paint(cv: Canvas) -> None:
        blk = cv.block(shape.bbox(1))
        if blk is None:
            return
        d1 = np.full(blk.shape, np.inf, dtype=F32)
        d2 = np.full(blk.shape, np.inf, dtype=F32)
        for sx, sy, sz in seeds:
            d = np.sqrt((blk.x - sx) ** 2 + (blk.y - sy) ** 2 + (blk.z - sz) ** 2)
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
        rc = np.sqrt((blk.x - F32(c[0])) ** 2 + (blk.y - F32(c[1])) ** 2 + (blk.z - F32(c[2])) ** 2)
        solid = ((d2 - d1) < F32(septum)) | (rc < F32(scar_r))
        hu = np.where(solid, F32(septum_hu), F32(cell_hu))
        _paint_lesion(cv, blk, shape.q(blk) < 1, hu)
        if sunburst:
            _paint_lesion(cv, blk, rc < F32(calc_r), F32(calc))

    return ab, (paint,)


def _cp(rng: np.random.Generator, ab: Abdomen, c: tuple[float, float, float], r: float) -> tuple[Abdomen, tuple[Painter, ...]]:
    p = ab.pancreas
    base = float(rng.uniform(1.8, 2.8))
    beads = float(rng.uniform(0.8, 1.6))
    lam, phi = float(rng.uniform(6, 12)), float(rng.uniform(0, 2 * np.pi))
    p = _duct_profile(p, lambda t: np.maximum(1.2, base + beads * np.sin(t / lam + phi)))
    p = replace(p, scale=float(rng.uniform(0.62, 0.78)))
    # calcifications scattered through the gland (parenchymal and along the duct)
    x_lo, x_hi = p.head.c[0] - 0.5 * p.head.r[0], float(p.tube.t[-1]) - 4
    calcs = []
    for _ in range(int(rng.integers(8, 28))):
        x = float(rng.uniform(x_lo, x_hi))
        cx, cy, cz = p.centre_at(x)
        h = p.half_thickness(x) * p.scale * 0.55
        calcs.append((cx, cy + float(rng.uniform(-h, h)), cz + float(rng.uniform(-h, h)), float(rng.uniform(1.0, 2.5))))
    p = replace(p, calcifications=tuple(calcs))
    abdomen = replace(ab, pancreas=p)
    shape = _blob(rng, c, r, 0.2)
    focal_hu = p.typical_hu(ab.t.visceral_fat) - float(rng.uniform(3, 10))
    focal_calcs = [(*pt, float(rng.uniform(1.0, 2.5))) for pt in _random_points(rng, c, 0.7 * r, int(rng.integers(3, 9)))]
    calc = ab.t.calcification + 150

    def paint(cv: Canvas) -> None:
        blk = cv.block(shape.bbox(1))
        if blk is not None:
            _paint_lesion(cv, blk, shape.q(blk) < 1, F32(focal_hu))
        _dots(cv, focal_calcs, calc, lesion=True)

    return abdomen, (paint,)


def _other(rng: np.random.Generator, ab: Abdomen, c: tuple[float, float, float], r: float) -> tuple[Abdomen, tuple[Painter, ...]]:
    p = ab.pancreas
    lymphoma = rng.random() < 0.5
    shape = _blob(rng, c, r, 0.12 if lymphoma else 0.03)
    hu = p.typical_hu(ab.t.visceral_fat) + (float(rng.uniform(-4, 3)) if lymphoma else -float(rng.uniform(10, 22)))
    necrosis = (not lymphoma) and rng.random() < 0.4
    core_hu = float(rng.uniform(12, 22))

    def paint(cv: Canvas) -> None:
        blk = cv.block(shape.bbox(1))
        if blk is None:
            return
        q = shape.q(blk)
        _paint_lesion(cv, blk, q < 1, F32(hu))
        if necrosis:
            _paint_lesion(cv, blk, q < 0.16, F32(core_hu))

    return ab, (paint,)


_BUILDERS: dict[str, Builder] = {
    "pdac": _pdac, "pnet": _pnet, "spt": _spt, "ipmn": _ipmn, "mcn": _mcn, "scn": _scn, "cp": _cp, "other": _other,
}


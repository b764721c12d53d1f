"""The synthetic abdomen: every organ as a function of millimetres, fixed by the seed alone.

Why: the training engineers render the same patient at many grids (3 mm for localisation, 1.25 mm
crops for lesions), and the appliance sees it as a 512x512 series; only an analytic patient makes
those agree. ``Abdomen.sample(seed)`` draws the patient; ``Abdomen.painters()`` lists the painting
steps in order (later overwrites earlier). Frame: x to the patient's left, y posterior, z cranial,
origin at the centre of the body outline at the height of the pancreatic body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from edgescreen.models.phantom._canvas import (
    F32,
    Bbox,
    Block,
    Canvas,
    Capsule,
    Ellipsoid,
    Painter,
    Tube,
    WaveField,
    protect_lut,
    smoothstep,
    tube_from,
)
from edgescreen.models.phantom._ct_pelvis import Pelvis

PANCREAS, LIVER, SPLEEN, R_KIDNEY, L_KIDNEY, AORTA, VERTEBRAE = 1, 2, 3, 4, 5, 6, 7
SOLID_ORGANS = protect_lut(LIVER, SPLEEN, R_KIDNEY, L_KIDNEY, AORTA, VERTEBRAE)
CLEFT_LEVEL, CLEFT_WIDTH = 0.5, 0.9  # where the pancreas' fatty clefts start, and how fast they fill
SLICE_THICKNESSES = (1.0, 1.25, 2.0, 2.5, 3.0, 5.0)
SLICE_WEIGHTS = (0.08, 0.08, 0.14, 0.2, 0.32, 0.18)


@dataclass(frozen=True)
class Tissues:
    """Hounsfield values of this patient (DESIGN.md ranges, varied per case)."""

    fat: float
    visceral_fat: float
    skin: float
    muscle: float
    liver: float
    spleen: float
    kidney: float
    pancreas: float
    blood: float
    trabecular: float
    cortical: float
    disc: float
    csf: float
    fluid: float
    bile: float
    urine: float
    lung: float
    bowel_wall: float
    stool: float
    calcification: float
    # contrast enhancement of the blood (HU added; 0 without contrast, see _ct_acquisition.enhance)
    artery_gain: float = 0.0
    vein_gain: float = 0.0
    portal_gain: float = 0.0

    @property
    def artery(self) -> float:
        return self.blood + self.artery_gain

    @property
    def vein(self) -> float:
        return self.blood + self.vein_gain

    @property
    def portal_blood(self) -> float:
        return self.blood + self.portal_gain

    @classmethod
    def sample(cls, rng: np.random.Generator, age: int) -> Tissues:
        fat = rng.uniform(-118, -85)
        older = (age - 35) / 50.0
        steatosis = rng.random() < 0.08
        return cls(
            fat=fat,
            visceral_fat=fat + rng.uniform(-4, 6),
            skin=rng.uniform(25, 50),
            muscle=rng.uniform(42, 52) - 6 * older * rng.random(),
            liver=rng.uniform(30, 48) if steatosis else rng.uniform(55, 65),
            spleen=rng.uniform(40, 50),
            kidney=rng.uniform(30, 40),
            pancreas=rng.uniform(39, 50),
            blood=rng.uniform(35, 50),
            trabecular=rng.uniform(220, 300) - 90 * older * rng.uniform(0.5, 1.0),
            cortical=rng.uniform(700, 1100),
            disc=rng.uniform(70, 95),
            csf=rng.uniform(4, 14),
            fluid=rng.uniform(4, 20),
            bile=rng.uniform(0, 14),
            urine=rng.uniform(0, 12),
            lung=rng.uniform(-880, -790),
            bowel_wall=rng.uniform(34, 46),
            stool=rng.uniform(-40, 30),
            calcification=rng.uniform(250, 700),
        )


@dataclass(frozen=True)
class Pancreas:
    """Head (ellipsoid + uncinate), neck-body-tail (tube along x), duct, lobulated fatty texture."""

    head: Ellipsoid
    uncinate: Ellipsoid
    tube: Tube  # axis x from the head centre to the tail tip: (y, z) centre and (ry, rz)
    duct: Tube
    lobes: WaveField
    clefts: WaveField
    lobulation: float  # boundary bump amplitude (fraction of q)
    fat_fraction: float  # 0 = homogeneous, 0.5 = marked fatty infiltration
    hu: float
    x_neck: float  # head | body boundary (left edge of the SMV)
    x_body_tail: float  # body | tail boundary (left edge of the aorta)
    calcifications: tuple[tuple[float, float, float, float], ...] = ()  # (x, y, z, radius)
    scale: float = 1.0  # global atrophy (chronic pancreatitis)
    atrophy_from_x: float | None = None  # tail-side atrophy (upstream of an obstructing tumour)
    atrophy_scale: float = 1.0

    def bbox(self) -> Bbox:
        boxes = np.array([self.head.bbox(4), self.uncinate.bbox(4), self.tube.bbox(8)])
        return (*_union(boxes),)  # type: ignore[return-value]

    def location(self, x: float) -> str:
        if x < self.x_neck:
            return "head"
        return "body" if x < self.x_body_tail else "tail"

    def centre_at(self, x: float) -> tuple[float, float, float]:
        """The gland's centreline point at ``x`` (the head's centre for x before the tube starts)."""
        if x <= self.tube.t[0]:
            return self.head.c
        yc, zc, *_ = self.tube.profile(np.array([x], dtype=F32))
        return (float(x), float(yc[0]), float(zc[0]))

    def half_thickness(self, x: float) -> float:
        if x <= self.tube.t[0]:
            return float(min(self.head.r[:2]))
        *_, ry, rz, _ = self.tube.profile(np.array([x], dtype=F32))
        return float(min(ry[0], rz[0]))

    def typical_hu(self, fat_hu: float = -100.0) -> float:
        """The parenchyma's mean HU once the fatty clefts are mixed in (lesions are set against it).

        Evaluated on fixed sample points along the gland, so it is exact for this patient and free.
        """
        rng = np.random.default_rng(12345)
        x = rng.uniform(self.tube.t[0], self.tube.t[-1], 1500)
        yc, zc, ry, rz, _ = self.tube.profile(x.astype(F32))
        ang, rad = rng.uniform(0, 2 * np.pi, x.size), np.sqrt(rng.random(x.size)) * 0.8
        pts = np.column_stack([x, yc + ry * rad * np.cos(ang), zc + rz * rad * np.sin(ang)])
        cleft = smoothstep((self.clefts.at(pts) - CLEFT_LEVEL) / CLEFT_WIDTH)
        return float(np.mean(self.hu - self.fat_fraction * (self.hu - fat_hu) * cleft))


def _union(boxes: np.ndarray) -> tuple[float, ...]:
    return (
        float(boxes[:, 0].min()), float(boxes[:, 1].max()),
        float(boxes[:, 2].min()), float(boxes[:, 3].max()),
        float(boxes[:, 4].min()), float(boxes[:, 5].max()),
    )


@dataclass(frozen=True)
class Loop:
    """A hollow viscus segment (bowel, stomach part): wall, fluid or stool, gas on the top side."""

    capsules: tuple[Capsule | Ellipsoid, ...]
    wall: float
    content_hu: float
    gas_level_y: float  # voxels anterior (y smaller) of this are gas
    mottled: WaveField | None = None  # stool: gas bubbles where the field is high
    under_diaphragm: bool = False


@dataclass
class Abdomen:
    """One synthetic patient: sizes, positions and densities, all in mm and HU."""

    seed: int
    age: int
    sex: str
    t: Tissues
    # body outline (superellipse), layers and spine
    A: float
    B: float
    p_ant: float
    p_post: float
    fat_l: float
    fat_a: float
    fat_p: float
    muscle_t: float
    y_vb: float
    vb_r: tuple[float, float]
    vb_pitch: float
    vb_height: float
    vb_phase: float
    cav_back: float
    z_dome: float
    dome_left_drop: float
    # scan
    thickness: float
    z_top: float
    extent: float
    fov: float
    body_offset: tuple[float, float, float]  # patient (x, y, z) of the anatomical origin
    noise_sigma: float
    noise_corr_mm: float
    # everything below is placed by sample() (_place_vessels, _place_organs, _place_pancreas, _place_bowel)
    aorta: Tube = field(default=None, repr=False)  # type: ignore[assignment]
    aorta_calcs: tuple[Capsule, ...] = field(default=(), repr=False)
    ivc: Tube = field(default=None, repr=False)  # type: ignore[assignment]
    sma: Tube = field(default=None, repr=False)  # type: ignore[assignment]
    smv: Tube = field(default=None, repr=False)  # type: ignore[assignment]
    portal: tuple[Capsule, ...] = field(default=(), repr=False)
    splenic_vein: Tube = field(default=None, repr=False)  # type: ignore[assignment]
    splenic_artery: Tube = field(default=None, repr=False)  # type: ignore[assignment]
    renal_vein: Tube = field(default=None, repr=False)  # type: ignore[assignment]
    mesenteric: tuple[Capsule, ...] = field(default=(), repr=False)
    hepatic_veins: tuple[Capsule, ...] = field(default=(), repr=False)
    iliac_z: float = 0.0
    x_ao: float = 0.0
    y_ao: float = 0.0
    r_ao: float = 0.0
    x_ivc: float = 0.0
    y_ivc: float = 0.0
    x_smv: float = 0.0
    y_smv: float = 0.0
    r_smv: float = 0.0
    z_conf: float = 0.0  # splenic-portal confluence
    y_sma0: float = 0.0
    r_sma: float = 0.0
    z_sma0: float = 0.0  # SMA origin
    sma_gap: float = 10.0  # aorta to SMA (the left renal vein passes here)
    hilum_point: tuple[float, float, float] = (0.0, 0.0, 0.0)  # splenic hilum: where the tail points
    dj_flexure: tuple[float, float, float] = (0.0, 0.0, 0.0)
    liver_exclusion: Ellipsoid | None = field(default=None, repr=False)
    erector_rx: float = 25.0
    rib_pitch: float = 27.0
    rib_height: float = 9.0
    # organs
    liver: tuple[Ellipsoid, ...] = field(default=(), repr=False)
    liver_floor: tuple[float, float, float] = (0.0, 0.0, 0.0)  # z_low, slope_x, slope_y
    gallbladder: Ellipsoid | None = field(default=None, repr=False)
    spleen: Ellipsoid | None = field(default=None, repr=False)
    spleen_hilum: Ellipsoid | None = field(default=None, repr=False)
    kidneys: tuple[Ellipsoid, Ellipsoid] | None = field(default=None, repr=False)
    kidney_sinus: tuple[Ellipsoid, Ellipsoid] | None = field(default=None, repr=False)
    heart: Ellipsoid | None = field(default=None, repr=False)
    pancreas: Pancreas | None = field(default=None, repr=False)
    cbd: Tube | None = field(default=None, repr=False)
    duodenum: Loop | None = field(default=None, repr=False)
    bowel: tuple[Loop, ...] = field(default=(), repr=False)
    organ_bumps: WaveField | None = field(default=None, repr=False)
    bone_texture: WaveField | None = field(default=None, repr=False)
    pelvis: Pelvis | None = field(default=None, repr=False)
    nodes: tuple[Ellipsoid, ...] = field(default=(), repr=False)

    # ------------------------------------------------------------------------------------- sampling

    @classmethod
    def sample(cls, seed: int) -> Abdomen:
        """Draw the patient. Only ``seed`` matters: lesions and grids never change the anatomy."""
        rng = np.random.default_rng([int(seed) % 2**63, 0x0AB0])
        age = int(rng.integers(35, 86))
        sex = "M" if rng.random() < 0.5 else "F"
        t = Tissues.sample(rng, age)
        obese = float(rng.beta(2.0, 2.5))
        A = float(np.clip(128 + 52 * obese + rng.normal(0, 6) + (6 if sex == "M" else 0), 122, 192))
        B = float(np.clip(A * rng.uniform(0.62, 0.78) + 12 * obese, 88, 150))
        fat_l = float(6 + 36 * obese * rng.uniform(0.7, 1.2))
        muscle_t = float(rng.uniform(8, 14) - 0.04 * (age - 35))
        para = float(rng.uniform(38, 50))
        vb_r = (float(rng.uniform(19, 24)), float(rng.uniform(14, 17)))
        fat_p = fat_l * float(rng.uniform(0.6, 0.95))
        y_vb = B - fat_p - para - 20 - vb_r[1]
        thickness = float(rng.choice(SLICE_THICKNESSES, p=SLICE_WEIGHTS))
        z_dome = float(rng.uniform(100, 130))
        z_top = z_dome + float(rng.uniform(-5, 20))
        n = int(np.clip(round(rng.uniform(215, 320) / thickness), 60, 400))
        fov = float(np.clip(2 * max(A, B + 30) + rng.uniform(16, 70), 0.6 * 512, 0.9 * 512))
        fov = round(fov / 512, 4) * 512  # a pixel spacing with 4 decimals, as scanners write it
        sigma = float(np.clip(rng.uniform(10, 16) * (A / 155) ** 1.5 * (2.5 / thickness) ** 0.35, 8, 25))
        ab = cls(
            seed=int(seed), age=age, sex=sex, t=t, A=A, B=B,
            p_ant=float(rng.uniform(2.0, 2.4)), p_post=float(rng.uniform(2.7, 3.4)),
            fat_l=fat_l, fat_a=fat_l * float(rng.uniform(0.85, 1.35)), fat_p=fat_p, muscle_t=muscle_t,
            y_vb=y_vb, vb_r=vb_r, vb_pitch=float(rng.uniform(31, 36)), vb_height=float(rng.uniform(23, 27)),
            vb_phase=float(rng.uniform(0, 40)), cav_back=y_vb + vb_r[1] + 24,
            z_dome=z_dome, dome_left_drop=float(rng.uniform(6, 18)),
            thickness=thickness, z_top=z_top, extent=n * thickness, fov=fov,
            body_offset=(float(rng.uniform(-8, 8)), float(rng.uniform(-10, 6)), float(rng.uniform(-900, -300))),
            noise_sigma=sigma, noise_corr_mm=float(rng.uniform(0.7, 1.1)),
        )
        ab.erector_rx = float(rng.uniform(20, 28))
        ab.rib_pitch, ab.rib_height = float(rng.uniform(24, 30)), float(rng.uniform(8, 11))
        ab.organ_bumps = WaveField.random(rng, 6, (60, 140))
        ab.bone_texture = WaveField.random(rng, 6, (3, 7))
        ab._place_vessels(rng)
        ab._place_organs(rng)
        ab._place_pancreas(rng)
        # the pelvis and chest from a stream of their own: the upper abdomen of every seed is unchanged
        ab.pelvis = Pelvis.sample(np.random.default_rng([int(seed) % 2**63, 0x9E1]), ab)
        ab._place_bowel(rng)
        return ab

    @property
    def n_slices(self) -> int:
        return int(round(self.extent / self.thickness))

    @property
    def cav_a(self) -> float:
        return self.A - self.fat_l - self.muscle_t

    @property
    def cav_front(self) -> float:
        return -self.B + self.fat_a + self.muscle_t

    def _place_vessels(self, rng: np.random.Generator) -> None:
        vb_rx, vb_ry = self.vb_r
        y_front = self.y_vb - vb_ry
        r_ao = float(rng.uniform(9.5, 12.5) + 0.03 * (self.age - 35))
        x_ao = float(rng.uniform(8, 18))
        y_ao = y_front - r_ao - float(rng.uniform(1, 4))
        self.iliac_z = float(rng.uniform(-150, -115))
        z_hi = self.z_dome + 330  # the vessels run on through the chest (a chest-abdomen-pelvis series)
        self.aorta = tube_from("z", [
            (self.iliac_z, x_ao - 2, y_ao - 6, r_ao * 0.85, r_ao * 0.85),
            (0.0, x_ao, y_ao, r_ao, r_ao),
            (z_hi, x_ao - 4, y_ao + 6, r_ao * 1.05, r_ao * 1.05),
        ])
        calcs = []
        if rng.random() < (self.age - 30) / 70:
            for _ in range(int(rng.integers(2, 9))):
                z0 = float(rng.uniform(self.iliac_z + 5, 60))
                ang = float(rng.uniform(0, 2 * np.pi))
                c = np.array([x_ao + r_ao * np.cos(ang), y_ao + r_ao * np.sin(ang), z0])
                tang = np.array([-np.sin(ang), np.cos(ang), 0.0]) * rng.uniform(2, 8)
                calcs.append(Capsule(tuple(c - tang), tuple(c + tang + [0, 0, rng.uniform(0, 6)]), float(rng.uniform(0.8, 1.6))))
        self.aorta_calcs = tuple(calcs)
        x_ivc = -float(rng.uniform(18, 28))
        y_ivc = y_front - float(rng.uniform(6, 10))
        ivc_r = (float(rng.uniform(10, 14)), float(rng.uniform(6, 10)))
        self.ivc = tube_from("z", [
            (self.iliac_z + 10, x_ivc + 4, y_ivc, *ivc_r),
            (60.0, x_ivc, y_ivc - 4, *ivc_r),
            (z_hi, x_ivc - 2, y_ivc - 8, ivc_r[0] * 1.2, ivc_r[1] * 1.3),
        ])
        z_sma0 = float(rng.uniform(12, 24))
        r_sma = float(rng.uniform(3.0, 4.5))
        gap = float(rng.uniform(7, 12))  # aorta to SMA: room for the left renal vein
        y_sma0 = y_ao - r_ao - gap - r_sma
        self.sma = tube_from("z", [
            (-120.0, x_ao - 10, y_sma0 - 20, r_sma * 0.6, r_sma * 0.6),
            (-40.0, x_ao - 6, y_sma0 - 6, r_sma, r_sma),
            (z_sma0 - 12, x_ao - 3, y_sma0, r_sma, r_sma),
            (z_sma0, x_ao - 2, y_ao - r_ao + 1, r_sma, r_sma),
        ])
        self.z_sma0, self.sma_gap = z_sma0, gap
        r_smv = float(rng.uniform(5, 7))
        self.x_smv = x_ao - 4 - float(rng.uniform(12, 17))
        self.y_smv = y_sma0 - float(rng.uniform(-2, 3))
        self.z_conf = float(rng.uniform(-2, 6))
        self.r_smv = r_smv
        self.smv = tube_from("z", [
            (-120.0, self.x_smv - 4, self.y_smv - 16, r_smv * 0.6, r_smv * 0.6),
            (-40.0, self.x_smv - 1, self.y_smv - 3, r_smv, r_smv),
            (self.z_conf, self.x_smv, self.y_smv, r_smv, r_smv * 0.9),
        ])
        hilum = np.array([-0.38 * self.cav_a, y_ivc - 22, self.z_conf + 55])
        conf = np.array([self.x_smv, self.y_smv, self.z_conf])
        mid = (conf + hilum) / 2 + [6, 4, 0]
        r_pv = float(rng.uniform(6.5, 8.0))
        self.portal = (Capsule(tuple(conf), tuple(mid), r_pv), Capsule(tuple(mid), tuple(hilum), r_pv))
        self.x_ao, self.y_ao, self.r_ao = x_ao, y_ao, r_ao
        self.x_ivc, self.y_ivc = x_ivc, y_ivc
        self.y_sma0, self.r_sma = y_sma0, r_sma

    def _place_organs(self, rng: np.random.Generator) -> None:
        ca, cf, cb = self.cav_a, self.cav_front, self.cav_back
        cy = (cf + cb) / 2
        cby = (cb - cf) / 2
        zd = self.z_dome
        bumps = self.organ_bumps
        # liver: right lobe, left lobe, caudate; floor rises medially so the pancreatic head stays free
        right = Ellipsoid((-0.47 * ca, cy - 0.05 * cby, zd - 72), (0.53 * ca, 0.9 * cby, 88 * rng.uniform(0.9, 1.15)),
                          bumps=bumps, bump_amp=0.08)
        left = Ellipsoid((0.08 * ca, cf + 0.32 * cby, zd - 42), (0.5 * ca * rng.uniform(0.7, 1.1), 0.34 * cby, 38),
                         bumps=bumps, bump_amp=0.08)
        caudate = Ellipsoid((self.x_ivc + 4, self.y_ivc - 16, zd - 60), (16, 12, 24))
        self.liver = (right, left, caudate)
        top = np.array([self.x_ivc, self.y_ivc - 4, zd - 22])
        self.hepatic_veins = tuple(
            piece
            for end in ((-0.75 * ca, cy, zd - 60), (-0.3 * ca, cf + 0.2 * cby, zd - 50), (0.15 * ca, cf + 0.25 * cby, zd - 40))
            for piece in Capsule(tuple(top), tuple(np.asarray(end) + rng.normal(0, 6, 3)), float(rng.uniform(3, 5))).split()
        )
        self.liver_floor = (float(rng.uniform(-70, -35)), float(rng.uniform(0.7, 1.1)), float(rng.uniform(0.15, 0.35)))
        if rng.random() < 0.8:
            gx = -0.32 * ca + rng.uniform(-8, 8)
            self.gallbladder = Ellipsoid((gx, cf + 0.3 * cby, self._liver_floor_z(gx, cf + 0.3 * cby) + 18),
                                         (rng.uniform(11, 17), rng.uniform(11, 17), rng.uniform(25, 38)), angle=0.5)
        # spleen: its hilum lies lateral to the aorta at about the aorta's depth, so the pancreatic
        # tail runs posterolaterally at well under 45 degrees; the spleen sits behind and outside it
        ang = float(rng.uniform(0.35, 0.8))  # outward direction (posterolateral) from the hilum
        out = np.array([np.cos(ang), np.sin(ang)])
        sr = (rng.uniform(42, 58), rng.uniform(19, 25), rng.uniform(42, 56))
        hx = min(self.x_ao + rng.uniform(55, 80), 0.92 * ca - out[0] * (2 * sr[1] + 2))
        hy = self.y_ao + rng.uniform(-12, 6)
        hz = float(rng.uniform(12, 32))
        sc = (hx + out[0] * (sr[1] + 2), hy + out[1] * (sr[1] + 2), hz + rng.uniform(6, 16))
        self.spleen = Ellipsoid(sc, sr, angle=np.pi / 2 + ang, bumps=bumps, bump_amp=0.06)
        hc = (sc[0] - out[0] * sr[1] * 1.6, sc[1] - out[1] * sr[1] * 1.6, sc[2] - 6)
        self.spleen_hilum = Ellipsoid(hc, (sr[1] * 1.0, sr[1] * 1.0, sr[2] * 0.55))
        self.hilum_point = (hx - out[0] * 3, hy - out[1] * 3, hz)
        # kidneys: left higher; hilum anteromedial; upper pole a little more medial (ignored: small)
        vb_rx = self.vb_r[0]
        kids, sinus = [], []
        for side, dz in ((-1, -float(rng.uniform(10, 22))), (1, 0.0)):
            ru, rv, rz = rng.uniform(24, 29), rng.uniform(19, 23), rng.uniform(48, 58)
            kx = side * (vb_rx + 24 + ru * 0.8 + rng.uniform(0, 8))
            ky = self.y_vb + rng.uniform(0, 8)
            kz = rng.uniform(-30, -15) + dz
            turn = side * rng.uniform(0.45, 0.75)
            k = Ellipsoid((kx, ky, kz), (ru, rv, rz), angle=turn, bumps=bumps, bump_amp=0.03)
            # hilum: towards the spine and the front
            hx, hy = kx - side * ru * 0.75 * np.cos(turn), ky - ru * 0.55
            kids.append(k)
            sinus.append(Ellipsoid((hx, hy, kz), (ru * 0.42, rv * 0.5, rz * 0.42), angle=turn))
        self.kidneys = (kids[0], kids[1])
        self.kidney_sinus = (sinus[0], sinus[1])
        self.heart = Ellipsoid((0.12 * ca, cf + 0.42 * cby, zd + 45), (0.5 * ca, 0.45 * cby, 62))
        # left renal vein: from the left renal hilum, in front of the aorta, into the IVC
        lk = kids[1]
        z_lrv = min(lk.c[2] + float(rng.uniform(8, 18)), self.z_sma0 - 14)
        r_lrv = float(rng.uniform(3.5, 5.0))
        y_cross = self.y_ao - self.r_ao - min(r_lrv * 0.8, self.sma_gap / 2) - 0.5
        self.renal_vein = tube_from("x", [
            (self.x_ivc, self.y_ivc, z_lrv, r_lrv * 1.4, r_lrv * 1.2),
            (self.x_ao, y_cross, z_lrv, r_lrv * 0.8, r_lrv),
            (self.x_ao + self.r_ao + 8, y_cross + 4, z_lrv, r_lrv * 1.2, r_lrv * 1.1),
            (lk.c[0] - lk.r[0] * 0.5, lk.c[1] - lk.r[0] * 0.4, lk.c[2], r_lrv, r_lrv),
        ], step=2.0)

    def _liver_floor_z(self, x: float | np.ndarray, y: float | np.ndarray) -> float | np.ndarray:
        z_low, sx, sy = self.liver_floor
        return z_low + sx * (x + self.cav_a) * 0.5 + sx * np.maximum(x + 0.2 * self.cav_a, 0) * 0.6 - sy * (y - self.cav_front) * 0.3

    def _place_pancreas(self, rng: np.random.Generator) -> None:
        r_smv = self.r_smv
        neck_ry, neck_rz = float(rng.uniform(7.5, 9.5)), float(rng.uniform(11, 14))
        body_ry, body_rz = float(rng.uniform(9.5, 12.5)), float(rng.uniform(12, 15))
        tail_ry, tail_rz = float(rng.uniform(9, 13)), float(rng.uniform(11, 14))
        x_n = self.x_smv
        y_n = self.y_smv - r_smv - neck_ry - float(rng.uniform(0.5, 2.5))
        z_n = self.z_conf - float(rng.uniform(0, 4))
        x_b = self.x_ao + float(rng.uniform(4, 14))
        y_b = self.y_sma0 - self.r_sma - body_ry - float(rng.uniform(5, 9))
        hx, hy, hz = self.hilum_point
        lk = self.kidneys[1]
        tip = np.array([hx - 3, hy, hz]) + rng.normal(0, 3, 3)
        tip[1] = min(tip[1], y_b + 0.8 * (tip[0] - x_b))  # the tail runs at under ~40 degrees
        # keep the tail in front of the left kidney (the tail runs anterior to its upper pole)
        kidney_front = lk.c[1] - lk.r[1] - 4
        mid_x = x_b + 0.55 * (tip[0] - x_b)
        mid_y = min(y_b + 0.45 * (tip[1] - y_b) + rng.uniform(-6, 8), kidney_front - tail_ry)
        mid_z = 0.5 * (hz + 0.0) + rng.uniform(-8, 4)
        tip[1] = min(tip[1], kidney_front - tail_ry * 0.5)
        hrx, hry, hrz = float(rng.uniform(15, 20)), float(rng.uniform(13, 16)), float(rng.uniform(21, 28))
        hx0 = x_n - hrx * 0.9 - float(rng.uniform(4, 10))
        hy0 = min(y_n + float(rng.uniform(2, 10)), self.y_ivc - 9 - hry * 0.85)
        hz0 = -float(rng.uniform(6, 16))
        head = Ellipsoid((hx0, hy0, hz0), (hrx, hry, hrz), angle=float(rng.uniform(-0.3, 0.3)))
        unc = Ellipsoid((x_n - 2, self.y_smv + r_smv * 0.5, hz0 - hrz * 0.45), (hrx * 0.7, float(rng.uniform(6, 8)), hrz * 0.5))
        rows = [
            (hx0, hy0, hz0, hry * 0.8, hrz * 0.7),
            (x_n, y_n, z_n, neck_ry, neck_rz),
            (x_b, y_b, 0.0, body_ry, body_rz),
            (mid_x, mid_y, mid_z, tail_ry, tail_rz),
            (tip[0] - 6, tip[1] - 2, tip[2], tail_ry * 0.85, tail_rz * 0.8),
            (tip[0], tip[1], tip[2], tail_ry * 0.25, tail_rz * 0.25),
        ]
        rows = _monotone_x(rows)
        tube = tube_from("x", rows, step=2.0)
        tube = _slope_corrected(tube)
        # main duct: slightly posterior of the centreline, down to the ampulla in the head
        d_r = float(rng.uniform(0.8, 1.4))
        duct_rows = [(hx0 - hrx * 0.55, hy0 + 2, hz0 - hrz * 0.45, d_r, d_r)] + [
            (x, y + ry * 0.15, z, d_r, d_r) for x, y, z, ry, _ in rows[1:-1]
        ]
        duct = tube_from("x", duct_rows, step=2.0)
        fat_fraction = float(np.clip(rng.uniform(-0.05, 0.25) + (self.age - 35) / 110, 0, 0.55))
        # the liver's underside stays above the pancreatic head and the duodenal C-loop
        self.liver_exclusion = Ellipsoid((hx0 - 8, hy0, hz0 + 4), (hrx + 30, hry + 32, hrz + 24))
        self.pancreas = Pancreas(
            head=head, uncinate=unc, tube=tube, duct=duct,
            lobes=WaveField.random(rng, 8, (7, 16)), clefts=WaveField.random(rng, 10, (3.5, 8)),
            lobulation=float(rng.uniform(0.05, 0.1) + 0.12 * fat_fraction), fat_fraction=fat_fraction,
            hu=self.t.pancreas, x_neck=x_n + r_smv, x_body_tail=self.x_ao + self.r_ao,
        )
        # common bile duct: down the back of the head to the ampulla
        cbd_r = float(rng.uniform(2.5, 4.0))
        cx, cy = hx0 - hrx * 0.35, hy0 + hry * 0.55
        self.cbd = tube_from("z", [
            (hz0 - hrz * 0.4, cx - 3, cy - 2, cbd_r * 0.7, cbd_r * 0.7),
            (hz0 + hrz * 0.5, cx, cy, cbd_r, cbd_r),
            (hz0 + hrz + 30, cx - 6, cy - 8, cbd_r, cbd_r),
        ])
        # splenic vein along the back of the body and tail; splenic artery wavy along its top
        sv_r = float(rng.uniform(3.5, 5.0))
        sv_rows = [(x, y + ry * 0.95 + sv_r * 0.6, z - 1, sv_r, sv_r) for x, y, z, ry, _ in rows[1:-1]]
        sv_rows[0] = (self.x_smv, self.y_smv - 1, self.z_conf + 2, sv_r * 1.1, sv_r)
        self.splenic_vein = tube_from("x", sv_rows + [(tip[0] + 4, tip[1] + 4, tip[2], sv_r, sv_r)], step=2.0)
        sa_r = float(rng.uniform(2.0, 3.0))
        xs = np.arange(self.x_ao, tip[0] + 6, 4.0)
        wav = float(rng.uniform(8, 14))
        sa_rows = []
        for x in xs:
            c = self.pancreas.centre_at(float(x))
            sa_rows.append((x, c[1] + 4 + 3 * np.sin(x / wav), c[2] + self.pancreas.half_thickness(float(x)) + 4 + 3 * np.cos(x / wav),
                            sa_r, sa_r))
        self.splenic_artery = Tube("x", *np.asarray(sa_rows, dtype=np.float64).T)
        # duodenal C-loop around the head: D1 from the pylorus, D2 down, D3 across, D4 up to the flexure
        rd = float(rng.uniform(8, 12))
        x2 = hx0 - hrx - rd - float(rng.uniform(0.5, 3))
        pts = [
            (x2 + 22, self.cav_front + 0.25 * (self.cav_back - self.cav_front), hz0 + hrz + 18),
            (x2, hy0 - 4, hz0 + hrz + 6),
            (x2 - 2, hy0, hz0 - hrz * 0.3),
            (x2 + 6, hy0 + 4, hz0 - hrz - rd),
            (self.x_ao - 4, self.y_ao - self.r_ao - 12, hz0 - hrz - rd - 6),
            (self.x_ao + self.r_ao + 16, self.y_ao - self.r_ao - 14, hz0 - hrz),
            (self.x_ao + self.r_ao + 22, y_b + 6, -body_rz - rd - 3),
        ]
        radii = [rd, rd, rd, rd * 0.8, rd * 0.6, rd * 0.75, rd * 0.8]
        caps = _split(Capsule(pts[i], pts[i + 1], min(radii[i], radii[i + 1])) for i in range(len(pts) - 1))
        gas = rng.random() < 0.35
        self.duodenum = Loop(caps, wall=2.0, content_hu=self.t.fluid + float(rng.uniform(0, 10)),
                             gas_level_y=(min(p[1] for p in pts) - rd + float(rng.uniform(3, 8))) if gas else -1e9)
        self.dj_flexure = pts[-1]

    def _place_bowel(self, rng: np.random.Generator) -> None:
        """Colon, stomach, small bowel and mesentery.

        Real abdomens are crowded: dozens of small-bowel loops, many collapsed to soft-tissue density
        (30-50 HU, the pancreas' own range), others fluid-filled, gas-distended or with mixed content,
        fill the infracolic abdomen and the pelvis and lie beside the pancreatic body and tail; the
        stomach and duodenum may be collapsed or hold food. A model that learns the pancreas by its
        density alone finds it on any of them, so the phantom has them all.
        """
        ca, cf, cb = self.cav_a, self.cav_front, self.cav_back
        depth = cb - cf
        pel = self.pelvis
        z_bot = pel.z_promontory - float(rng.uniform(0, 25))  # caecum and descending colon end in the iliac fossae
        t = self.t
        oral = rng.random() < 0.12  # positive oral contrast in this patient's small bowel
        loops: list[Loop] = []
        # colon: ascending, hepatic flexure, transverse (sagging), splenic flexure, descending, sigmoid
        ra, rt, rdsc = rng.uniform(18, 26), rng.uniform(15, 22), rng.uniform(12, 18)
        y_lat = cf + 0.5 * depth
        y_rect = self.y_vb + self.vb_r[1] - 12
        path = [
            (-0.7 * ca, y_lat, z_bot, ra),
            (-0.72 * ca, y_lat - 0.05 * depth, -70, ra),
            (-0.62 * ca, cf + 0.3 * depth, self._liver_floor_z(-0.62 * ca, cf + 0.3 * depth) - ra - 4, ra),
            (-0.25 * ca, cf + rt + 4, -45 - rng.uniform(0, 60), rt),
            (0.25 * ca, cf + rt + 4, -50 - rng.uniform(0, 60), rt),
            (0.72 * ca, cf + 0.3 * depth, self.z_dome - 110 + rng.uniform(-10, 10), rt),
            (0.76 * ca, cf + 0.55 * depth, -60, rdsc),
            (0.66 * ca, cf + 0.5 * depth, z_bot, rdsc),
            (0.3 * ca, cf + 0.35 * depth, pel.z_promontory - rng.uniform(30, 60), rdsc),  # sigmoid
            (-0.05 * ca, y_rect - 10, pel.z_promontory - rng.uniform(40, 70), rdsc),
            (0.0, y_rect, pel.z_floor + 10, rdsc * 1.1),  # rectum
            (0.0, y_rect - 5, pel.z_floor - 30, rdsc * 0.8),
        ]
        for i in range(len(path) - 1):
            (x0, y0, z0, r0), (x1, y1, z1, r1) = path[i], path[i + 1]
            seg = Capsule((x0, y0, z0), (x1, y1, z1), float(min(r0, r1)))
            lvl = min(y0, y1) - min(r0, r1) + float(rng.uniform(4, 14))
            stool = t.stool + float(rng.uniform(-15, 15))
            loops.append(Loop(seg.split(), wall=2.0, content_hu=stool, gas_level_y=lvl if rng.random() < 0.8 else -1e9,
                              mottled=WaveField.random(rng, 10, (5, 18))))
        # stomach: fundus, body, antrum; fluid with an air-fluid level, food, or collapsed with thick folds
        p = self.pancreas
        tail_top = float(np.max(p.tube.c2 + p.tube.r2))
        f_rz = float(rng.uniform(30, 40))
        fundus = Ellipsoid((0.42 * ca, cf + 0.55 * depth, max(self.z_dome - 42, tail_top + f_rz + 6)),
                           (rng.uniform(30, 42), 0.27 * depth, f_rz))
        b_ry = 0.22 * depth
        sx = 0.3 * ca
        front_at = float(np.interp(sx, p.tube.t, p.tube.c1 - p.tube.r1))
        body = Ellipsoid((sx, min(cf + 0.32 * depth, front_at - b_ry - 6), self.z_dome - 80),
                         (rng.uniform(32, 45), b_ry, rng.uniform(30, 40)), angle=0.4)
        pancreas_front = min(p.tube.c1 - p.tube.r1)
        antrum = Ellipsoid((self.x_smv + 10, min(cf + 0.2 * depth, pancreas_front - 14), 22 + rng.uniform(0, 10)),
                           (rng.uniform(28, 38), rng.uniform(10, 15), rng.uniform(12, 18)), angle=-0.2)
        lvl = cf + float(rng.uniform(0.15, 0.45)) * depth
        kind = rng.random()
        if kind < 0.5:  # fluid, sometimes with food
            loops.append(Loop((fundus, body, antrum), wall=4.0, content_hu=t.fluid + float(rng.uniform(0, 25)), gas_level_y=lvl,
                              mottled=WaveField.random(rng, 6, (8, 20)) if rng.random() < 0.5 else None, under_diaphragm=True))
        elif kind < 0.8:  # food: mottled soft tissue with gas bubbles
            loops.append(Loop((fundus, body, antrum), wall=4.0, content_hu=float(rng.uniform(10, 55)), gas_level_y=lvl,
                              mottled=WaveField.random(rng, 8, (6, 16)), under_diaphragm=True))
        else:  # collapsed: thick rugal folds of soft tissue, a little gas or fluid in the middle
            shrink = float(rng.uniform(0.45, 0.7))
            parts = tuple(Ellipsoid(e.c, tuple(r * shrink for r in e.r), e.angle) for e in (fundus, body, antrum))
            loops.append(Loop(parts, wall=float(rng.uniform(8, 14)), content_hu=t.fluid, gas_level_y=lvl,
                              under_diaphragm=True))
        # small bowel: jejunum near the duodenojejunal flexure (beside the pancreatic body and tail), then
        # jejunum and ileum filling the infracolic abdomen and the pelvis down to the bladder
        n_loops = int(rng.integers(40, 60))
        dj = np.array(self.dj_flexure)
        y_back = max(self.y_ao - self.r_ao - 10, cf + 20)
        for i in range(n_loops):
            r = float(rng.uniform(8, 15))
            if i < 8:  # jejunum in the left upper quadrant, beside the pancreatic body and tail
                q0 = dj + [rng.uniform(5, 55), rng.uniform(-35, 0), rng.uniform(-50, 15)]
                lo = np.array([self.x_ao, cf + r + 2, -70.0])
                hi = np.array([0.8 * ca, y_back + 30, 25.0])
            else:
                pelvic = i >= n_loops - 10
                z_hi = pel.z_promontory - 10 if pelvic else -15.0
                q0 = np.array([rng.uniform(-0.6, 0.6) * ca, rng.uniform(cf + r + 3, y_back + 25),
                               rng.uniform(pel.z_femoral + 40, z_hi)])
                lo = np.array([-0.72 * ca, cf + r + 2, pel.z_femoral + 30])
                hi = np.array([0.72 * ca, (y_rect - 15) if pelvic else y_back + 30, z_hi])
            pts = [q0]
            direction = rng.normal(size=3)
            for _ in range(int(rng.integers(4, 11))):
                direction = direction + rng.normal(0, 0.9, 3)
                direction /= np.linalg.norm(direction)
                pts.append(np.clip(pts[-1] + direction * rng.uniform(18, 32), lo, hi))
            caps = _split(Capsule(tuple(pts[j]), tuple(pts[j + 1]), r) for j in range(len(pts) - 1))
            loops.append(self._small_bowel_loop(rng, caps, r, pts, oral))
        self.bowel = tuple(loops)
        # small mesenteric vessels fanning out in front of the SMA/SMV below the pancreas, and lymph nodes
        mes = []
        for _ in range(int(rng.integers(14, 30))):
            z0 = float(rng.uniform(-150, -15))
            a = np.array([self.x_smv + rng.uniform(-4, 16), self.y_smv - 6 - 0.15 * (-z0), z0])
            b = a + [rng.uniform(-60, 60), rng.uniform(-35, 0), rng.uniform(-35, 10)]
            b[1] = max(b[1], cf + 6)
            mes.append(Capsule(tuple(a), tuple(b), float(rng.uniform(1.2, 2.6))))
        self.mesenteric = tuple(mes)
        nodes = []
        for _ in range(int(rng.integers(4, 14))):
            c = (float(self.x_smv + rng.uniform(-50, 60)), float(self.y_smv - rng.uniform(5, 45)), float(rng.uniform(-130, -20)))
            nodes.append(Ellipsoid(c, (float(rng.uniform(2.5, 6)), float(rng.uniform(2, 4.5)), float(rng.uniform(3, 7)))))
        self.nodes = tuple(nodes)

    def _small_bowel_loop(self, rng: np.random.Generator, caps: tuple[Capsule, ...], r: float, pts: list, oral: bool) -> Loop:
        """One loop's wall and content: collapsed, fluid-filled, gas-distended or mixed (feculent, oral contrast)."""
        t = self.t
        kind = rng.random()
        top = min(q[1] for q in pts) - r
        if kind < 0.4:  # collapsed: soft tissue throughout, a trace of fluid or gas in the middle
            return Loop(caps, wall=max(r - float(rng.uniform(0.5, 2.5)), 1.5), content_hu=t.fluid,
                        gas_level_y=top + 1.0 if rng.random() < 0.3 else -1e9)
        if kind < 0.7:  # fluid (or oral contrast)
            content = float(rng.uniform(150, 450)) if oral and rng.random() < 0.7 else t.fluid + float(rng.uniform(-2, 15))
            return Loop(caps, wall=float(rng.uniform(1.5, 3.0)), content_hu=content,
                        gas_level_y=top + float(rng.uniform(2, 2 * r)) if rng.random() < 0.35 else -1e9)
        if kind < 0.82:  # gas-distended
            return Loop(caps, wall=float(rng.uniform(1.2, 2.0)), content_hu=t.fluid, gas_level_y=top + 2 * r * float(rng.uniform(0.6, 1.0)))
        # mixed, feculent content with gas bubbles (terminal ileum)
        return Loop(caps, wall=2.0, content_hu=float(rng.uniform(0, 40)), gas_level_y=top + float(rng.uniform(1, r)),
                    mottled=WaveField.random(rng, 8, (4, 12)))

    # ------------------------------------------------------------------------------------- painting

    def painters(self, lesion: tuple[Painter, ...] = ()) -> list[Painter]:
        """The painting steps in order; ``lesion`` goes after the gland and the duodenum, before vessels."""
        return [
            self.paint_body, self.paint_table, self.paint_thorax, self.paint_chest, self.paint_ribs,
            self.paint_pelvic_soft, self.paint_bowel, self.paint_bladder, self.paint_nodes,
            self.paint_liver, self.paint_spleen, self.paint_kidneys, self.paint_back_muscles, self.paint_spine,
            self.paint_pelvic_bones, self.paint_great_vessels, self.paint_pancreas, self.paint_duodenum, *lesion, self.paint_visceral_vessels,
        ]

    def _layer_insets(self) -> list[tuple[float, float, float]]:
        """Nested outlines (x, front, back insets in mm): skin, fat, muscle, rib zone, cavity."""
        # the cavity reaches the back wall beside the spine (paravertebral gutters for the kidneys);
        # the back muscles are painted over it afterwards
        cav_back = self.fat_p + self.muscle_t * 0.8
        lat, front = self.fat_l + self.muscle_t, self.fat_a + self.muscle_t
        rib = 9.0
        return [
            (0.0, 0.0, 0.0),
            (2.2, 2.2, 2.2),
            (self.fat_l, self.fat_a, self.fat_p),
            (max(lat - rib, self.fat_l), max(front - rib, self.fat_a), max(cav_back - rib, self.fat_p)),
            (lat, front, cav_back),
        ]

    def paint_body(self, cv: Canvas) -> None:
        """Skin, subcutaneous fat, muscle wall, rib zone and cavity, as a nested layer code.

        The outline widens slowly towards the pelvis; one slice image serves every slice whose
        width differs by under 0.25 mm (cached for the whole render), so the body costs one copy.
        """
        widen = 1.0 - 0.00022 * cv.z.astype(np.float64)  # a little wider towards the pelvis
        cv.body_keys = []
        for k, s in enumerate(widen):
            key = ("body", round(s * self.A / 0.25))
            cv.body_keys.append(key)
            cached = cv.shared.get(key)
            if cached is None:
                cached = self._body_slice(cv, key[1] * 0.25 / self.A)
                cv.shared[key] = cached
            cv.layers[k], cv.hu[k] = cached
        # linea alba: a thin fatty seam between the recti
        blk = cv.block((-3, 3, -self.B, self.cav_front + 1, -1e4, 1e4))
        if blk is not None:
            cv.paint(blk, (cv.layers[blk.sl] >= 3) & (cv.layers[blk.sl] < CAVITY), self.t.fat)

    def _body_slice(self, cv: Canvas, s: float) -> tuple[np.ndarray, np.ndarray]:
        """(layer code, HU) of one axial slice; each outline is a superellipse (x exponent p_ant)."""
        y, x = cv.y[:, None], np.abs(cv.x)[None, :]
        code = np.zeros((cv.y.size, cv.x.size), dtype=np.uint8)
        for inset_x, inset_f, inset_b in self._layer_insets():
            a = (self.A - inset_x) * s
            b = (self.B - (inset_f + inset_b) / 2.0) * s
            dy = y - F32((inset_f - inset_b) / 2.0)
            p = np.where(dy < 0, F32(self.p_ant), F32(self.p_post))
            code += ((x / F32(a)) ** F32(self.p_ant) + (np.abs(dy) / F32(b)) ** p < 1).astype(np.uint8)
        t = self.t
        lut = np.array([-1000.0, t.skin, t.fat, t.muscle, t.muscle, t.visceral_fat], dtype=F32)
        return code, lut[code]

    def paint_table(self, cv: Canvas) -> None:
        blk = cv.block((-230, 230, self.B - 40, self.B + 60, -1e4, 1e4))
        if blk is None:
            return
        top = F32(self.B + 6) - F32(0.0009) * blk.x**2
        d = blk.y - top
        board = (d > 0) & (d < 16) & (np.abs(blk.x) < 220) & (cv.layers[blk.sl] == 0)
        cv.paint(blk, board, -160.0)
        cv.paint(blk, board & ((d < 1.8) | (d > 14.2)), 280.0)

    def diaphragm_z(self, blk: Block) -> np.ndarray:
        """Height of the diaphragm over (y, x): two domes, lower at the back (costophrenic recesses)."""
        ca = self.cav_a
        xr = (blk.x + 0.4 * ca) / (0.55 * ca)
        xl = (blk.x - 0.4 * ca) / (0.55 * ca)
        dome = np.maximum(-30 * xr**2, -30 * xl**2 - self.dome_left_drop)
        post = -40 * np.clip(blk.y / (self.cav_back + 1e-3), 0, 1.2) ** 2
        return (F32(self.z_dome) + dome + post).astype(F32)

    def paint_thorax(self, cv: Canvas) -> None:
        blk = cv.block((-self.A, self.A, -self.B, self.B, self.z_dome - 90, 1e4))
        if blk is None:
            return
        above = blk.z > self.diaphragm_z(blk)
        cage = cv.layers[blk.sl] == CAVITY
        cv.paint(blk, above & cage, self.t.lung)
        hq = self.heart.q(blk)
        cv.paint(blk, above & (hq < 1.25) & cage, self.t.visceral_fat)
        cv.paint(blk, above & (hq < 1), self.t.artery + 3)

    def paint_ribs(self, cv: Canvas) -> None:
        """Lower ribs: short oblique bony bars in the inner body wall, above the costal margin."""
        for k, z in enumerate(cv.z):
            if z < self.z_dome - 150:
                continue
            key = ("ribzone", cv.body_keys[k])
            zone = cv.shared.get(key)
            if zone is None:
                yi, xi = np.nonzero(cv.layers[k] == RIB_ZONE)
                zone = (yi, xi, cv.y[yi], cv.x[xi])
                cv.shared[key] = zone
            yi, xi, y, x = zone
            ax = np.abs(x)
            costal = F32(self.z_dome - 95) - F32(45) * (ax / F32(self.cav_a)) ** 2 + F32(35) * np.clip(-y / F32(self.B), 0, 1)
            phase = (z + F32(0.45) * y - F32(0.2) * ax) / F32(self.rib_pitch)
            rib = (z > costal) & ((phase - np.floor(phase)) < F32(self.rib_height / self.rib_pitch))
            rib &= ax > F32(self.vb_r[0] + 22)
            cartilage = (y < F32(-0.5 * self.B)) & (ax < F32(0.5 * self.A))
            hu = np.where(cartilage, F32(120.0), F32(0.5 * self.t.cortical + 0.5 * self.t.trabecular))
            cv.hu[k, yi[rib], xi[rib]] = hu[rib]

    def paint_chest(self, cv: Canvas) -> None:
        self.pelvis.paint_chest(cv, self.t, self.z_dome)

    def paint_pelvic_soft(self, cv: Canvas) -> None:
        self.pelvis.paint_soft(cv, self.t, CAVITY)

    def paint_bladder(self, cv: Canvas) -> None:
        self.pelvis.paint_bladder(cv, self.t, CAVITY)

    def paint_pelvic_bones(self, cv: Canvas) -> None:
        self.pelvis.paint_bones(cv, self.t)

    def paint_nodes(self, cv: Canvas) -> None:
        """Small mesenteric lymph nodes: soft-tissue dots in the mesenteric fat."""
        for node in self.nodes:
            blk = cv.block(node.bbox())
            if blk is not None:
                cv.paint(blk, (node.q(blk) < 1) & (cv.layers[blk.sl] == CAVITY), self.t.bowel_wall + 2)

    def paint_bowel(self, cv: Canvas) -> None:
        for loop in self.bowel:
            paint_loop(cv, loop, self.t, ceiling=self.diaphragm_z if loop.under_diaphragm else None)

    def paint_duodenum(self, cv: Canvas) -> None:
        paint_loop(cv, self.duodenum, self.t, protect=protect_lut(AORTA, VERTEBRAE, R_KIDNEY, L_KIDNEY, LIVER))

    def _liver_allowed(self, cv: Canvas, blk: Block) -> np.ndarray:
        """Below the diaphragm, above the liver's floor, inside the cavity, right of the spine."""
        zd = self.diaphragm_z(blk) - F32(3)
        floor = self._liver_floor_z(blk.x, blk.y).astype(F32)
        wavy = F32(10) * self.organ_bumps(blk)[:1, :, :] if blk.shape[0] else F32(0)
        medial = (blk.x - 0.55 * (blk.y - self.y_vb) + wavy) < F32(self.x_ao - self.r_ao)
        floor = np.where(medial, floor, F32(1e4))
        return (blk.z < zd) & (blk.z > floor) & (cv.layers[blk.sl] == CAVITY) & (self.liver_exclusion.q(blk) > 1)

    def paint_liver(self, cv: Canvas) -> None:
        right, left, caudate = self.liver
        for lobe in (right, left, caudate):
            blk = cv.block(lobe.bbox())
            if blk is None:
                continue
            allowed = self._liver_allowed(cv, blk)
            if lobe is left:
                allowed = (blk.z < self.diaphragm_z(blk) - F32(3)) & (cv.layers[blk.sl] == CAVITY)
            cv.paint(blk, (lobe.q(blk) < 1) & allowed, self.t.liver, LIVER)
        for vein in self.hepatic_veins:  # unenhanced blood is a little darker than liver
            blk = cv.block(vein.bbox())
            if blk is not None:
                mask = (vein.sdf(blk) < 0) & (cv.labels[blk.sl] == LIVER)
                cv.paint(blk, mask, self.t.portal_blood, LIVER)
        if self.gallbladder is not None:
            blk = cv.block(self.gallbladder.bbox())
            if blk is not None:
                gq = self.gallbladder.q(blk)
                cv.paint(blk, gq < 1, self.t.bowel_wall)
                cv.paint(blk, gq < (1 - 2.0 / self.gallbladder.rmin) ** 2, self.t.bile)

    def paint_spleen(self, cv: Canvas) -> None:
        blk = cv.block(self.spleen.bbox())
        if blk is None:
            return
        inside = (self.spleen.q(blk, self.organ_bumps(blk)) < 1) & (self.spleen_hilum.q(blk) > 1)
        inside &= (blk.z < self.diaphragm_z(blk) - 3) & (cv.layers[blk.sl] == CAVITY)
        cv.paint(blk, inside, self.t.spleen, SPLEEN)

    def paint_kidneys(self, cv: Canvas) -> None:
        for kid, sinus, label in zip(self.kidneys, self.kidney_sinus, (R_KIDNEY, L_KIDNEY), strict=True):
            blk = cv.block(kid.bbox(4))
            if blk is None:
                continue
            kq = kid.q(blk, self.organ_bumps(blk))
            cv.paint(blk, kq < 1.15, self.t.visceral_fat - 5)  # perirenal fat
            cv.paint(blk, kq < 1, self.t.kidney, label)
            sq = sinus.q(blk)
            cv.paint(blk, (sq < 1) & (kq < 1.05), self.t.visceral_fat + 10)
            cv.paint(blk, (sq < 0.35) & (kq < 1), self.t.urine)

    def paint_back_muscles(self, cv: Canvas) -> None:
        """Erector spinae beside the spinous processes, quadratus lumborum, psoas (growing caudally)."""
        mus = self.t.muscle - 2
        vb_rx, vb_ry = self.vb_r
        y_front = self.y_vb + vb_ry + 4
        y_back = self.B - self.fat_p - 1
        es_rx, es_ry = self.erector_rx, (y_back - y_front) / 2
        blk = cv.block((-2 * es_rx - 4, 2 * es_rx + 4, y_front, y_back, -1e4, 1e4))
        if blk is not None:
            for side in (-1, 1):
                q = ((blk.x - F32(side * (es_rx + 2))) / F32(es_rx)) ** 2 + ((blk.y - F32(y_front + es_ry)) / F32(es_ry)) ** 2
                cv.paint(blk, (q < 1) & (cv.layers[blk.sl] >= 3), mus)
        blk = cv.block((-2 * es_rx - 60, 2 * es_rx + 60, y_front - 20, y_back, -1e4, self.z_dome - 90))
        if blk is not None:
            grow = np.clip((F32(self.z_dome - 90) - blk.z) / F32(60), 0.2, 1.0)
            for side in (-1, 1):
                cx = F32(side * (2 * es_rx + 14))
                rx, ry = F32(18) * grow, F32(10) * grow
                q = ((blk.x - cx) / rx) ** 2 + ((blk.y - F32(y_front + 6)) / ry) ** 2
                cv.paint(blk, (q < 1) & (cv.labels[blk.sl] == 0), mus)
        blk = cv.block((-140, 140, self.y_vb - 60, self.y_vb + 40, self.pelvis.z_femoral, -5))
        if blk is None:
            return
        r = F32(22) * np.clip((F32(-5) - blk.z) / F32(110), 0.05, 1.0)
        lateral = np.clip((F32(self.pelvis.z_promontory) - blk.z) * F32(0.5), 0, 50)
        for side in (-1, 1):
            cx = side * (vb_rx + r * 0.85 + 1 + lateral)
            q = ((blk.x - cx) / r) ** 2 + ((blk.y - F32(self.y_vb) + lateral * F32(0.6)) / (r * 0.9)) ** 2
            cv.paint(blk, q < 1, mus)

    def _vertebral_level(self, z: np.ndarray) -> np.ndarray:
        """mm above the current level's lower endplate (vertebral bodies repeat every pitch)."""
        phase = (z - F32(self.vb_phase)) / F32(self.vb_pitch)
        return (phase - np.floor(phase)) * F32(self.vb_pitch)

    def paint_spine(self, cv: Canvas) -> None:
        """Vertebral bodies (cortex + textured trabecular bone), discs, arch, processes, canal."""
        vb_rx, vb_ry = self.vb_r
        yv, t = self.y_vb, self.t
        z_low = self.pelvis.z_promontory  # below it: the sacrum (painted with the pelvis)
        blk = cv.block((-vb_rx - 2, vb_rx + 2, yv - vb_ry - 2, yv + vb_ry + 2, z_low, 1e4))
        if blk is not None:
            frac = self._vertebral_level(blk.z)
            in_body = frac < F32(self.vb_height)
            endplate = in_body & ((frac < 1.6) | (frac > self.vb_height - 1.6))
            dy = (blk.y - F32(yv)) / F32(vb_ry)
            q = (blk.x / F32(vb_rx)) ** 2 + dy**2 + F32(0.25) * np.clip(dy, 0, 1) ** 2 * (1 - (blk.x / F32(vb_rx)) ** 2)
            cv.paint(blk, (q < 1.06) & ~in_body, t.disc)
            body = (q < 1) & in_body
            cv.paint(blk, body, t.trabecular + 25 * self.bone_texture(blk), VERTEBRAE)
            cv.paint(blk, body & ((q > (1 - 1.8 / vb_ry) ** 2) | endplate), t.cortical, VERTEBRAE)
        yc = yv + vb_ry + 10  # spinal canal centre
        blk = cv.block((-30, 30, yv + vb_ry - 2, yc + 40, z_low - 20, 1e4))
        if blk is None:
            return
        frac = self._vertebral_level(blk.z)
        arch_level = ((frac + F32(4)) % F32(self.vb_pitch)) < F32(self.vb_height + 2)
        ring = ((blk.x / F32(16)) ** 2 + ((blk.y - F32(yc)) / F32(14)) ** 2) < 1
        spinous = (np.abs(blk.x) < 3.5) & (blk.y > yc) & (blk.y < yc + 36)
        transverse = (np.abs(blk.x) < 28) & (np.abs(blk.y - F32(yc - 4)) < 3.5) & (np.abs(frac - F32(self.vb_height * 0.5)) < F32(5))
        bone = (ring | spinous | transverse) & arch_level
        cv.paint(blk, bone & (cv.labels[blk.sl] != VERTEBRAE), 0.6 * t.cortical + 0.4 * t.trabecular, VERTEBRAE)
        canal = ((blk.x / F32(11)) ** 2 + ((blk.y - F32(yc)) / F32(8.5)) ** 2) < 1
        cv.paint(blk, canal, t.csf)

    def paint_great_vessels(self, cv: Canvas) -> None:
        t = self.t
        for tube, hu, label in ((self.ivc, t.vein - 2, 0), (self.aorta, t.artery, AORTA)):
            blk = cv.block(tube.bbox(1))
            if blk is not None:
                cv.paint(blk, tube.q(blk) < 1, hu, label)
        for cap in self.aorta_calcs:
            blk = cv.block(cap.bbox())
            if blk is not None:
                cv.paint(blk, cap.sdf(blk) < 0, t.calcification + 200, AORTA)
        # common iliac arteries below the bifurcation
        blk = cv.block((-90, 90, self.y_ao - 40, self.y_ao + 30, -1e4, self.iliac_z + 2))
        if blk is not None:
            dz = np.clip(F32(self.iliac_z) - blk.z, 0, None)
            for side in (-1, 1):
                cx = F32(self.x_ao - 2) + side * (F32(4) + F32(0.45) * dz)
                cy = F32(self.y_ao - 6) - F32(0.15) * dz
                q = ((blk.x - cx) / F32(self.r_ao * 0.7)) ** 2 + ((blk.y - cy) / F32(self.r_ao * 0.7)) ** 2
                cv.paint(blk, q < 1, t.artery, AORTA)

    def paint_pancreas(self, cv: Canvas) -> None:
        """The gland (lobulated, fatty clefts), its duct, any calcifications, and the bile duct."""
        p = self.pancreas
        blk = cv.block(p.bbox())
        if blk is None:
            return
        inside = gland_mask(p, blk)
        cleft = smoothstep((p.clefts(blk) - F32(CLEFT_LEVEL)) / F32(CLEFT_WIDTH))
        hu = F32(p.hu) - F32(p.fat_fraction) * (F32(p.hu) - F32(self.t.visceral_fat)) * cleft
        painted = cv.paint(blk, inside, hu, PANCREAS, protect=SOLID_ORGANS)
        cv.paint(blk, (p.duct.q(blk) < 1) & painted, self.t.fluid, PANCREAS)
        for x, y, z, r in p.calcifications:
            cb = cv.block((x - r, x + r, y - r, y + r, z - r, z + r))
            if cb is not None:
                d2 = (cb.x - F32(x)) ** 2 + (cb.y - F32(y)) ** 2 + (cb.z - F32(z)) ** 2
                cv.paint(cb, d2 < F32(r * r), self.t.calcification + 150, PANCREAS, protect=SOLID_ORGANS)
        blk = cv.block(self.cbd.bbox(1))
        if blk is not None:
            cv.paint(blk, self.cbd.q(blk) < 1, self.t.bile, 0, protect=SOLID_ORGANS)

    def paint_visceral_vessels(self, cv: Canvas) -> None:
        """SMA (with its fat collar), SMV, splenic vessels, left renal vein, portal and mesenteric veins."""
        t = self.t
        keep = protect_lut(AORTA, VERTEBRAE, L_KIDNEY, R_KIDNEY, SPLEEN)
        for tube, hu in ((self.sma, t.artery), (self.smv, t.portal_blood - 1), (self.splenic_vein, t.portal_blood - 1),
                         (self.splenic_artery, t.artery), (self.renal_vein, t.vein - 1)):
            blk = cv.block(tube.bbox(3 if tube is self.sma else 1))
            if blk is None:
                continue
            q = tube.q(blk)
            if tube is self.sma:
                cv.paint(blk, (q < 2.6) & (cv.labels[blk.sl] == 0), t.visceral_fat, 0, protect=keep)
            cv.paint(blk, q < 1, hu, 0, protect=keep)
        for cap in (*self.portal, *self.mesenteric):
            blk = cv.block(cap.bbox())
            if blk is not None:
                cv.paint(blk, cap.sdf(blk) < 0, t.portal_blood - 1, 0, protect=keep if cap in self.portal else SOLID_ORGANS)


CAVITY, RIB_ZONE = 5, 4


def gland_mask(p: Pancreas, blk: Block) -> np.ndarray:
    """The pancreas (without lesion) on a block: head, uncinate and tube, with a lobulated border."""
    lob = F32(p.lobulation) * np.clip(p.lobes(blk), -1.5, 1.5)
    scale = F32(p.scale)
    q = p.tube.q(blk, scale=_atrophy(p, blk) * scale)
    q = np.minimum(q, _scaled(p.head, p.scale).q(blk))
    q = np.minimum(q, _scaled(p.uncinate, p.scale).q(blk))
    return q < 1 + lob


def _scaled(e: Ellipsoid, s: float) -> Ellipsoid:
    return e if s == 1.0 else replace(e, r=tuple(r * s for r in e.r))


def _atrophy(p: Pancreas, blk: Block) -> np.ndarray | float:
    if p.atrophy_from_x is None:
        return 1.0
    x = blk.x[0, 0]
    ramp = smoothstep((x - F32(p.atrophy_from_x)) / F32(15))
    return (1 - ramp * (1 - F32(p.atrophy_scale))).astype(F32)[None, None, :]


def paint_loop(
    cv: Canvas,
    loop: Loop,
    t: Tissues,
    protect: np.ndarray | None = None,
    ceiling: Callable[[Block], np.ndarray] | None = None,
) -> None:
    """A hollow viscus: wall of soft tissue, lumen fluid (or mottled stool), gas on the top side."""
    for part in loop.capsules:
        blk = cv.block(part.bbox(1))
        if blk is None:
            continue
        if isinstance(part, Capsule):
            d2 = part.dist2(blk)
            outer, lumen = d2 < F32(part.r**2), d2 < F32(max(part.r - loop.wall, 0) ** 2)
        else:
            q = part.q(blk)
            outer, lumen = q < 1, q < (1 - loop.wall / part.rmin) ** 2
        content: np.ndarray | np.float32 = F32(loop.content_hu)
        if loop.mottled is not None:
            content = np.where(loop.mottled(blk) > 0.9, F32(-950), content)
        gas = blk.y < F32(loop.gas_level_y)
        hu = np.where(lumen, np.where(gas, F32(-1000), content), F32(t.bowel_wall))
        outer = outer & (cv.layers[blk.sl] == CAVITY)  # never through the body wall
        if ceiling is not None:
            outer = outer & (blk.z < ceiling(blk) - F32(3))
        cv.paint(blk, outer, hu, protect=protect)


def _split(capsules: Iterable[Capsule]) -> tuple[Capsule, ...]:
    return tuple(piece for c in capsules for piece in c.split())


def _monotone_x(rows: list[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """Tube knots must increase in x: nudge any that do not (rare seeds with a short body)."""
    out = [rows[0]]
    for r in rows[1:]:
        x = max(r[0], out[-1][0] + 6.0)
        out.append((x, *r[1:]))
    return out


def _slope_corrected(tube: Tube) -> Tube:
    """Thicken the y/z semi-axes where the centreline slopes, so the true cross-section is kept."""
    dy = np.gradient(tube.c1, tube.t)
    dz = np.gradient(tube.c2, tube.t)
    return replace(tube, r1=tube.r1 * np.sqrt(1 + dy**2), r2=tube.r2 * np.sqrt(1 + dz**2))

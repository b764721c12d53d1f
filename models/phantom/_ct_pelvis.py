"""The pelvis and the lower chest of the synthetic patient: what a real abdominal series also covers.

Why: real abdominal CT series often run from the lung bases to the pubis (abdomen-pelvis) or from the
lung apices (chest-abdomen-pelvis). A stage 1 trained only on the upper abdomen has never seen the
iliac wings, the bladder, the rectum, the uterus or prostate and the crowd of soft-tissue bowel
loops of the lower abdomen, and on a real series it drew the pancreas there (issue 14). None of these
carries an organ label: the model must learn that they are not pancreas.

Levels follow the usual adult anatomy: aortic bifurcation at L4, iliac crest at L4-L5, sacral
promontory below it, femoral heads some 150-180 mm below the bifurcation, pubic symphysis just below.
Bones are thin plates and tubes (cortex and marrow mixed), organs ellipsoids; all sampled from the
patient's own random stream, so the abdomen of a seed never changes when the pelvis is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgescreen.models.phantom._canvas import F32, Canvas, Capsule, Ellipsoid, Tube, protect_lut, tube_from

BONE_MIX = 0.45  # cortical share of a thin bone's mean HU at these sizes


@dataclass(frozen=True)
class Pelvis:
    z_crest: float  # top of the iliac crests
    z_promontory: float  # top of the sacrum: the lumbar spine ends here
    z_femoral: float  # centre of the femoral heads
    z_floor: float  # pelvic floor: an abdomen-pelvis series ends about here
    ilia: tuple[Ellipsoid, ...]
    iliac_bodies: tuple[Capsule, ...]
    sacrum: Tube
    femoral_heads: tuple[tuple[float, float, float, float], ...]  # (x, y, z, r)
    femurs: tuple[Capsule, ...]
    pubis: tuple[Capsule, ...]
    iliacus: tuple[Ellipsoid, ...]
    gluteal: tuple[Ellipsoid, ...]
    bladder: Ellipsoid
    bladder_wall: float
    pelvic_organ: Ellipsoid  # uterus or prostate
    pelvic_organ_hu: float
    trachea: Tube
    mediastinum_rx: float

    @classmethod
    def sample(cls, rng: np.random.Generator, ab) -> Pelvis:  # noqa: ANN001 - Abdomen (import cycle)
        vb_rx, vb_ry = ab.vb_r
        yv = ab.y_vb
        ca, cf = ab.cav_a, ab.cav_front
        z_crest = ab.iliac_z - float(rng.uniform(0, 15))
        z_prom = ab.iliac_z - float(rng.uniform(30, 45))
        z_fem = ab.iliac_z - float(rng.uniform(150, 180))
        z_floor = z_fem - float(rng.uniform(40, 60))
        half = float(np.clip(0.62 * ca, 70, 105))  # femoral head centre to midline
        ilia, bodies, heads, femurs, pubis, iliacus, gluteal = [], [], [], [], [], [], []
        for side in (-1, 1):
            si = np.array([side * (vb_rx + 22), yv + vb_ry + 6])  # sacroiliac joint
            asis = np.array([side * (half + 30), yv - vb_ry - 45 - rng.uniform(0, 15)])  # anterior superior spine
            d = asis - si
            ang = float(np.arctan2(d[1], d[0]))
            c = (si + asis) / 2
            length = float(np.linalg.norm(d)) / 2 + 8
            rz = float(rng.uniform(45, 60))
            ilia.append(Ellipsoid((float(c[0]), float(c[1]), z_crest - rz), (length, float(rng.uniform(4.5, 7)), rz), angle=ang))
            iliacus.append(Ellipsoid((float(c[0] - side * 12), float(c[1] - 14), z_crest - rz - 5), (length * 0.8, 14.0, rz * 0.8), angle=ang))
            gluteal.append(Ellipsoid((float(c[0] + side * 22), float(si[1] + 30), z_crest - rz - 30),
                                     (length * 0.9, float(rng.uniform(30, 45)), rz * 1.5), angle=ang))
            head = (side * half, yv - vb_ry - float(rng.uniform(15, 30)), z_fem, float(rng.uniform(21, 25)))
            heads.append(head)
            bodies.append(Capsule((float(c[0]), float(c[1]), z_crest - rz), (head[0], head[1] - 4, z_fem + 10), 15.0))
            troch = (head[0] + side * 45, head[1] + 5, z_fem - 30)
            femurs.append(Capsule(head[:3], troch, 13.0))
            femurs.append(Capsule(troch, (troch[0] - side * 12, troch[1] - 10, z_fem - 400), 14.0))
            pubis.append(Capsule((head[0], head[1], z_fem), (side * 4.0, cf + 18, z_fem - 12), 10.0))
            pubis.append(Capsule((head[0], head[1] + 8, z_fem - 10), (side * (half - 30), head[1] + 25, z_fem - 50), 12.0))
        sacrum = tube_from("z", [
            (z_floor - 10, 0.0, yv + vb_ry + 10, 12.0, 8.0),
            (z_prom - 60, 0.0, yv + vb_ry + 4, 36.0, 15.0),
            (z_prom, 0.0, yv, vb_rx * 2.2, vb_ry * 1.1),
        ])
        full = float(rng.uniform(0.2, 1.0))  # bladder filling
        bl_r = (30 + 35 * full, 22 + 25 * full, 22 + 30 * full)
        bladder = Ellipsoid((0.0, cf + 12 + bl_r[1], z_fem + bl_r[2] * 0.6), bl_r)
        if ab.sex == "F":
            organ = Ellipsoid((float(rng.uniform(-15, 15)), bladder.c[1] + bl_r[1] + 15, bladder.c[2] + bl_r[2] * 0.6),
                              (float(rng.uniform(25, 40)), float(rng.uniform(18, 28)), float(rng.uniform(30, 45))), angle=float(rng.uniform(-0.4, 0.4)))
        else:
            organ = Ellipsoid((0.0, bladder.c[1] + bl_r[1] * 0.6, z_fem - 20),
                              (float(rng.uniform(17, 25)), float(rng.uniform(14, 20)), float(rng.uniform(14, 20))))
        top = ab.z_dome + 320
        trachea = tube_from("z", [
            (ab.z_dome + 60, 0.0, yv - vb_ry - 25, 7.0, 6.0),
            (ab.z_dome + 110, 0.0, yv - vb_ry - 20, 9.0, 8.0),
            (top, 0.0, yv - vb_ry - 12, 9.0, 8.0),
        ])
        return cls(
            z_crest=z_crest, z_promontory=z_prom, z_femoral=z_fem, z_floor=z_floor,
            ilia=tuple(ilia), iliac_bodies=tuple(bodies), sacrum=sacrum, femoral_heads=tuple(heads), femurs=tuple(femurs),
            pubis=tuple(pubis), iliacus=tuple(iliacus), gluteal=tuple(gluteal), bladder=bladder,
            bladder_wall=float(rng.uniform(2, 4)), pelvic_organ=organ, pelvic_organ_hu=float(rng.uniform(38, 58)),
            trachea=trachea, mediastinum_rx=float(rng.uniform(22, 34)),
        )

    # ------------------------------------------------------------------------------------ painting

    def paint_soft(self, cv: Canvas, t, cavity: int) -> None:  # noqa: ANN001 - Tissues
        """Muscles, bladder and the uterus or prostate (before the bones and the bowel)."""
        for m in (*self.gluteal, *self.iliacus):
            blk = cv.block(m.bbox())
            if blk is not None:
                cv.paint(blk, (m.q(blk) < 1) & (cv.layers[blk.sl] >= 3), t.muscle - 3)
        blk = cv.block(self.pelvic_organ.bbox())
        if blk is not None:
            cv.paint(blk, (self.pelvic_organ.q(blk) < 1) & (cv.layers[blk.sl] == cavity), self.pelvic_organ_hu)

    def paint_bladder(self, cv: Canvas, t, cavity: int) -> None:  # noqa: ANN001 - Tissues
        b = self.bladder
        blk = cv.block(b.bbox())
        if blk is None:
            return
        q = b.q(blk)
        inside = cv.layers[blk.sl] == cavity
        cv.paint(blk, (q < 1) & inside, t.bowel_wall)
        cv.paint(blk, (q < (1 - self.bladder_wall / b.rmin) ** 2) & inside, t.urine)

    def paint_bones(self, cv: Canvas, t) -> None:  # noqa: ANN001 - Tissues
        bone = BONE_MIX * t.cortical + (1 - BONE_MIX) * t.trabecular
        marrow = t.trabecular * 0.8
        for plate in self.ilia:
            blk = cv.block(plate.bbox())
            if blk is not None:
                q = plate.q(blk)
                cv.paint(blk, q < 1, bone)
                cv.paint(blk, q < 0.35, marrow)
        for cap in (*self.iliac_bodies, *self.pubis, *self.femurs):
            blk = cv.block(cap.bbox())
            if blk is not None:
                d = cap.sdf(blk)
                cv.paint(blk, d < 0, bone)
                cv.paint(blk, d < -3.0, marrow if cap not in self.femurs[1::2] else t.fat)
        for x, y, z, r in self.femoral_heads:
            blk = cv.block((x - r - 8, x + r + 8, y - r - 8, y + r + 8, z - r - 8, z + r + 8))
            if blk is None:
                continue
            d = np.sqrt((blk.x - F32(x)) ** 2 + (blk.y - F32(y)) ** 2 + (blk.z - F32(z)) ** 2)
            cup = (d > r + 2) & (d < r + 7) & (blk.z > F32(z - r * 0.2))  # acetabulum
            cv.paint(blk, cup, bone)
            cv.paint(blk, d < r, bone)
            cv.paint(blk, d < r - 2.5, marrow)
        s = self.sacrum
        blk = cv.block(s.bbox())
        if blk is not None:
            q = s.q(blk)
            cv.paint(blk, q < 1, bone)
            cv.paint(blk, q < 0.55, marrow)

    def paint_chest(self, cv: Canvas, t, z_dome: float) -> None:  # noqa: ANN001 - Tissues
        """Mediastinal fat between the lungs and the trachea above the heart."""
        blk = cv.block((-self.mediastinum_rx, self.mediastinum_rx, -400, 400, z_dome + 100, 1e4))
        if blk is not None:
            lung = (cv.hu[blk.sl] < -600) & (cv.layers[blk.sl] >= 4)
            cv.paint(blk, lung & (np.abs(blk.x) < F32(self.mediastinum_rx)), t.visceral_fat)
        blk = cv.block(self.trachea.bbox(1))
        if blk is not None:
            q = self.trachea.q(blk)
            cv.paint(blk, q < 1.3, t.bowel_wall, protect=protect_lut(6))
            cv.paint(blk, q < 1, -1000.0, protect=protect_lut(6))

"""How the synthetic patient is scanned: contrast phase, kernel, slices, field of view, metal, size, range.

Why a separate object: the seed fixes the patient; the acquisition is what a real site varies from one
series to the next, and it is what separates phantom CT from real CT (issue 14, item 2). The default
``Acquisition()`` is the models' validated domain (non-contrast, standard kernel, the seed's own
slices, field of view and abdominal range); ``Acquisition.randomized(seed)`` draws the wide
distribution stage 1 is trained on, and each field is a knob the domain gate's shifted test sets turn
one at a time (``generate_ct_volume(seed, acquisition=Acquisition(kernel="sharp"))``).

Contrast enhancement (HU added to the unenhanced value) follows the usual published ranges for a
biphasic pancreas protocol: arterial phase aorta 250-350 HU and pancreas 100-130 HU (peak pancreatic
enhancement in the late arterial phase), portal venous phase liver 100-120 HU, portal vein 160-200 HU,
renal cortex 150-200 HU; delayed (excretory) phase contrast in the collecting systems and bladder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

CONTRAST_PHASES: tuple[str, ...] = ("non_contrast", "arterial", "portal_venous", "delayed")
KERNELS: tuple[str, ...] = ("soft", "standard", "sharp")
SCAN_RANGES: tuple[str, ...] = ("abdomen", "abdomen_pelvis", "chest_abdomen_pelvis")

# kernel -> (noise correlation length factor, noise sigma factor, edge enhancement amount)
KERNEL_NOISE: dict[str, tuple[float, float, float]] = {
    "soft": (1.45, 0.7, 0.0),
    "standard": (1.0, 1.0, 0.0),
    "sharp": (0.45, 1.9, 0.6),
}
# phase -> (low, high) HU added per tissue; drawn per patient within the range
ENHANCEMENT: dict[str, dict[str, tuple[float, float]]] = {
    "arterial": {"artery": (200, 310), "vein": (30, 90), "portal": (60, 120), "liver": (10, 25), "spleen": (40, 75),
                 "pancreas": (55, 85), "kidney": (90, 160), "bowel_wall": (20, 40), "muscle": (3, 8), "urine": (0, 0)},
    "portal_venous": {"artery": (100, 160), "vein": (110, 170), "portal": (120, 160), "liver": (45, 65),
                      "spleen": (55, 80), "pancreas": (40, 65), "kidney": (100, 160), "bowel_wall": (20, 40),
                      "muscle": (8, 15), "urine": (0, 0)},
    "delayed": {"artery": (50, 90), "vein": (50, 90), "portal": (50, 90), "liver": (25, 40), "spleen": (25, 40),
                "pancreas": (20, 35), "kidney": (60, 100), "bowel_wall": (10, 20), "muscle": (5, 10),
                "urine": (300, 900)},
}


@dataclass(frozen=True)
class Acquisition:
    """One series' acquisition; every field's default is the validated (in-domain) value.

    contrast_phase: one of ``CONTRAST_PHASES``; kernel: one of ``KERNELS`` (noise texture and edges);
    slice_thickness_mm: 0.6-5 (None: the seed's own); metal: spinal hardware with streak artefacts;
    fov_mm: reconstruction diameter (None: the seed's own; smaller than the body truncates it);
    body_scale: 1 for the adult the seed draws, 0.5-0.7 a child; scan_range: one of ``SCAN_RANGES``;
    noise_scale: dose (2 = a quarter of the dose); hu_offset: scanner calibration offset (HU).
    """

    contrast_phase: str = "non_contrast"
    kernel: str = "standard"
    slice_thickness_mm: float | None = None
    metal: bool = False
    fov_mm: float | None = None
    body_scale: float = 1.0
    scan_range: str = "abdomen"
    noise_scale: float = 1.0
    hu_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.contrast_phase not in CONTRAST_PHASES:
            raise ValueError(f"contrast_phase {self.contrast_phase!r}: use one of {CONTRAST_PHASES}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r}: use one of {KERNELS}")
        if self.scan_range not in SCAN_RANGES:
            raise ValueError(f"scan_range {self.scan_range!r}: use one of {SCAN_RANGES}")
        if self.slice_thickness_mm is not None and not 0.5 <= self.slice_thickness_mm <= 10:
            raise ValueError(f"slice_thickness_mm {self.slice_thickness_mm} outside 0.5-10 mm")
        if self.fov_mm is not None and not 120 <= self.fov_mm <= 700:
            raise ValueError(f"fov_mm {self.fov_mm} outside 120-700 mm")
        if not 0.3 <= self.body_scale <= 1.5:
            raise ValueError(f"body_scale {self.body_scale} outside 0.3-1.5")
        if not 0.2 <= self.noise_scale <= 5:
            raise ValueError(f"noise_scale {self.noise_scale} outside 0.2-5")

    @property
    def in_domain(self) -> bool:
        return self == Acquisition(slice_thickness_mm=self.slice_thickness_mm) and (
            self.slice_thickness_mm is None or 1.0 <= self.slice_thickness_mm <= 5.0)

    def describe(self) -> dict:
        return asdict(self)

    @classmethod
    def randomized(cls, seed: int) -> Acquisition:
        """The wide training distribution for stage 1 (deterministic in the seed).

        Half the series are in-domain non-contrast; the rest spread over contrast phases, kernels,
        thin and thick slices, dose, calibration offsets, truncated fields of view, metal and children;
        scans reach the pelvis and the chest as real abdominal series often do.
        """
        rng = np.random.default_rng([int(seed) % 2**63, 0xACC1])
        phase = "non_contrast" if rng.random() < 0.6 else str(rng.choice(CONTRAST_PHASES[1:], p=[0.3, 0.5, 0.2]))
        kernel = str(rng.choice(KERNELS, p=[0.3, 0.5, 0.2]))
        thickness = float(rng.choice([0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0], p=[0.08, 0.1, 0.1, 0.1, 0.17, 0.3, 0.15]))
        scan_range = str(rng.choice(SCAN_RANGES, p=[0.3, 0.45, 0.25]))
        return cls(
            contrast_phase=phase,
            kernel=kernel,
            slice_thickness_mm=thickness,
            metal=bool(rng.random() < 0.06),
            fov_mm=float(rng.uniform(260, 340)) if rng.random() < 0.1 else None,
            body_scale=float(rng.uniform(0.6, 0.85)) if rng.random() < 0.06 else 1.0,
            scan_range=scan_range,
            noise_scale=float(np.exp(rng.normal(0.0, 0.35))),
            hu_offset=float(rng.normal(0.0, 6.0)),
        )


def enhance(tissues, pancreas_hu: float, phase: str, seed: int):  # noqa: ANN001, ANN201 - (Tissues, float)
    """Tissues (and the gland's HU) of this patient in ``phase``: each tissue gains its drawn enhancement."""
    if phase == "non_contrast":
        return tissues, pancreas_hu
    rng = np.random.default_rng([int(seed) % 2**63, 0xC0E, CONTRAST_PHASES.index(phase)])
    gain = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in ENHANCEMENT[phase].items()}
    t = replace(
        tissues,
        liver=tissues.liver + gain["liver"], spleen=tissues.spleen + gain["spleen"],
        kidney=tissues.kidney + gain["kidney"], pancreas=tissues.pancreas + gain["pancreas"],
        bowel_wall=tissues.bowel_wall + gain["bowel_wall"], muscle=tissues.muscle + gain["muscle"],
        urine=tissues.urine + gain["urine"],
        artery_gain=gain["artery"], vein_gain=gain["vein"], portal_gain=gain["portal"],
    )
    return t, pancreas_hu + gain["pancreas"]

"""The shipped stage 1 card's validated domain against the phantom generator's shifted acquisitions.

Without the models (cheap enough for `make test`): each case is a slab of the seed's native 512 x 512
series around the pancreas, written as DICOM and loaded by the appliance; the gate's attribute checks
(a) and body statistics (b) run against the pancreas cards' domains exactly as in the pipeline.
Checks (c) and (d) need the models and are measured by `edgescreen models evaluate --domain-n ...`
(models/REPORT.json `domain_gate`). Shifts that only the anatomy sees (a child's size) are not here.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from edgescreen.appliance.modelcard import load_card
from edgescreen.appliance.pipeline.domain import attributes, intensity
from edgescreen.appliance.pipeline.domain.verdict import DomainReport

MODELS = Path(__file__).resolve().parents[1] / "models"
phantom = pytest.importorskip("edgescreen.models.phantom.ct")
SEED = 200_003  # held out: never trained or calibrated on


def _domains() -> list:
    domains = [load_card(MODELS / f"{role}.json", verify_file=False).domain
               for role in ("pancreas.stage1", "pancreas.stage2", "pancreas.stage3")]
    assert any(d is not None and d.intensity is not None for d in domains), "no card states body statistics"
    return [d for d in domains if d is not None]


def _verdict(tmp_path: Path, name: str, strip: bool = False, **knobs: object) -> DomainReport:
    from edgescreen.appliance.pipeline.pancreas import load_canonical

    acquisition = phantom.Acquisition(**knobs)
    probe = phantom.generate_ct_volume(SEED, None, matrix=16, slices=8)
    lo, hi = probe.truth["pancreas_z_range_mm"]
    centre = (lo + hi) / 2
    ph = phantom.generate_ct_volume(SEED, None, z_range_mm=(centre - 45, centre + 45), acquisition=acquisition)
    folder = tmp_path / name
    files = phantom.write_ct_series(ph, folder, SEED)
    if strip:  # an anonymised export: the acquisition is no longer named anywhere
        for path in files:
            ds = pydicom.dcmread(path)
            for keyword in ("ContrastBolusAgent", "ConvolutionKernel", "SeriesDescription", "ProtocolName",
                            "StudyDescription"):
                if keyword in ds:
                    delattr(ds, keyword)
            ds.save_as(path, enforce_file_format=True)
    ct = load_canonical(sorted(folder.glob("*.dcm")))
    report = DomainReport()
    stats = intensity.ct_statistics(ct.hu, ct.grid.spacing)
    for domain in _domains():  # every card's domain must hold, as in appliance.pipeline.domain.gate.assess_ct
        attributes.check_ct(domain, ct.volume.datasets[0], ct.volume.spacing_mm, report)
        if domain.intensity is not None:
            intensity.check(domain.intensity, stats, report)
    return report


def test_the_validated_acquisition_passes(tmp_path: Path) -> None:
    report = _verdict(tmp_path, "in")
    assert report.in_domain, report.reasons


@pytest.mark.parametrize(("name", "knobs", "strip", "expected"), [
    ("portal_venous", {"contrast_phase": "portal_venous"}, False, "contrast phase"),
    ("sharp", {"kernel": "sharp"}, False, "reconstruction kernel SHARP"),
    ("sharp_stripped", {"kernel": "sharp"}, True, "fine-scale share of the noise"),
    ("thin", {"slice_thickness_mm": 0.6}, False, "slice thickness 0.6 mm"),
    ("metal", {"metal": True}, False, "metal fraction"),
    ("portal_venous_stripped", {"contrast_phase": "portal_venous"}, True, "is outside the training range"),
    ("truncated", {"fov_mm": 240.0}, False, "pixel spacing 0.46875 mm"),  # a small FOV on a 512 matrix
])
def test_shifted_acquisitions_are_flagged(tmp_path: Path, name: str, knobs: dict, strip: bool, expected: str) -> None:
    report = _verdict(tmp_path, name, strip=strip, **knobs)
    assert not report.in_domain
    assert any(expected in reason for reason in report.reasons), report.reasons

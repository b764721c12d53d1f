"""What the DICOM outputs cite, and which source headers they read (issue 15: a whole study, outputs included).

The SR and the PDF cite the images the findings lie on, not every image of the series: citing all 300
slices of a CT in every measurement group made the outputs the slowest step of a study. The source
headers are read only for the images cited (the loader parses them lazily), so a series' unused headers
are never parsed. A 60-slice series whose findings span a few slices shows both.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from edgescreen.appliance.pipeline.ctload import load_ct_series
from edgescreen.appliance.pipeline.outputs import DicomOutputError, write_dicom_outputs
from edgescreen.appliance.pipeline.outputs.pdf import render_pdf
from tests.test_dicom_outputs import (
    DCIODVFY,
    _dciodvfy,
    _headers,
    _sorted_by_z,
    make_ct_series,
    pancreas_findings,
)

SLICES, SIZE = 60, 32
PANCREAS_Z, LESION_Z = range(28, 34), range(30, 32)  # the slices each mask lies on
PDFFONTS = shutil.which("pdffonts")


class Recorded(Sequence[Dataset]):
    """The source headers as given, noting which ones the outputs read."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self.datasets, self.read = datasets, set()

    def __len__(self) -> int:
        return len(self.datasets)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        self.read.add(index)
        return self.datasets[index]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_ct_series(tmp_path_factory.mktemp("ct60"), slices=SLICES, size=SIZE)


def _masks(lesion: bool = True) -> dict[str, np.ndarray]:
    pancreas = np.zeros((SLICES, SIZE, SIZE), np.uint8)
    pancreas[PANCREAS_Z.start:PANCREAS_Z.stop, 10:22, 8:24] = 1
    masks = {"pancreas": pancreas}
    if lesion:
        masks["lesion_1"] = np.zeros_like(pancreas)
        masks["lesion_1"][LESION_Z.start:LESION_Z.stop, 14:18, 12:16] = 1  # inside the gland, as stage 2 finds it
    return masks


def _evidence(ds: Dataset) -> set[str]:
    return {item.ReferencedSOPInstanceUID for study in ds.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}


def _group_citations(sr: hd.sr.Comprehensive3DSR) -> dict[str, set[str]]:
    cited = {g.tracking_identifier: {i.referenced_sop_instance_uid for i in g.source_images}
             for g in sr.content.get_image_measurement_groups()}
    for g in sr.content.get_volumetric_roi_measurement_groups():
        cited[g.tracking_identifier] = {i.referenced_sop_instance_uid
                                        for i in g.referenced_segment.source_images_for_segmentation}
    return cited


def test_sr_and_pdf_cite_only_the_slices_the_findings_lie_on(series: list[Path], tmp_path: Path) -> None:
    volume = load_ct_series(series)  # the loader's lazily parsed headers, as the pipeline passes them
    uids = volume.sop_instance_uids
    sources = Recorded(volume.datasets)
    paths = write_dicom_outputs(pancreas_findings(_sorted_by_z(_headers(series))), sources, _masks(), tmp_path)
    assert [p.name for p in paths] == ["seg.dcm", "sr.dcm", "report.dcm"]
    seg, sr, pdf = (pydicom.dcmread(p) for p in paths)
    on_findings = {uids[z] for z in PANCREAS_Z}
    # the evidence: the SEG and the six slices with findings, not the 60 of the series
    assert _evidence(sr) == {seg.SOPInstanceUID, *on_findings}
    cited = _group_citations(hd.sr.srread(paths[1]))
    assert cited == {"pancreas": on_findings, "lesion_1": {uids[z] for z in LESION_Z}}
    # the PDF names what it was made from: the SR, the SEG and the same slices
    assert {i.ReferencedSOPInstanceUID for i in pdf.SourceInstanceSequence} == {
        sr.SOPInstanceUID, seg.SOPInstanceUID, *on_findings}
    # and no header beyond the first and the cited slices was read (the other 53 stay unparsed)
    assert sources.read == {0, *PANCREAS_Z}
    if DCIODVFY:
        for path in paths:
            assert _dciodvfy(path)[0] == [], path.name


def test_a_lesion_without_a_mask_cites_the_slices_of_its_extent(series: list[Path], tmp_path: Path) -> None:
    """Found by bisection over the slice positions: a few headers besides the cited ones are read, not 60."""
    headers = _sorted_by_z(_headers(series))
    z = [float(d.ImagePositionPatient[2]) for d in headers]
    findings = pancreas_findings(headers)
    findings["lesions"][0].update(centre_lps_mm=[0.0, 0.0, z[45]], longest_diameter_mm=2.2 * (z[1] - z[0]))
    sources = Recorded(headers)
    paths = write_dicom_outputs(findings, sources, _masks(lesion=False), tmp_path)
    cited = _group_citations(hd.sr.srread(paths[1]))
    assert cited["lesion_1"] == {headers[i].SOPInstanceUID for i in (44, 45, 46)}
    assert cited["pancreas"] == {headers[i].SOPInstanceUID for i in PANCREAS_Z}
    assert len(_evidence(pydicom.dcmread(paths[1]))) == 1 + 6 + 3  # the SEG, the gland's slices, the lesion's
    assert len(sources.read - {0, *PANCREAS_Z, 44, 45, 46}) <= 2 * 6  # two bisections of 60 slices
    # a lesion between two slices (thinner than the spacing) cites the nearer one
    findings["lesions"][0].update(centre_lps_mm=[0.0, 0.0, z[45] + 0.3 * (z[1] - z[0])], longest_diameter_mm=0.5)
    paths = write_dicom_outputs(findings, headers, _masks(lesion=False), tmp_path / "thin")
    assert _group_citations(hd.sr.srread(paths[1]))["lesion_1"] == {headers[45].SOPInstanceUID}


def test_a_study_without_findings_cites_the_extent_of_the_series(series: list[Path], tmp_path: Path) -> None:
    headers = _sorted_by_z(_headers(series))
    empty = {"pancreas": np.zeros((SLICES, SIZE, SIZE), np.uint8)}
    paths = write_dicom_outputs(pancreas_findings(headers, lesion=False), headers, empty, tmp_path)
    assert [p.name for p in paths] == ["sr.dcm", "report.dcm"]
    extent = {headers[i].SOPInstanceUID for i in (0, SLICES // 2, SLICES - 1)}
    assert _group_citations(hd.sr.srread(paths[0])) == {"pancreas": extent}
    assert _evidence(pydicom.dcmread(paths[0])) == extent
    if DCIODVFY:
        assert _dciodvfy(paths[0])[0] == []


def test_a_cited_image_of_another_study_is_refused(series: list[Path], tmp_path: Path) -> None:
    """Only the first header is read up front, so every header read later is checked against the study."""
    headers = _sorted_by_z(_headers(series))
    headers[30] = headers[30].copy()
    headers[30].StudyInstanceUID = "1.2.3.4"
    with pytest.raises(DicomOutputError, match=r"source image 30 \(.*\) is from study 1\.2\.3\.4"):
        write_dicom_outputs(pancreas_findings(headers), headers, _masks(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(PDFFONTS is None, reason="pdffonts not installed (apt install poppler-utils)")
@pytest.mark.parametrize(("name", "scripts"), [("Müller^Anna", 0), ("王^小明", 1), ("አበበ^ቢቂላ", 1), ("王^አበበ", 2)])
def test_the_pdf_embeds_each_font_it_needs_once(name: str, scripts: int, tmp_path: Path) -> None:
    """DejaVu regular and bold; a script's fallback font only when the text needs it, and in one face
    (fpdf2 parses every face registered: the fallback's regular face stands in for bold)."""
    path = tmp_path / "r.pdf"
    path.write_bytes(render_pdf("Report", [("kv", [("Patient", name)]), ("b", name)]))
    out = subprocess.run([PDFFONTS, str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    fonts = [line.split()[0].split("+")[-1] for line in out.splitlines()[2:]]  # subset tag dropped
    assert sorted(f for f in fonts if f.startswith("DejaVu")) == ["DejaVuSansBold", "DejaVuSansBook"], fonts
    fallbacks = [f for f in fonts if not f.startswith("DejaVu")]
    assert len(fallbacks) == len(set(fallbacks)) == scripts, fonts

"""Crash drills on the whole box (tests/drills.py): SIGKILL of the DICOM service, the worker and the sync
service at random moments, and power cuts (all at once), while a scanner sends exams and the box analyses,
exports to a real Orthanc and syncs to a real cloud receiver. Nothing acknowledged or finished is lost,
nothing is done twice, every service stops cleanly at the end, and no patient name, ID, birth date or
accession number appears in any service's log (debug level) over the whole run.

`make test` runs a few kills; `make drills` runs 50 or more (EDGESCREEN_DRILL_KILLS, EDGESCREEN_DRILL_EXAMS)
and writes the `drills` section of bench/results.json.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests import drills
from tests.orthanc_server import requires_orthanc
from tests.test_dicom_support import requires_dcmtk

pytestmark = [requires_dcmtk, requires_orthanc]


def test_services_killed_at_random_points_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    kills = int(os.environ.get("EDGESCREEN_DRILL_KILLS", 4))
    exams = int(os.environ.get("EDGESCREEN_DRILL_EXAMS", 1))
    result = drills.run_box_drill(tmp_path, kills=kills, exams=exams, seed=int(os.environ.get("EDGESCREEN_DRILL_SEED", 3)))
    assert result["lost_instances"] == [], f"acknowledged instances lost: {result['lost_instances'][:5]}"
    assert result["acknowledged"] == exams * 4
    assert result["jobs"] == exams and result["missing_results"] == 0
    assert result["jobs_finished_twice"] == 0, "a job ran twice to completion"
    assert result["missing_exports"] == 0 and result["missing_cloud_items"] == 0
    assert result["cloud_items_stored_twice"] == 0
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert set(result["exit_codes"].values()) == {0}, result["exit_codes"]
    assert result["phi_in_logs"] == [], f"patient identity in the services' logs: {result['phi_in_logs']}"
    drills.record(result)

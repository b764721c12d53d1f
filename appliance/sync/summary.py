"""The finding summary the cloud receives: the findings document reduced to what carries no identity.

Kept: the verdict, scores, threshold and operating point, lesions (location, size, probabilities),
organ volumes, the domain verdict, model identities, the disclaimer. Dropped: the study and series UIDs
(replaced by the same keyed pseudonyms the de-identified SEG and SR carry), file names and paths,
warnings (free text that can quote a file or a header), the creation time. A final check refuses a
summary in which any identifier of the study still appears.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.sync.deid import Deidentifier, DeidError

_TOP = ("schema_version", "pipeline", "triage", "abnormal_probability", "threshold", "pancreas_volume_ml", "organs",
        "domain", "operating_point", "models", "bundle", "disclaimer", "timings_s")
_LESION = ("id", "location", "centre_lps_mm", "longest_diameter_mm", "volume_ml", "abnormal_probability",
           "subtype_probabilities", "top_subtype", "top_subtype_probability")
_MAMMO_IMAGE = ("laterality", "view", "abnormal_probability", "malignant_probability")


def finding_summary(findings: dict[str, Any], deid: Deidentifier, *, forbidden: list[str]) -> dict[str, Any]:
    """The cloud's copy of one result; DeidError if any of `forbidden` (the study's identifiers) is in it."""
    out: dict[str, Any] = {k: findings.get(k) for k in _TOP if k in findings}
    out["lesions"] = [{k: lesion.get(k) for k in _LESION} for lesion in findings.get("lesions") or []]
    mammo = findings.get("mammo")
    if mammo:
        out["mammo"] = {"exam_score": mammo.get("exam_score"), "breasts": mammo.get("breasts"),
                        "images": [{k: im.get(k) for k in _MAMMO_IMAGE} for im in mammo.get("images") or []]}
    out["study"] = deid.uid(findings["study_uid"]) if findings.get("study_uid") else None
    out["series"] = deid.uid(findings["series_uid"]) if findings.get("series_uid") else None
    text = json.dumps(out)
    leaked = [f for f in forbidden if f and len(f) >= 3 and f in text]
    if leaked:
        raise DeidError(f"the finding summary still contains {len(leaked)} identifier(s) of its study; held back")
    return out

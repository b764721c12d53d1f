"""The finding summary the cloud receives: the findings document reduced to what carries no identity.

Kept: the verdict, scores, threshold and operating point, lesions (location, size, probabilities),
organ volumes, the domain verdict (in domain or not, each check's outcome, the measured statistics, the
reasons with what they quote from the headers removed: the gate quotes the StudyDescription as its
contrast-phase evidence), model identities, the disclaimer. Dropped: the study and series UIDs (replaced
by the same keyed pseudonyms the de-identified SEG and SR carry), file names and paths, warnings (free
text that can quote a file or a header), the creation time. A final check refuses a summary in which any
identifier of the study still appears.
"""

from __future__ import annotations

import json
from typing import Any

from edgescreen.appliance.sync.deid import Deidentifier, DeidError, find_identifiers, scrub_text

_TOP = ("schema_version", "pipeline", "triage", "abnormal_probability", "threshold", "pancreas_volume_ml", "organs",
        "operating_point", "models", "bundle", "disclaimer", "timings_s")
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
    domain = findings.get("domain")
    if isinstance(domain, dict):
        out["domain"] = _domain(domain, forbidden)
    out["study"] = deid.uid(findings["study_uid"]) if findings.get("study_uid") else None
    out["series"] = deid.uid(findings["series_uid"]) if findings.get("series_uid") else None
    leaked = find_identifiers(json.dumps(out), forbidden)
    if leaked:
        raise DeidError(f"the finding summary still contains {len(leaked)} identifier(s) of its study; held back")
    return out


def _domain(domain: dict[str, Any], forbidden: list[str]) -> dict[str, Any]:
    """The gate's verdict without the header text it quotes: check outcomes as one word each ("passed",
    "flagged", "not checked"), numeric measurements, reasons scrubbed."""
    checks = {str(name): ("not checked" if str(state).startswith("not checked") else str(state).split(":")[0][:20])
              for name, state in (domain.get("checks") or {}).items()}
    measured = {str(k): v for k, v in (domain.get("measured") or {}).items() if isinstance(v, int | float)}
    return {"in_domain": bool(domain.get("in_domain")), "checks": checks, "measured": measured,
            "reasons": [scrub_text(r, forbidden) for r in domain.get("reasons") or []]}

"""The self-test's own rules, without running a model: what counts as a difference, and the expected findings'
signature and binding to one bundle (the whole path runs in test_provision.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgescreen.appliance.bundle import (
    EXPECTED_FINDINGS,
    EXPECTED_SIGNATURE,
    ensure_signing_key,
    install_bundle,
    load_trusted_keys,
)
from edgescreen.appliance.selftest import (
    PROBABILITY_TOL,
    SelftestError,
    compare,
    load_expected,
    write_expected_findings,
)
from tests.test_upgrade import _bundle


def test_compare_tolerates_arithmetic_noise_and_names_every_real_difference() -> None:
    expected = {"triage": "suspicious", "abnormal_probability": 0.91, "organs": {"liver": 1500.0},
                "lesions": [{"top_subtype": "pdac", "abnormal_probability": 0.8}], "outputs": ["PDF", "SEG", "SR"]}
    same = {**expected, "abnormal_probability": 0.91 + PROBABILITY_TOL / 2, "organs": {"liver": 1510.0}}
    assert compare(expected, same) == []
    other = {"triage": "not_suspicious", "abnormal_probability": 0.5, "organs": {"liver": 1500.0, "spleen": 10.0},
             "lesions": [], "outputs": ["PDF", "SR"]}
    diffs = compare(expected, other)
    assert "triage: expected \"suspicious\", got \"not_suspicious\"" in diffs
    assert "abnormal_probability: expected 0.91, got 0.5" in diffs
    assert any(d.startswith("organs.spleen: unexpected") for d in diffs)
    assert any(d.startswith("lesions: expected 1 item(s)") for d in diffs)
    assert any(d.startswith("outputs: expected 3 item(s)") for d in diffs)


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    home = tmp_path / "etc"
    key = ensure_signing_key(home)
    return _bundle(tmp_path, key, "toy", b"toy model"), key, home


def test_a_bundle_without_a_whole_pipeline_records_why_it_has_no_case(signed) -> None:
    bundle, key, home = signed
    write_expected_findings(bundle, key)
    doc = load_expected(bundle, load_trusted_keys(home))
    assert doc["cases"] == [] and {s["case"] for s in doc["skipped"]} == {"ct-ipmn", "mg-malignant"}
    assert "the bundle holds no pancreas.stage2, pancreas.stage3" in doc["skipped"][0]["reason"]


def test_expected_findings_travel_with_the_bundle_and_stay_bound_to_it(signed, tmp_path: Path) -> None:
    bundle, key, home = signed
    write_expected_findings(bundle, key)
    installed = install_bundle(bundle, tmp_path / "data", key_home=home)
    assert (installed / EXPECTED_FINDINGS).read_bytes() == (bundle / EXPECTED_FINDINGS).read_bytes()
    assert load_expected(installed, home)["bundle_id"] == json.loads((bundle / "manifest.json").read_text())["bundle_id"]
    # the expectations of another bundle, even correctly signed, are refused
    other = _bundle(tmp_path, key, "other", b"another model")
    for name in (EXPECTED_FINDINGS, EXPECTED_SIGNATURE):
        (other / name).parent.mkdir(exist_ok=True)
        (other / name).write_bytes((bundle / name).read_bytes())
    with pytest.raises(SelftestError, match="belong to another bundle"):
        load_expected(other, home)
    # and a key this box does not trust cannot vouch for them
    stranger = ensure_signing_key(tmp_path / "stranger")
    write_expected_findings(bundle, key)
    with pytest.raises(SelftestError, match="does not trust"):
        load_expected(bundle, load_trusted_keys(stranger.parent.parent))

"""Signed bundles: signing, tamper detection, unknown keys, atomic install and rollback, the CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from edgescreen.appliance.bundle import (
    BundleError,
    current_bundle,
    ensure_signing_key,
    install_bundle,
    key_paths,
    list_bundles,
    load_trusted_keys,
    rollback,
    verify_bundle,
)
from edgescreen.optimize.bundle import write_bundle
from tests.conftest import run_cli

CARD = {"role": "pancreas.stage1", "name": "toy", "version": "1"}


def _entry(passed: bool = True) -> dict:
    return {"backend": "openvino", "device": "CPU", "precision": "int8", "latency_ms_p50": 10.0,
            "baseline_latency_ms_p50": 50.0, "speedup": 5.0,
            "gate": {"passed": passed, "dice_vs_fp32": 0.995, "dice_vs_truth_drop": 0.001}}


def make_bundle(tmp: Path, key: Path, name: str = "bundle", payload: bytes = b"<xml/>") -> Path:
    """A bundle with an OpenVINO-style two-file artifact and a card, written by the optimiser's writer."""
    src = tmp / f"src-{name}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "m.xml").write_bytes(payload)
    (src / "m.bin").write_bytes(os.urandom(64))
    (src / "card.json").write_text(json.dumps(CARD))
    (src / "toy.onnx").write_bytes(b"fp32 source")
    out = tmp / name
    write_bundle(out, profile="x86-cpu", key_path=key, report={"models": []}, render_md=lambda r: "# report\n",
                 chosen={"pancreas.stage1": {"artifact": src / "m.xml", "files": [src / "m.xml", src / "m.bin"],
                                             "card_path": src / "card.json", "card_file": "toy.onnx",
                                             "source": src / "toy.onnx", "entry": _entry()}})
    return out


@pytest.fixture
def key(data_dir: Path) -> Path:
    return ensure_signing_key(data_dir)


def test_signing_key_is_private_and_trusted_by_default(data_dir: Path, key: Path) -> None:
    private, public, trusted = key_paths(data_dir)
    assert key == private
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.is_file() and trusted.is_dir()
    assert len(load_trusted_keys(data_dir)) == 1
    assert ensure_signing_key(data_dir) == private  # idempotent: the same key, not a new one
    assert len(load_trusted_keys(data_dir)) == 1


def test_valid_bundle_verifies_and_describes_its_models(tmp_path: Path, data_dir: Path, key: Path) -> None:
    bundle = make_bundle(tmp_path, key)
    manifest = verify_bundle(bundle, data_dir)
    entry = manifest.models["pancreas.stage1"]
    assert entry.artifact == "models/pancreas.stage1.openvino-int8.xml" and entry.source == "models/toy.onnx"
    assert set(entry.files) == {"models/pancreas.stage1.openvino-int8.xml", "models/pancreas.stage1.openvino-int8.bin"}
    assert entry.backend == "openvino" and entry.precision == "int8" and entry.gate.passed
    assert manifest.artifact_path(bundle, "pancreas.stage1").is_file()
    assert json.loads(manifest.card_path(bundle, "pancreas.stage1").read_text()) == CARD
    assert {"manifest.json", "manifest.sig"}.isdisjoint(manifest.files) and "report.md" in manifest.files


def test_tampered_artifact_is_named(tmp_path: Path, data_dir: Path, key: Path) -> None:
    bundle = make_bundle(tmp_path, key)
    with open(bundle / "models/pancreas.stage1.openvino-int8.bin", "r+b") as fh:
        fh.write(b"\x00\x01")
    with pytest.raises(BundleError, match=r"models/pancreas\.stage1\.openvino-int8\.bin: sha256 mismatch; the bundle was modified"):
        verify_bundle(bundle, data_dir)


def test_tampered_manifest_fails_the_signature(tmp_path: Path, data_dir: Path, key: Path) -> None:
    bundle = make_bundle(tmp_path, key)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["models"]["pancreas.stage1"]["gate"]["passed"] = True
    manifest["models"]["pancreas.stage1"]["speedup"] = 50.0  # a forged figure
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json: signature does not match"):
        verify_bundle(bundle, data_dir)


def test_unknown_key_is_refused_until_trusted(tmp_path: Path, data_dir: Path, key: Path) -> None:
    other_box = tmp_path / "other-box"
    bundle = make_bundle(tmp_path, ensure_signing_key(other_box))
    with pytest.raises(BundleError, match="does not trust"):
        verify_bundle(bundle, data_dir)
    # a technician trusts the other box's key: the same bundle now verifies
    _, other_public, _ = key_paths(other_box)
    _, _, trusted = key_paths(data_dir)
    (trusted / "other-box.pub").write_bytes(other_public.read_bytes())
    assert verify_bundle(bundle, data_dir).profile == "x86-cpu"


def test_missing_signature_and_missing_file(tmp_path: Path, data_dir: Path, key: Path) -> None:
    bundle = make_bundle(tmp_path, key)
    (bundle / "models/pancreas.stage1.json").unlink()
    with pytest.raises(BundleError, match=r"models/pancreas\.stage1\.json: missing"):
        verify_bundle(bundle, data_dir)
    (bundle / "manifest.sig").unlink()
    with pytest.raises(BundleError, match="unsigned"):
        verify_bundle(bundle, data_dir)


def test_install_switches_atomically_and_rollback_swaps_back(tmp_path: Path, data_dir: Path, key: Path) -> None:
    first = make_bundle(tmp_path, key, "one", b"<first/>")
    second = make_bundle(tmp_path, key, "two", b"<second/>")
    one = install_bundle(first, data_dir)
    assert current_bundle(data_dir) == one
    two = install_bundle(second, data_dir)
    root = data_dir / "bundles"
    assert current_bundle(data_dir) == two and os.readlink(root / "previous") == one.name
    assert (root / "current").is_symlink() and not list(root.glob(".*tmp*"))

    manifest = rollback(data_dir)
    assert manifest.bundle_id == one.name and current_bundle(data_dir) == one
    assert os.readlink(root / "previous") == two.name
    listed = {b.bundle_id: b for b in list_bundles(data_dir)}
    assert listed[one.name].current and listed[two.name].previous and not listed[one.name].problem


def test_install_refuses_a_tampered_bundle_and_keeps_current(tmp_path: Path, data_dir: Path, key: Path) -> None:
    good = install_bundle(make_bundle(tmp_path, key, "good"), data_dir)
    bad = make_bundle(tmp_path, key, "bad", b"<other/>")
    (bad / "models/pancreas.stage1.openvino-int8.xml").write_bytes(b"<evil/>")
    with pytest.raises(BundleError, match="pancreas.stage1.openvino-int8.xml: sha256 mismatch"):
        install_bundle(bad, data_dir)
    assert current_bundle(data_dir) == good
    assert [b.bundle_id for b in list_bundles(data_dir)] == [good.name]


def test_rollback_without_previous_and_onto_damaged_bundle(tmp_path: Path, data_dir: Path, key: Path) -> None:
    with pytest.raises(BundleError, match="no previous bundle"):
        rollback(data_dir)
    one = install_bundle(make_bundle(tmp_path, key, "one", b"<1/>"), data_dir)
    two = install_bundle(make_bundle(tmp_path, key, "two", b"<2/>"), data_dir)
    (one / "models/pancreas.stage1.openvino-int8.bin").write_bytes(b"rot")
    with pytest.raises(BundleError, match="pancreas.stage1.openvino-int8.bin: sha256 mismatch"):
        rollback(data_dir)
    assert current_bundle(data_dir) == two


def test_cli_verify_names_the_modified_file(tmp_path: Path, data_dir: Path, key: Path) -> None:
    bundle = make_bundle(tmp_path, key)
    ok = run_cli("bundle", "verify", str(bundle), data_dir=data_dir)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout and "pancreas.stage1: openvino/CPU/int8" in ok.stdout
    (bundle / "models/pancreas.stage1.openvino-int8.xml").write_bytes(b"<changed/>")
    bad = run_cli("bundle", "verify", str(bundle), data_dir=data_dir)
    assert bad.returncode == 1
    assert "models/pancreas.stage1.openvino-int8.xml: sha256 mismatch" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_install_list_rollback(tmp_path: Path, data_dir: Path, key: Path) -> None:
    first, second = make_bundle(tmp_path, key, "one", b"<a/>"), make_bundle(tmp_path, key, "two", b"<b/>")
    assert run_cli("bundle", "install", str(first), data_dir=data_dir).returncode == 0
    assert run_cli("bundle", "install", str(second), data_dir=data_dir).returncode == 0
    listing = run_cli("bundle", "list", data_dir=data_dir, check=True).stdout
    assert listing.count("current") == 1 and listing.count("previous") == 1
    back = run_cli("bundle", "rollback", data_dir=data_dir)
    assert back.returncode == 0 and "rolled back" in back.stdout

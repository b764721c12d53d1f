"""Upgrades (issue 13 item 9): the database migrates at start in one transaction, so a failed migration leaves it
exactly as the old version left it (and that version runs on it); a copy is kept before migrating; a bundle rolls
back with one command, also with the keys where provisioning puts them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from edgescreen.appliance.bundle import current_bundle, ensure_signing_key
from edgescreen.appliance.store import Store, StoreError
from edgescreen.appliance.store import db as db_module
from edgescreen.appliance.store.migrations import MIGRATIONS
from tests.conftest import run_cli


def dump(path: Path) -> tuple[int, list[str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0], list(conn.iterdump())


def old_version_store(data_dir: Path, monkeypatch: pytest.MonkeyPatch, upto: int) -> None:
    """A database as an older edgescreen (knowing only the first `upto` migrations) left it, with data in it."""
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS[:upto])
    store = Store(data_dir)
    store.add_event("scanner", "test", "idle", "written by the old version")
    store.audit("tech", "old.action", "x")
    store.close()
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)


def test_failed_migration_changes_nothing_and_the_old_version_still_runs(data_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    old = len(MIGRATIONS) - 2  # two migrations pending, then a broken third: all three or none
    old_version_store(data_dir, monkeypatch, old)
    before = dump(data_dir / "edgescreen.db")
    broken = [*MIGRATIONS, "CREATE TABLE half_done (a INTEGER); ALTER TABLE no_such_table ADD COLUMN b TEXT"]
    monkeypatch.setattr(db_module, "MIGRATIONS", broken)
    with pytest.raises(StoreError, match=f"upgrading schema {old} to {len(broken)} failed at migration "
                       f"{len(broken)}.*nothing was changed, the previous edgescreen version still runs on it"):
        Store(data_dir)
    assert dump(data_dir / "edgescreen.db") == before, "a failed upgrade must leave the old database untouched"
    # the old version opens it and finds its data
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS[:old])
    store = Store(data_dir)
    assert store.schema_version() == old
    assert store.query_one("SELECT detail FROM events")[0] == "written by the old version"


def test_successful_migration_keeps_a_copy_of_the_old_database(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = len(MIGRATIONS) - 1
    old_version_store(data_dir, monkeypatch, old)
    before = dump(data_dir / "edgescreen.db")
    store = Store(data_dir)
    assert store.schema_version() == len(MIGRATIONS)
    backup = data_dir / f"edgescreen.db.v{old}.bak"
    assert dump(backup) == before, "the copy is the database exactly as the old version left it"
    # going back: the old version runs on the copy
    restored = data_dir.parent / "restored"
    restored.mkdir()
    (restored / "edgescreen.db").write_bytes(backup.read_bytes())
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS[:old])
    assert Store(restored).schema_version() == old
    # a store already current neither migrates nor copies again
    backup.unlink()
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)
    Store(data_dir)
    assert not backup.exists()


def test_a_newer_database_is_refused_with_what_to_do(data_dir: Path) -> None:
    Store(data_dir).connect().execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this edgescreen.*install the newer version or restore a backup"):
        Store(data_dir)


def _bundle(tmp: Path, key: Path, name: str, payload: bytes) -> Path:
    from edgescreen.optimize.bundle import write_bundle

    src = tmp / f"src-{name}"
    src.mkdir()
    (src / "m.onnx").write_bytes(payload)
    (src / "card.json").write_text(json.dumps({"role": "pancreas.stage1", "name": name, "version": "1"}))
    out = tmp / name
    write_bundle(out, profile="x86-cpu", key_path=key, report={"models": []}, render_md=lambda r: "# r\n",
                 chosen={"pancreas.stage1": {"artifact": src / "m.onnx", "files": [src / "m.onnx"],
                                             "card_path": src / "card.json", "card_file": "m.onnx",
                                             "source": src / "m.onnx",
                                             "entry": {"backend": "onnxruntime", "device": "CPU", "precision": "fp32",
                                                       "gate": {"passed": True}}}})
    return out


def test_bundle_rollback_is_one_command_with_the_keys_outside_the_data_dir(tmp_path: Path) -> None:
    """As provisioning lays a box out: keys in <config dir>/keys (root's), bundles in the data dir."""
    etc, data = tmp_path / "etc/edgescreen", tmp_path / "var/lib/edgescreen"
    etc.mkdir(parents=True)
    (etc / "site.toml").write_text(f'data_dir = "{data}"\n')
    key = ensure_signing_key(etc)
    first, second = _bundle(tmp_path, key, "first", b"one"), _bundle(tmp_path, key, "second", b"two")
    cli = ("--config", str(etc / "site.toml"))
    for bundle in (first, second):
        proc = run_cli(*cli, "bundle", "install", str(bundle))
        assert proc.returncode == 0, proc.stderr
    ids = [json.loads((b / "manifest.json").read_text())["bundle_id"] for b in (first, second)]
    assert current_bundle(data).name == ids[1]
    assert not (data / "keys").exists(), "no key may be created in the data directory"
    proc = run_cli(*cli, "bundle", "rollback")
    assert proc.returncode == 0 and f"rolled back: {ids[0]}" in proc.stdout, proc.stderr
    assert current_bundle(data).name == ids[0]
    listing = {b["bundle_id"]: b for b in json.loads(run_cli(*cli, "bundle", "list", "--json", check=True).stdout)}
    assert listing[ids[0]]["current"] and listing[ids[1]]["previous"] and not listing[ids[0]]["problem"]
    # a damaged previous bundle is refused, not switched to
    victim = next((data / "bundles" / ids[1] / "models").glob("*.onnx"))
    victim.write_bytes(b"damaged")
    proc = run_cli(*cli, "bundle", "rollback")
    assert proc.returncode == 1 and "sha256 mismatch" in proc.stderr
    assert current_bundle(data).name == ids[0]

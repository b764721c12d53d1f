"""One data-directory rule (issue 13 item 4): on a provisioned box root and the service user use the service's data
directory, never a home directory; when two candidates hold a store, the command says which it chose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgescreen.appliance.cli import main
from edgescreen.appliance.config import load
from edgescreen.appliance.config.site import SiteConfig
from edgescreen.appliance.store import Store


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A provisioned box in miniature: the system config and data dir moved under tmp_path, a home directory."""
    etc, var, home = tmp_path / "etc/edgescreen", tmp_path / "var/lib/edgescreen", tmp_path / "root"
    etc.mkdir(parents=True)
    home.mkdir()
    monkeypatch.setattr(load, "SYSTEM_CONFIG", etc / "site.toml")
    monkeypatch.setattr(load, "SYSTEM_DATA_DIR", var)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("EDGESCREEN_DATA_DIR", raising=False)
    monkeypatch.delenv("EDGESCREEN_CONFIG", raising=False)
    return {"config": etc / "site.toml", "service": var, "home": home / ".local/share/edgescreen"}


def test_provisioned_box_without_data_dir_in_config_uses_the_service_dir_for_root(box) -> None:
    box["config"].write_text('[site]\nname = "clinic"\n')  # a site.toml that names no data_dir (the reported bug)
    for user in ("root", "edgescreen", "technician"):
        choice = load.choose_data_dir(None, SiteConfig(), box["config"], user=user)
        assert choice.path == box["service"] and choice.source == "the service's default", user


def test_the_config_data_dir_wins_over_the_default(box) -> None:
    box["config"].write_text(f'data_dir = "{box["service"]}-big-disk"\n')
    cfg = load.load_site_config(box["config"])
    choice = load.choose_data_dir(None, cfg, box["config"], user="root")
    assert choice.path == Path(f"{box['service']}-big-disk") and "site config" in choice.source


def test_service_user_without_any_config_never_uses_a_home_dir(box) -> None:
    box["config"].unlink(missing_ok=True)
    assert load.choose_data_dir(None, SiteConfig(), None, user="edgescreen").path == box["service"]
    # a developer's machine: no system config, an ordinary (or root) user -> ~/.local/share
    assert load.choose_data_dir(None, SiteConfig(), None, user="root").path == box["home"]


def test_two_stores_the_choice_is_said(box, capsys: pytest.CaptureFixture[str]) -> None:
    box["config"].write_text('[site]\nname = "clinic"\n')
    Store(box["home"]).close()  # the store a root shell made in /root before the fix
    Store(box["service"]).close()
    choice = load.choose_data_dir(None, SiteConfig(), box["config"], user="root")
    assert choice.path == box["service"]
    assert choice.note == (f"using data dir {box['service']} (from the service's default); "
                           f"not {box['home']} (your home directory)")
    # an explicit --data-dir is obeyed, and the service's store it passes over is named
    chosen = load.resolve_paths(box["home"], SiteConfig(), box["config"])
    assert chosen == box["home"] and f"not {box['service']}" in capsys.readouterr().err


@pytest.fixture
def own_logging():
    """main() installs a log handler on this test's captured stderr; later in-process tests must not inherit it."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_cli_as_root_on_a_provisioned_box_reads_the_service_store(box, own_logging,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`sudo edgescreen jobs` on a box whose site.toml has no data_dir: the service's queue, not an empty one."""
    from edgescreen.appliance.store import jobs
    from edgescreen.appliance.store.instances import IncomingInstance, store_instance

    box["config"].write_text('[site]\nname = "clinic"\n')
    store = Store(box["service"])
    inst = IncomingInstance("1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.4", instance_number=1,
                            study={"patient_id": "P"}, series={"modality": "CT"})
    store_instance(store, inst, b"x" * 10)
    job_id = jobs.enqueue(store, "1.2.3", "1.2.3.4", "pancreas")
    assert main(["jobs", "--json"]) == 0
    assert [row["id"] for row in json.loads(capsys.readouterr().out)] == [job_id]
    assert not box["home"].exists(), "a store was created in the home directory"

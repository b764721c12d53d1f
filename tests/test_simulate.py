"""The clinic-day simulator on the shipped traces: no inference ever overlaps the scanner's busy time."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

TRACES = sorted((REPO / "appliance" / "scheduler" / "traces").glob("*.json"))


def test_three_traces_ship() -> None:
    names = {t.stem for t in TRACES}
    assert {"busy-urban-day", "rural-day-outages", "night-backlog"} <= names


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_trace_replays_without_overlap(trace: Path, tmp_path: Path) -> None:
    out, svg = tmp_path / "out.json", tmp_path / "t.svg"
    proc = run_cli("simulate", str(trace), "--json", str(out), "--svg", str(svg), data_dir=tmp_path / "d")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    for key in ("overlap_seconds", "jobs_total", "jobs_done", "wait_s_median", "wait_s_p95"):
        assert key in figures
    assert figures["overlap_seconds"] == 0
    assert figures["jobs_total"] > 0 and figures["jobs_done"] == figures["jobs_total"]
    assert figures["max_preemption_latency_s"] <= json.loads(trace.read_text())["model"]["tile_batch_s"]
    root = ET.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    spans = lambda cls: [(float(r.get("x")), float(r.get("x")) + float(r.get("width")))  # noqa: E731
                         for r in root.iter(f"{ns}rect") if r.get("class") == cls]
    runs, busy = spans("run"), spans("busy")
    assert runs and busy
    for a0, a1 in runs:  # pixel spans may touch at a shared edge, never overlap inside
        assert not any(a0 < b1 - 0.6 and b0 + 0.6 < a1 for b0, b1 in busy)


def test_rural_trace_defers_on_low_battery(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    run_cli("simulate", str(REPO / "appliance/scheduler/traces/rural-day-outages.json"), "--json", str(out),
            data_dir=tmp_path / "d", check=True)
    figures = json.loads(out.read_text())
    # the two studies that arrive on a low battery wait for mains plus its grace: the p95 wait shows it
    assert figures["wait_s_p95"] > 600


def test_bad_trace_is_exit_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "duration_h": 1, "model": {}, "exams": [
        {"mpps_in_progress_min": 10, "busy_min": [5, 12], "mpps_completed_min": 13}]}))
    proc = run_cli("simulate", str(bad), data_dir=tmp_path / "d")
    assert proc.returncode == 2 and "exams[0]" in proc.stderr


def test_overlap_is_measured_when_the_scanner_gives_no_warning(tmp_path: Path) -> None:
    """Negative control: with no positioning time between MPPS IN PROGRESS and the scanner's draw, a
    running job finishes its tile batch into the busy window; the simulator must see that, and it
    must stay within one batch."""
    trace = {"name": "no warning", "duration_h": 1, "exams": [
        {"mpps_in_progress_min": 10, "busy_min": [10, 15], "mpps_completed_min": 16, "studies": []}],
        "arrivals": [{"t_min": 1.05, "pipeline": "mammo"}],  # batches end at 603 s, not 600 s
        "model": {"pancreas_s": 60, "mammo_s": 3600, "tile_batch_s": 5}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    out = tmp_path / "out.json"
    proc = run_cli("simulate", str(path), "--json", str(out), data_dir=tmp_path / "d")
    figures = json.loads(out.read_text())
    assert proc.returncode == 1
    assert 0 < figures["overlap_seconds"] <= 5
    assert figures["preemptions"] == 1 and figures["jobs_done"] == 1

"""Replaying a clinic day through the real scheduler code with a virtual clock.

The scanner, the UPS and the studies come from a trace; the decisions come from the same
`combine`, `PowerGate` and `jobs.claim_next` the worker uses (the queue is a real store in a
temporary directory). Jobs are modelled as tile batches of fixed duration, preemptible between
batches, as the pipeline is. The scanner's power draw (the `busy` windows of the trace) starts a
positioning time after MPPS IN PROGRESS, which is what lets the gate close before the first
exposure; overlap between inference and those windows is what the simulator exists to prove is 0.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from pydantic import ValidationError

from edgescreen.appliance.config.load import describe_error
from edgescreen.appliance.config.profile import HardwareProfile
from edgescreen.appliance.config.site import Power, Scheduler
from edgescreen.appliance.power.sources import PowerReading
from edgescreen.appliance.scheduler.policy import PowerGate, plan
from edgescreen.appliance.scheduler.scanner import ScannerSignal, combine
from edgescreen.appliance.store import Store, jobs

TRACE_KEYS = {"name", "description", "start_clock", "duration_h", "exams", "arrivals", "power", "model",
              "scheduler", "power_policy"}


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the field."""


@dataclass
class SimJob:
    id: int
    pipeline: str
    arrive: float
    work_s: float
    urgent: bool = False
    done_s: float = 0.0
    first_start: float | None = None
    finished: float | None = None
    preemptions: int = 0
    energy_j: float = 0.0


@dataclass
class SimResult:
    trace: str
    duration_s: float
    overlap_seconds: float = 0.0
    inference_after_mpps_s: float = 0.0
    max_preemption_latency_s: float = 0.0
    jobs: list[SimJob] = field(default_factory=list)
    runs: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, pipeline)
    power_states: list[tuple[float, float, str]] = field(default_factory=list)
    box_energy_wh: float = 0.0

    def summary(self, trace: dict) -> dict:
        done = [j for j in self.jobs if j.finished is not None]
        waits = [j.first_start - j.arrive for j in self.jobs if j.first_start is not None]
        mpps = _windows(trace, "mpps_in_progress_min", "mpps_completed_min")

        def idle_since(t: float, arrive: float) -> float:
            """When the scanner last turned idle before t (or the arrival, if later): the grace starts there."""
            return max([arrive] + [b for a, b in mpps if b <= t])

        after_idle = [j.first_start - idle_since(j.first_start, j.arrive) for j in self.jobs if j.first_start is not None]
        turn = [j.finished - j.arrive for j in done]
        return {
            "trace": self.trace,
            "duration_h": self.duration_s / 3600,
            "overlap_seconds": self.overlap_seconds,
            "inference_after_mpps_in_progress_s": self.inference_after_mpps_s,
            "max_preemption_latency_s": round(self.max_preemption_latency_s, 1),
            "jobs_total": len(self.jobs),
            "jobs_done": len(done),
            "jobs_by_pipeline": {p: sum(1 for j in self.jobs if j.pipeline == p) for p in sorted({j.pipeline for j in self.jobs})},
            "wait_s_median": _pct(waits, 50),
            "wait_s_p95": _pct(waits, 95),
            "wait_after_idle_s_median": _pct(after_idle, 50),
            "wait_after_idle_s_p95": _pct(after_idle, 95),
            "turnaround_s_median": _pct(turn, 50),
            "turnaround_s_p95": _pct(turn, 95),
            "preemptions": sum(j.preemptions for j in self.jobs),
            "energy_j_per_study": round(sum(j.energy_j for j in done) / len(done), 1) if done else None,
            "box_energy_wh": round(self.box_energy_wh, 1),
            "exams": len(trace["exams"]),
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return round(float(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)), 1)


def load_trace(path: Path) -> dict:
    try:
        trace = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TraceError(f"{path}: trace not found") from None
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    unknown = set(trace) - TRACE_KEYS
    if unknown:
        raise TraceError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(TRACE_KEYS)}")
    for key in ("name", "duration_h", "exams", "model"):
        if key not in trace:
            raise TraceError(f"{path}: missing '{key}'")
    for i, exam in enumerate(trace["exams"]):
        need = ("mpps_in_progress_min", "busy_min", "mpps_completed_min")
        missing = [k for k in need if k not in exam]
        if missing:
            raise TraceError(f"{path}: exams[{i}] lacks {missing}")
        b0, b1 = exam["busy_min"]
        if not exam["mpps_in_progress_min"] <= b0 <= b1 <= exam["mpps_completed_min"]:
            raise TraceError(f"{path}: exams[{i}]: need mpps_in_progress <= busy start <= busy end <= mpps_completed")
    for section, model_cls in (("scheduler", Scheduler), ("power_policy", Power)):
        try:
            model_cls(**trace.get(section, {}))
        except ValidationError as exc:
            raise TraceError(describe_error(exc, Path(path), prefix=f"{section}.")) from None
    for pipeline in {a.get("pipeline") for a in trace.get("arrivals", [])} | {
            p for e in trace["exams"] for p in e.get("studies", ["pancreas"])}:
        if pipeline not in ("pancreas", "mammo"):
            raise TraceError(f"{path}: unknown pipeline {pipeline!r}; use pancreas or mammo")
        if f"{pipeline}_s" not in trace["model"]:
            raise TraceError(f"{path}: model.{pipeline}_s is missing (compute seconds per {pipeline} study)")
    return trace


def _windows(trace: dict, key_start: str, key_end: str | None = None) -> list[tuple[float, float]]:
    out = []
    for exam in trace["exams"]:
        if key_end is None:
            a, b = exam[key_start]
        else:
            a, b = exam[key_start], exam[key_end]
        out.append((a * 60.0, b * 60.0))
    return out


def _inside(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t < b for a, b in windows)


class _Battery:
    """A UPS for the box: drains with the box's draw on battery, recharges on mains."""

    def __init__(self, capacity_wh: float, percent: float, low_percent: float) -> None:
        self.capacity_wh = capacity_wh
        self.percent = percent
        self.low_percent = low_percent

    def step(self, dt: float, on_mains: bool, watts: float) -> None:
        delta = (dt / 3600) * (watts if not on_mains else -self.capacity_wh * 0.2) / self.capacity_wh * 100
        self.percent = min(100.0, max(0.0, self.percent - delta))

    def reading(self, t: float, on_mains: bool, watts: float) -> PowerReading:
        runtime = self.capacity_wh * self.percent / 100 / max(watts, 1.0) * 3600
        low = self.percent <= self.low_percent
        status = ("OL" if on_mains else "OB") + (" LB" if low else "")
        return PowerReading(on_mains=on_mains, low_battery=low, forced_shutdown=False, battery_percent=self.percent,
                            runtime_s=runtime, ups_realpower_w=None, ups_load_percent=None, status_raw=status,
                            source="sim", taken_at=t, stale=False, error=None)


def simulate(trace: dict, profile: HardwareProfile, *, step_s: float = 1.0) -> SimResult:
    model = trace["model"]
    sched = Scheduler(**trace.get("scheduler", {}))
    power_cfg = Power(**trace.get("power_policy", {}))
    gate = PowerGate(sched, power_cfg, profile)
    duration = trace["duration_h"] * 3600.0
    mpps = _windows(trace, "mpps_in_progress_min", "mpps_completed_min")
    busy = _windows(trace, "busy_min")
    batch_s = float(model.get("tile_batch_s", 2.0))
    quiet_s = float(model.get("store_quiet_s", sched.store_quiet_s))
    power_events = sorted(trace.get("power", []), key=lambda e: e["t_min"])
    battery = _Battery(float(model.get("ups_capacity_wh", 300.0)), float(model.get("battery_percent", 100.0)),
                       float(model.get("low_battery_percent", 20.0)))

    arrivals: list[tuple[float, str, bool, bool]] = []
    for exam in trace["exams"]:
        for pipeline in exam.get("studies", ["pancreas"]):
            arrivals.append((exam["busy_min"][1] * 60.0 + float(model.get("transfer_s", 20.0)), pipeline, False, False))
    for a in trace.get("arrivals", []):
        arrivals.append((a["t_min"] * 60.0, a["pipeline"], bool(a.get("urgent", False)), bool(a.get("run_now", False))))
    arrivals.sort()
    image_windows = [(t - float(model.get("transfer_s", 20.0)), t + quiet_s) for t, p, _, _ in arrivals if p == "pancreas"]

    result = SimResult(trace["name"], duration)
    with tempfile.TemporaryDirectory(prefix="edgescreen-sim-") as tmp:
        store = Store(tmp)
        sim_jobs: dict[int, SimJob] = {}
        next_arrival = 0
        running: SimJob | None = None
        running_flags = (False, False)  # (run_now, starving) of the running job, as the worker passes them
        run_started = 0.0
        batch_left = 0.0
        on_mains = True
        power_idx = 0
        state_start, state_name = 0.0, "mains"
        t = 0.0
        while t < duration or running is not None or any(j.finished is None for j in sim_jobs.values()):
            if t > duration + 7 * 24 * 3600:
                break  # a backlog that a week cannot clear is reported as unfinished
            while power_idx < len(power_events) and power_events[power_idx]["t_min"] * 60.0 <= t:
                ev = power_events[power_idx]
                on_mains = ev["status"].startswith("OL")
                if "battery_percent" in ev:
                    battery.percent = float(ev["battery_percent"])
                power_idx += 1
            while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= t:
                at, pipeline, urgent, run_now = arrivals[next_arrival]
                uid = f"2.25.{next_arrival + 1}"
                with store.transaction() as conn:
                    conn.execute("INSERT INTO studies (study_uid, received_at, updated_at) VALUES (?, ?, ?)", (uid, at, at))
                    conn.execute("INSERT INTO series (series_uid, study_uid, first_received_at, last_received_at) "
                                 "VALUES (?, ?, ?, ?)", (uid + ".1", uid, at, at))
                job_id = jobs.enqueue(store, uid, uid + ".1", pipeline, actor="simulator", created_at=at,
                                      urgent=urgent, run_now=run_now)
                sim_jobs[job_id] = SimJob(job_id, pipeline, at, float(model[f"{pipeline}_s"]), urgent)
                next_arrival += 1

            in_mpps = _inside(t, mpps)
            since = max((b for a, b in mpps if b <= t), default=None) if not in_mpps else \
                max(a for a, b in mpps if a <= t < b)
            signals = [ScannerSignal("mpps", in_mpps, since, "MPPS exam in progress" if in_mpps else "MPPS exam ended")]
            receiving = _inside(t, image_windows)
            signals.append(ScannerSignal("store", receiving, None, "receiving images" if receiving else "no images arriving"))
            scanner = combine(signals, rule=sched.scanner_rule, failsafe=sched.failsafe)
            mode_watts = profile.mode_for(on_battery=not on_mains).watts
            draw = mode_watts if running is not None else profile.idle_watts
            reading = battery.reading(t, on_mains, draw)

            if running is not None and batch_left <= 0:
                # a safe point: between tile batches the worker asks the gate again, with the job's own flags
                decision = gate.decide(t, scanner, reading, run_now=running_flags[0], starving=running_flags[1])
                if running.done_s >= running.work_s - 1e-9:
                    running.finished = t
                    result.runs.append((run_started, t, running.pipeline))
                    jobs.finish(store, running.id, "sim", triage="not_suspicious", findings_json="{}", output_dir="")
                    running = None
                elif not decision.run:
                    running.preemptions += 1
                    result.runs.append((run_started, t, running.pipeline))
                    jobs.release(store, running.id, "sim", to="queued", reason=decision.reason)
                    running = None
                else:
                    speed = decision.mode.threads / profile.mode_for(on_battery=False).threads
                    batch_left = batch_s / max(speed, 1e-3)
            if running is None:
                oldest = store.query_one("SELECT MIN(created_at) FROM jobs WHERE state = 'queued'")[0]
                run_now_waiting = store.query_one(
                    "SELECT 1 FROM jobs WHERE state = 'queued' AND run_now = 1") is not None
                decision, only_run_now, starving = plan(
                    gate, t, scanner, reading, oldest_queued_age_s=t - oldest if oldest is not None else 0.0,
                    starvation_s=sched.starvation_s, run_now_waiting=run_now_waiting)
                if decision.run:
                    claimed = jobs.claim_next(store, "sim", 1e9, now=t, starvation_s=sched.starvation_s,
                                              only_run_now=only_run_now)
                    if claimed is not None:
                        running = sim_jobs[claimed["id"]]
                        running_flags = (bool(claimed["run_now"]), starving)
                        running.first_start = running.first_start if running.first_start is not None else t
                        run_started = t
                        speed = decision.mode.threads / profile.mode_for(on_battery=False).threads
                        batch_left = batch_s / max(speed, 1e-3)

            if running is not None:
                speed = profile.mode_for(on_battery=not on_mains).threads / profile.mode_for(on_battery=False).threads
                running.done_s += step_s * speed
                running.energy_j += step_s * mode_watts
                batch_left -= step_s
                if _inside(t, busy):
                    result.overlap_seconds += step_s
                if in_mpps:
                    result.inference_after_mpps_s += step_s
                    start_of_exam = max(a for a, b in mpps if a <= t < b)
                    result.max_preemption_latency_s = max(result.max_preemption_latency_s, t + step_s - start_of_exam)
            name = "lb" if reading.low_battery else ("mains" if on_mains else "battery")
            if name != state_name:
                result.power_states.append((state_start, t, state_name))
                state_start, state_name = t, name
            battery.step(step_s, on_mains, draw)
            result.box_energy_wh += draw * step_s / 3600
            t += step_s
        result.power_states.append((state_start, t, state_name))
        result.duration_s = max(duration, t)
        result.jobs = list(sim_jobs.values())
        store.close()
    return result


def render_svg(result: SimResult, trace: dict) -> str:
    """A timeline: scanner MPPS windows and busy bands, power state, inference runs, arrivals."""
    width, left, row_h = 1200, 110, 26
    span = result.duration_s
    x = lambda s: left + (width - left - 10) * s / span  # noqa: E731
    rows = {"MPPS": 30, "scanner busy": 30 + row_h, "power": 30 + 2 * row_h, "inference": 30 + 3 * row_h,
            "arrivals": 30 + 4 * row_h}
    height = 30 + 5 * row_h + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><title>{escape(trace["name"])}</title>',
             f'<text x="{left}" y="16" font-size="13">{escape(trace["name"])}: overlap {result.overlap_seconds:.0f} s, '
             f'{sum(1 for j in result.jobs if j.finished is not None)}/{len(result.jobs)} jobs done</text>']
    for label, y in rows.items():
        parts.append(f'<text x="4" y="{y + 16}">{label}</text>')
    for a, b in _windows(trace, "mpps_in_progress_min", "mpps_completed_min"):
        parts.append(f'<rect class="mpps" x="{x(a):.1f}" y="{rows["MPPS"] + 4}" width="{max(x(b) - x(a), 0.5):.1f}" '
                     f'height="{row_h - 8}" fill="#f4b6b6"/>')
    for a, b in _windows(trace, "busy_min"):
        parts.append(f'<rect class="busy" x="{x(a):.1f}" y="{rows["scanner busy"] + 4}" '
                     f'width="{max(x(b) - x(a), 0.5):.1f}" height="{row_h - 8}" fill="#c0392b"/>')
    colours = {"mains": "#2e8b57", "battery": "#e67e22", "lb": "#c0392b"}
    for a, b, name in result.power_states:
        if b > a:
            parts.append(f'<rect class="power-{name}" x="{x(a):.1f}" y="{rows["power"] + 4}" '
                         f'width="{max(x(b) - x(a), 0.5):.1f}" height="{row_h - 8}" fill="{colours[name]}"/>')
    for a, b, pipeline in result.runs:
        fill = "#2c6fbb" if pipeline == "pancreas" else "#8e44ad"
        parts.append(f'<rect class="run" x="{x(a):.1f}" y="{rows["inference"] + 4}" width="{max(x(b) - x(a), 0.5):.1f}" '
                     f'height="{row_h - 8}" fill="{fill}"/>')
    for j in result.jobs:
        parts.append(f'<line x1="{x(j.arrive):.1f}" x2="{x(j.arrive):.1f}" y1="{rows["arrivals"] + 4}" '
                     f'y2="{rows["arrivals"] + row_h - 4}" stroke="#333"/>')
    for h in range(0, int(span // 3600) + 1, 2):
        parts.append(f'<text x="{x(h * 3600):.1f}" y="{height - 8}">{h} h</text>')
    parts.append("</svg>")
    return "\n".join(parts)

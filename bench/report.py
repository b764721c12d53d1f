"""Render bench/REPORT.md from bench/results.json: every section present, each with its machine and command.

    .venv/bin/python bench/report.py [--results bench/results.json] [--out bench/REPORT.md]

The performance sections (issue 15) have their own tables; any other section (fuzz, drills, load, scale,
web, sync, ...) is rendered generically from its figures, so a section another benchmark adds appears
without a change here. Nothing is computed: the report shows what results.json holds, figures truncated
as the benchmarks wrote them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ORDER = ("dicom_receive", "ct_load", "models", "ct_study", "mammo_exam", "scheduler")
TITLES = {
    "dicom_receive": "DICOM receive (edgescreen dicom against dcmtk storescp)",
    "ct_load": "CT series loading (ctload against a plain pydicom loop)",
    "models": "Optimised models (the bundle's artifacts against ONNX Runtime FP32)",
    "ct_study": "A whole CT study (the bundle against the all-FP32 pipeline)",
    "mammo_exam": "A four-view mammography exam (model session cached)",
    "scheduler": "Scheduler over the shipped clinic-day traces",
}


def _truncated(value: float, significant: int = 4) -> str:
    """Four significant digits, truncated toward zero (0.99587 is 0.9958, never 0.9959); whole above 1000."""
    if not math.isfinite(value) or value == 0:
        return str(value)
    if abs(value) >= 1000:
        return str(int(value))
    decimals = max(significant - (math.floor(math.log10(abs(value))) + 1), 0)
    scale = 10**decimals
    text = f"{math.trunc(value * scale) / scale:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return _truncated(value)
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k} {fmt(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
    return str(value).replace("|", "/").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]]


def machine_line(section: dict[str, Any]) -> str:
    m = section.get("machine") or {}
    return (f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, load average {m.get('load_avg_1m_at_start', '?')} "
            f"at the start, {m.get('measured_at', '?')}. Command: `{section.get('command', '?')}`")


def scalars(section: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    rows = [[k, v] for k, v in section.items()
            if k not in ("machine", "command", *skip) and not isinstance(v, (dict, list)) or
            (isinstance(v, list) and k not in skip and all(not isinstance(x, (dict, list)) for x in v))]
    rows = [r for r in rows if r[0] not in ("machine", "command", *skip)]
    return table(["figure", "value"], rows) if rows else []


def generic(section: dict[str, Any], depth: int = 0) -> list[str]:
    """Scalars as a table; each nested object as a sub-table; a list of objects as a table of its keys."""
    lines = scalars(section)
    for key, value in section.items():
        if key in ("machine", "command"):
            continue
        if isinstance(value, dict) and value:
            if all(isinstance(v, dict) for v in value.values()):
                cols = list(dict.fromkeys(k for v in value.values() for k, x in v.items() if not isinstance(x, (dict, list))))
                lines += ["", f"{key}:", "", *table(["", *cols], [[name, *[v.get(c) for c in cols]] for name, v in value.items()])]
            else:
                lines += ["", f"{key}:", "", *generic(value, depth + 1)]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            cols = list(dict.fromkeys(k for v in value for k, x in v.items() if not isinstance(x, (dict, list))))
            lines += ["", f"{key}:", "", *table(cols, [[v.get(c) for c in cols] for v in value])]
    return lines


def dicom_receive(s: dict[str, Any]) -> list[str]:
    return scalars(s, skip=("rounds_detail",)) + (["", *table(["round", "storescp s", "edgescreen s", "ratio"],
                                                              [[i + 1, r.get("storescp_s"), r.get("edgescreen_s"), r.get("ratio")]
                                                               for i, r in enumerate(s.get("rounds_detail", []))])]
                                                  if s.get("rounds_detail") else [])


def models(s: dict[str, Any]) -> list[str]:
    rows = []
    for role, m in (s.get("models") or {}).items():
        g = m.get("gate") or {}
        gate = ("passed" if g.get("passed") else "FAILED") + "".join(
            f", {k} {fmt(g[k])}" for k in ("dice_vs_fp32", "dice_vs_truth_drop", "auc_drop", "decision_agreement",
                                          "heatmap_corr", "features_rel_error", "ood_flag_rate") if g.get(k) is not None)
        rows.append([role, m.get("backend"), m.get("precision"), m.get("unit"), m.get("batch"), m.get("ms"),
                     m.get("baseline_ms"), f"{fmt(m.get('ratio'))}x", m.get("ratio_range"), m.get("cpu_ratio"),
                     m.get("peak_rss_mb"), gate])
    lines = scalars(s, skip=("models",))
    lines += ["", *table(["model", "backend", "precision", "per", "per call", "ms", "baseline ms (ORT FP32)", "ratio",
                          "ratio range (rounds)", "CPU-time ratio", "peak RSS MB", "gate"], rows)]
    vol = [(role, m["volume"]) for role, m in (s.get("models") or {}).items() if m.get("volume")]
    for role, v in vol:
        lines += ["", f"{role} over whole volumes ({fmt(v.get('shape'))}): window {fmt(v.get('window'))}; "
                  f"{fmt(v.get('ms'))} ms against {fmt(v.get('baseline_ms'))} ms for ORT FP32 as the card tiles: "
                  f"{fmt(v.get('ratio'))}x (range {fmt(v.get('ratio_range'))}; CPU-time ratio {fmt(v.get('cpu_ratio'))}); "
                  f"window gate {fmt(v.get('gate'))}"]
    notes = [f"- {role}: {m['note']}" for role, m in (s.get("models") or {}).items() if m.get("note")]
    return lines + (["", *notes] if notes else [])


def study(s: dict[str, Any], key: str) -> list[str]:
    lines = scalars(s, skip=("fp32", "with_bundle"))
    rows = []
    for name in ("fp32", "with_bundle"):
        f = s.get(name) or {}
        t = f.get(key) or {}
        rows.append([name, f.get("warm_s", f.get("cached_s")), f.get("cold_s", f.get("first_s")), f.get("model") or
                     fmt(f.get("models")), f.get("peak_rss_mb"), "; ".join(f"{k} {fmt(v)}" for k, v in t.items())])
    return lines + ["", *table(["pipeline", "s (cached sessions)", "s (first, cold)", "models", "peak RSS MB",
                                "timings_s"], rows)]


def scheduler(s: dict[str, Any]) -> list[str]:
    cols = ["overlap_seconds", "jobs_done", "jobs_total", "wait_s_median", "wait_s_p95", "wait_after_idle_s_median",
            "turnaround_s_median", "preemptions", "max_preemption_latency_s", "energy_j_per_study", "replay_wall_s"]
    return scalars(s, skip=("traces",)) + ["", *table(["trace", *cols], [[name, *[t.get(c) for c in cols]]
                                                                         for name, t in (s.get("traces") or {}).items()])]


RENDER: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "dicom_receive": dicom_receive, "models": models, "ct_study": lambda s: study(s, "warm_timings_s"),
    "mammo_exam": lambda s: study(s, "cached_timings_s"), "scheduler": scheduler,
}


def render(doc: dict[str, Any]) -> str:
    lines = ["# Benchmark report", "",
             "Generated by `bench/report.py` from `bench/results.json` (`make bench` writes both from one run; other "
             "targets such as `make fuzz` and `make drills` add their own sections). Every figure names the machine it "
             "was measured on, the load average when its run started and the command that reproduces it. The "
             "development machine is shared by several engineers: absolute times are noisy, so each performance "
             "figure is a same-run ratio against a baseline measured in alternating rounds. Figures are truncated, "
             "never rounded up.", ""]
    names = [n for n in ORDER if n in doc] + sorted(n for n in doc if n not in ORDER)
    short = [n for n in names if n in ORDER and isinstance(doc[n], dict) and doc[n].get("aim_met") is False]
    if short:
        lines += ["Aims not met in this run: " + ", ".join(short) + " (see each section).", ""]
    for name in names:
        section = doc[name]
        lines += [f"## {TITLES.get(name, name)} (`{name}`)", "", machine_line(section), ""]
        body = RENDER.get(name, generic)(section) if isinstance(section, dict) else [fmt(section)]
        lines += [*body, ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=HERE / "results.json")
    ap.add_argument("--out", type=Path, default=HERE / "REPORT.md")
    args = ap.parse_args(argv)
    doc = json.loads(args.results.read_text()) if args.results.is_file() else {}
    args.out.write_text(render(doc))
    print(f"wrote {args.out} ({len(doc)} section(s): {', '.join(doc) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

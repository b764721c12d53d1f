"""The optimiser's report: one table of candidate x accuracy x latency x memory x energy x selected.

Printed at the end of a run and saved in the bundle as report.md (for people) and report.json (for
tools and for the next engineer who wonders why a model runs on the CPU). Failed candidates stay in
the table with their figures and the reason: "INT8 was tried and lost 0.03 Dice" is information.
Progress bars go to stderr and only on a terminal, so logs and CI output stay clean.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a TTY."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, max(total, 1)
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        total = total or self.total
        width = 24
        filled = int(width * done / max(total, 1))
        elapsed = time.monotonic() - self.start
        self.stream.write(f"\r{self.label:<44.44} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:5.0f}s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):  # truncated, never rounded up: a 0.97996 Dice is not 0.9800
        scale = 10**digits
        return f"{math.trunc(value * scale) / scale:.{digits}f}"
    return str(value)


COLUMNS = ("candidate", "method", "status", "dice_vs_fp32", "dice_truth_drop", "auc_drop", "agreement",
           "heatmap_r", "p50_ms", "p95_ms", "speedup", "rss_mb", "energy_j", "selected")


def rows(models: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(role, cells) per candidate, in the column order above."""
    out = []
    for model in models:
        for cand in model["candidates"]:
            gate, bench = cand.get("gate") or {}, cand.get("bench") or {}
            energy = bench.get("energy_j_per_inference")
            energy_txt = "-" if energy is None else f"{energy:.3g}{'~' if bench.get('energy_estimated') else ''}"
            out.append((model["role"], [
                cand["candidate"], cand.get("method") or "-", cand["status"],
                _fmt(gate.get("dice_vs_fp32")), _fmt(gate.get("dice_vs_truth_drop")), _fmt(gate.get("auc_drop")),
                _fmt(gate.get("decision_agreement"), 3), _fmt(gate.get("heatmap_corr"), 3),
                _fmt(bench.get("latency_ms_p50"), 1),
                _fmt(bench.get("latency_ms_p95"), 1), _fmt(cand.get("speedup"), 2) + ("x" if cand.get("speedup") else ""),
                _fmt(bench.get("peak_rss_mb"), 0), energy_txt, "**yes**" if cand.get("selected") else "",
            ]))
    return out


def _selected_line(model: dict[str, Any]) -> str:
    chosen = next((c for c in model["candidates"] if c.get("selected")), None)
    if chosen is None:
        return "**No candidate passed the gates: this model has no artifact for this box.**"
    bench, base = chosen["bench"] or {}, model.get("baseline") or {}
    return (f"**Selected: {chosen['candidate']}** ({chosen['method']}): {_fmt(chosen.get('speedup'), 2)}x ONNX Runtime "
            f"FP32 (p50 {_fmt(base.get('latency_ms_p50'), 1)} -> {_fmt(bench.get('latency_ms_p50'), 1)} ms), "
            f"peak RSS {_fmt(bench.get('peak_rss_mb'), 0)} MB.")


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Optimisation report: profile {report['profile']}",
        "",
        f"Bundle `{report.get('bundle_id', '-')}`, created {report['created_at']} on {report['host']['cpu']} "
        f"({report['host']['cores']} cores), {report['elapsed_s']:.0f} s. Selection: {report['select']}.",
        "",
        "Gates (held-out cases, never calibrated on; seeds below): segmentation Dice vs FP32 >= "
        f"{report['thresholds']['dice_vs_fp32_min']}, Dice vs truth drop <= {report['thresholds']['dice_vs_truth_drop_max']}; "
        f"classification AUC drop <= {report['thresholds']['auc_drop_max']}, decision agreement >= "
        f"{report['thresholds']['decision_agreement_min']}; heatmap correlation >= {report['thresholds']['heatmap_corr_min']}.",
        "Speedup is the same-run ratio of ONNX Runtime FP32 p50 latency to the candidate's; `~` marks an "
        "energy estimate from the profile's watts, not a measurement.",
        "",
    ]
    for model in report["models"]:
        cal, held = model["calibration"], model["heldout"]
        lines += [
            f"## {model['role']} ({model['card']['name']} {model['card']['version']})",
            "",
            f"Calibration: {cal['cases']} cases from {cal['source']}, seeds {cal['seeds']}; held-out: {held['cases']} cases "
            f"from {held['source']}, seeds {held['seeds']}, {held['lesion_cases']} with lesions. "
            f"Input {model['input_shapes']}.",
            "",
            _selected_line(model),
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
        ]
        for role, cells in rows([model]):
            del role
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {c['candidate']}: {c['detail']}" for c in model["candidates"] if c.get("detail")]
        for c in model["candidates"]:
            failed = [a for a in c.get("attempts", [])[:-1] if a.get("error") or not (a.get("gate") or {}).get("passed")]
            if failed and c["status"] in ("passed", "selected"):
                tried = "; ".join(f"{a['method']} " + (f"failed to build ({a['error'][:80]})" if a.get("error") else
                                  f"skipped ({a['skipped']})" if a.get("skipped") else
                                  "failed the gate (" + ", ".join(a["gate"]["reasons"]) + ")") for a in failed)
                notes.append(f"- {c['candidate']}: first tried {tried}; then {c['method']} passed")
            skipped = [a for a in c.get("attempts", []) if a.get("skipped")]
            if skipped and c["status"] not in ("passed", "selected"):
                notes.append(f"- {c['candidate']}: {skipped[0]['method']} skipped: {skipped[0]['skipped']}")
        for c in model["candidates"]:
            g = c.get("gate") or {}
            if g.get("features_rel_error") is not None:
                flag = ("" if g.get("ood_flag_rate") is None else
                        f"; in-domain OOD flag rate {_fmt(g['ood_flag_rate'], 3)} (FP32 {_fmt(g.get('ood_flag_rate_fp32'), 3)}, "
                        f"target {_fmt(g.get('ood_target_flag_rate'), 3)})")
                notes.append(f"- {c['candidate']}: features drift vs FP32 {_fmt(g['features_rel_error'], 4)} relative L2, "
                             f"worst cosine {_fmt(g.get('features_cosine_min'), 4)} (reported, not gated){flag}")
        if notes:
            lines += ["", *notes]
        lines += _window_lines(model)
        lines.append("")
    return "\n".join(lines) + "\n"


def _window_lines(model: dict[str, Any]) -> list[str]:
    """A tiled model's window search: every option with its whole-volume gate and time."""
    win = model.get("window")
    if not win:
        return []
    ref = win["reference"]
    lines = ["", f"Window (whole held-out volumes {win['volume_shape']} and similar, {len(win['cases'])} cases; "
             f"reference ONNX Runtime FP32 at the card's {ref['patch']} overlap {ref['overlap']}, one tile per call, "
             f"{_fmt(win.get('reference_seconds_per_volume'), 2)} s per volume). Chosen: patch {win['chosen']['patch']}, "
             f"overlap {win['chosen']['overlap']}, {win['chosen']['batch']} tile(s) per call: "
             f"{_fmt(model.get('volume_speedup'), 2)}x per volume.", "",
             "| patch | overlap | tiles/call | s/volume | dice_vs_fp32 | dice_truth_drop | ood flag rate | gate |",
             "|---|---|---|---|---|---|---|---|"]
    for o in win["options"]:
        g = o.get("gate") or {}
        verdict = o["error"] if o.get("error") else ("passed" if g.get("passed") else "; ".join(g.get("reasons", [])))
        lines.append(f"| {o['patch']} | {o['overlap']} | {o['batch']} | {_fmt(o.get('seconds_per_volume'), 2)} | "
                     f"{_fmt(g.get('dice_vs_fp32'))} | {_fmt(g.get('dice_vs_truth_drop'))} | "
                     f"{_fmt(g.get('ood_flag_rate'), 3)} | {verdict} |")
    return lines


def text_table(report: dict[str, Any]) -> str:
    """The same table for a terminal: fixed-width columns, role as the first column."""
    header = ["model", *COLUMNS]
    body = [[role, *[c.replace("**", "") for c in cells]] for role, cells in rows(report["models"])]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*r) for r in body]
    return "\n".join(out) + "\n"

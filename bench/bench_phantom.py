"""Benchmark: how long a full phantom study takes (the budget: a 300-slice CT study in <= 10 s).

Prints wall and CPU seconds for rendering and for writing DICOM, plus a same-run baseline: writing
the same pixel bytes as plain files (the I/O floor), so the figure can be compared across machines.

    .venv/bin/python bench/bench_phantom.py [--seed 42] [--slices 300] [--lesion pdac] [--mg]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgescreen.models.phantom.ct import generate_ct_volume, write_ct_series  # noqa: E402
from edgescreen.models.phantom.mg import write_mg_exam  # noqa: E402


def _timed(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - a tiny timing helper
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--lesion", default="pdac")
    ap.add_argument("--mg", action="store_true", help="also time a four-view mammography exam")
    args = ap.parse_args()
    lesion = None if args.lesion == "none" else args.lesion
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        phantom, r_wall, r_cpu = _timed(generate_ct_volume, args.seed, lesion, slices=args.slices)
        _, w_wall, w_cpu = _timed(write_ct_series, phantom, out / "ct", args.seed)
        raw = out / "raw"
        raw.mkdir()

        def plain() -> None:
            for k in range(phantom.hu.shape[0]):
                (raw / f"{k:04d}.bin").write_bytes(phantom.hu[k].tobytes())

        _, b_wall, _ = _timed(plain)
        total = r_wall + w_wall
        nz, ny, nx = phantom.hu.shape
        print(f"CT phantom seed {args.seed} lesion {args.lesion}: {nz} slices of {ny}x{nx}")
        print(f"  render        {r_wall:6.2f} s wall  {r_cpu:6.2f} s cpu")
        print(f"  write DICOM   {w_wall:6.2f} s wall  {w_cpu:6.2f} s cpu")
        print(f"  total         {total:6.2f} s wall  (budget 10 s)")
        print(f"  baseline: plain write of the same bytes {b_wall:.2f} s; DICOM write / plain = {w_wall / max(b_wall, 1e-6):.1f}x")
        if args.mg:
            _, m_wall, m_cpu = _timed(write_mg_exam, out / "mg", args.seed, "malignant")
            print(f"MG exam (4 views 2048x1664): {m_wall:.2f} s wall  {m_cpu:.2f} s cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

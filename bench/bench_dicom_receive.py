"""Receive throughput of `edgescreen dicom` against dcmtk's storescp, same disk, same run.

    .venv/bin/python bench/bench_dicom_receive.py [--rounds 3] [--slices 300] [--fsync-dir auto|always]

A 300-slice 512x512 CT series (the phantom generator's, cached in --series-dir) is sent by dcmtk's
storescu to (a) dcmtk storescp writing to a directory and (b) `edgescreen dicom` running as a real
subprocess, both on loopback with TCP_NODELAY=1, both writing under --work-dir. Rounds alternate
storescp and edgescreen so machine noise (other jobs on a shared box) hits both alike; the figure
is the median over rounds of (storescp seconds / edgescreen seconds). Note what is compared:
storescp does not fsync; edgescreen fsyncs every instance before its success response.

It also measures the SQLite cost of indexing one instance (the three-row transaction of
store_instance) with synchronous=FULL and with synchronous=NORMAL in WAL mode. Writes the
`dicom_receive` section of bench/results.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import stop_process, truncate  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
STORESCU, STORESCP, ECHOSCU = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_series(directory: Path, slices: int) -> list[Path]:
    files = sorted(directory.glob("CT*.dcm"))
    if len(files) == slices:
        return files
    shutil.rmtree(directory, ignore_errors=True)
    print(f"writing a {slices}-slice phantom CT series to {directory} (once; reused later)", flush=True)
    from edgescreen.models.phantom.ct import write_ct_study

    write_ct_study(directory, seed=7, slices=slices)
    return sorted(directory.glob("CT*.dcm"))


def wait_echo(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        if subprocess.run([ECHOSCU, "-aec", "EDGE", "127.0.0.1", str(port)], env=DCMTK_ENV,
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("receiver did not answer C-ECHO")


def send(series_dir: Path, port: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([STORESCU, "-aec", "EDGE", "127.0.0.1", str(port), str(series_dir), "+sd", "+sp", "*.dcm"],
                   env=DCMTK_ENV, check=True, capture_output=True)
    return time.perf_counter() - t0


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None



def run_storescp(series_dir: Path, out: Path) -> tuple[float, float | None]:
    out.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen([STORESCP, "-aet", "EDGE", "-od", str(out), str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_echo(port, proc)
        seconds = send(series_dir, port)
        return seconds, peak_rss_mb(proc.pid)
    finally:
        stop_process(proc)


def run_edgescreen(series_dir: Path, data: Path, fsync_dir: str) -> tuple[float, float | None]:
    port = free_port()
    config = data.parent / f"{data.name}.toml"
    config.write_text(f'[dicom]\nfsync_dir = "{fsync_dir}"\n')
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "edgescreen"), "--config", str(config), "--data-dir",
                             str(data), "--log-level", "warning", "dicom", "--port", str(port), "--ae-title", "EDGE",
                             "--allow-any-ae", "--min-free-mb", "0", "--stable-after", "3600"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_echo(port, proc)
        seconds = send(series_dir, port)
        return seconds, peak_rss_mb(proc.pid)
    finally:
        stop_process(proc)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.returncode != 0:
            print(err[-2000:], file=sys.stderr)


def sqlite_cost(work: Path, n: int = 300) -> dict[str, float]:
    from edgescreen.appliance.store import Store
    from edgescreen.appliance.store.instances import IncomingInstance, _index

    out = {}
    for mode in ("FULL", "NORMAL"):
        d = work / f"sqlite-{mode}"
        store = Store(d)
        conn = store.connect()
        conn.execute(f"PRAGMA synchronous={mode}")
        t0 = time.perf_counter()
        for i in range(n):
            inst = IncomingInstance(f"1.2.3.{mode == 'FULL'}.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.4",
                                    instance_number=i, study={"patient_id": "P"}, series={"modality": "CT"})
            with store.transaction() as c:
                _index(c, inst, Path(f"files/x/{i}.dcm"), 524288, time.time())
        out[mode] = (time.perf_counter() - t0) / n * 1000
        store.close()
    return out


def fsync_floor(work: Path, size: int, n: int = 50) -> float:
    """ms to create, write and fsync one instance-sized file here: the disk's floor per durable instance."""
    d = work / "fsync-floor"
    d.mkdir()
    data = os.urandom(size)
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(d / f"{i}.tmp", os.O_WRONLY | os.O_CREAT, 0o640)
        os.write(fd, data)
        os.rename(d / f"{i}.tmp", d / f"{i}.dcm")
        os.fsync(fd)
        os.close(fd)
    return (time.perf_counter() - t0) / n * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--series-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgescreen-bench-ct")
    ap.add_argument("--work-dir", type=Path, default=None, help="where both receivers write (default: a temp dir)")
    ap.add_argument("--fsync-dir", choices=["auto", "always"], default="auto")
    args = ap.parse_args()
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not Path(tool).exists():
            print(f"{tool} missing: apt install dcmtk", file=sys.stderr)
            return 2
    from bench.results_io import machine, write_section

    info = machine()
    series = make_series(args.series_dir / f"s{args.slices}", args.slices)
    mb = sum(p.stat().st_size for p in series) / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench-dicom-", dir=args.work_dir))
    print(f"series: {len(series)} files, {mb:.1f} MB; writing under {work}; fsync_dir={args.fsync_dir}")
    ratios, ours, theirs, rss = [], [], [], []
    try:
        for r in range(args.rounds):
            if r % 2 == 0:  # alternate who goes first, so a drifting machine load biases neither
                t_scp, rss_scp = run_storescp(series[0].parent, work / f"storescp-{r}")
                t_edge, rss_edge = run_edgescreen(series[0].parent, work / f"edge-{r}", args.fsync_dir)
            else:
                t_edge, rss_edge = run_edgescreen(series[0].parent, work / f"edge-{r}", args.fsync_dir)
                t_scp, rss_scp = run_storescp(series[0].parent, work / f"storescp-{r}")
            ratios.append(t_scp / t_edge)
            theirs.append(t_scp)
            ours.append(t_edge)
            rss.append((rss_scp, rss_edge))
            print(f"round {r + 1}: storescp {t_scp:.2f} s ({mb / t_scp:.0f} MB/s)  edgescreen {t_edge:.2f} s "
                  f"({mb / t_edge:.0f} MB/s, {t_edge / len(series) * 1000:.1f} ms/instance)  ratio {t_scp / t_edge:.2f}",
                  flush=True)
            shutil.rmtree(work / f"storescp-{r}", ignore_errors=True)
            shutil.rmtree(work / f"edge-{r}", ignore_errors=True)
        cost = sqlite_cost(work)
        floor = fsync_floor(work, int(mb * 1e6 / len(series)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedian: storescp {statistics.median(theirs):.2f} s, edgescreen {statistics.median(ours):.2f} s, "
          f"throughput ratio edgescreen/storescp = {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 0.25)")
    print(f"peak RSS: storescp {rss[-1][0] or 0:.0f} MB, edgescreen dicom {rss[-1][1] or 0:.0f} MB")
    print(f"SQLite index transaction per instance (WAL): synchronous=FULL {cost['FULL']:.2f} ms, "
          f"NORMAL {cost['NORMAL']:.3f} ms (the receive path uses NORMAL: the fsynced file is the record)")
    print(f"disk floor: create + write + fsync of one {mb / len(series) * 1000:.0f} kB file takes {floor:.1f} ms here "
          f"(edgescreen: {statistics.median(ours) / len(series) * 1000:.1f} ms per instance in all)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    ratio = statistics.median(ratios)
    write_section("dicom_receive", {
        "series": f"{len(series)} files, {mb:.1f} MB (512x512 CT phantom), dcmtk storescu with TCP_NODELAY=1",
        "baseline": "dcmtk storescp (no fsync) on the same disk", "rounds": args.rounds,
        "baseline_s": truncate(statistics.median(theirs)), "edgescreen_s": truncate(statistics.median(ours)),
        "ratio": truncate(ratio), "ratio_range": [truncate(min(ratios)), truncate(max(ratios))], "aim_ratio": 0.25,
        "aim_met": ratio >= 0.25, "ms_per_instance": truncate(statistics.median(ours) / len(series) * 1000, 2),
        "fsync_floor_ms_per_file": truncate(floor, 2), "peak_rss_mb": truncate(rss[-1][1] or 0, 1),
        "baseline_peak_rss_mb": truncate(rss[-1][0] or 0, 1),
        "sqlite_index_ms": {"FULL": truncate(cost["FULL"], 3), "NORMAL": truncate(cost["NORMAL"], 3)},
        "rounds_detail": [{"storescp_s": truncate(t), "edgescreen_s": truncate(e), "ratio": truncate(t / e)}
                          for t, e in zip(theirs, ours, strict=True)],
    }, machine_info=info, command=f".venv/bin/python bench/bench_dicom_receive.py --rounds {args.rounds} "
       f"--slices {args.slices} --fsync-dir {args.fsync_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

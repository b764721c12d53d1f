"""pip-audit over the locked dependencies (constraints.txt), tolerant of a box that cannot reach its database.

    .venv/bin/python .ci/audit_deps.py          (run by `make test`, so by CI)

A known vulnerability in a pinned version fails the build with its ID and the fixed versions, unless the
ID is listed with a reason in .ci/audit-ignore.txt. A dependency pip-audit could not look up (offline,
a private mirror without the vulnerability API) is reported, with the count, and does not fail the build:
the audit then says plainly that it did not run rather than pretending to have passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ignored() -> dict[str, str]:
    path = ROOT / ".ci" / "audit-ignore.txt"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                vid, _, why = line.partition(" ")
                out[vid] = why.strip()
    return out


def main() -> int:
    cmd = [sys.executable, "-m", "pip_audit", "-r", str(ROOT / "constraints.txt"), "--no-deps", "--disable-pip",
           "--progress-spinner", "off", "--format", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"pip-audit: not run ({exc}); dependencies NOT audited")
        return 0
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"pip-audit: could not audit ({reason}); dependencies NOT audited")
        return 0
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if d.get("skip_reason")]
    skip_ids = ignored()
    found = [(d["name"], d["version"], v) for d in deps for v in d.get("vulns", []) if v["id"] not in skip_ids]
    audited = len(deps) - len(skipped)
    print(f"pip-audit: {audited} of {len(deps)} pinned dependencies audited, {len(found)} known vulnerabilities")
    if skipped:
        print(f"pip-audit: {len(skipped)} not audited, e.g. {skipped[0]['name']}: {skipped[0]['skip_reason']} "
              "(the vulnerability database is unreachable from here; CI with its network audits them)")
    for name, version, v in found:
        print(f"  {name} {version}: {v['id']} fixed in {', '.join(v.get('fix_versions') or ['(no fix yet)'])}: "
              f"{(v.get('description') or '')[:160]}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""The gate's running verdict: which checks ran, what they measured, every reason a study is out of domain."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DomainReport:
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)

    @property
    def in_domain(self) -> bool:
        return not self.reasons

    def flag(self, check: str, reason: str) -> None:
        self.checks[check] = "flagged"
        if reason not in self.reasons:
            self.reasons.append(reason)

    def passed(self, check: str) -> None:
        self.checks.setdefault(check, "passed")

    def skipped(self, check: str, why: str) -> None:
        self.checks.setdefault(check, f"not checked: {why}")

    def measure(self, name: str, value: float) -> None:
        if math.isfinite(float(value)):  # a statistic that could not be measured is left out (JSON has no NaN)
            self.measured[name] = round(float(value), 4)

    def to_json(self) -> dict[str, Any]:
        return {"in_domain": self.in_domain, "reasons": list(self.reasons), "checks": dict(self.checks),
                "measured": dict(self.measured)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DomainReport:
        return cls(list(raw.get("reasons", [])), dict(raw.get("checks", {})), dict(raw.get("measured", {})))

"""Which threshold a study is triaged at: a card's calibrated operating point chosen by name, or a hand-set one.

Precedence: a threshold set for this analysis (`edgescreen analyze --threshold`, research use) beats an
operating point named for this analysis (`--operating-point`), which beats the site's choice
(`[triage] pancreas_operating_point` / `mammo_operating_point`), which beats the card's default. The
result says which, so the findings, the SR and the PDF can state the operating point in force.
"""

from __future__ import annotations

from typing import Any

from edgescreen.appliance.modelcard import ModelCard


class OperatingPointError(ValueError):
    """An operating point name the card does not have, or a card with no threshold at all."""


def resolve(card: ModelCard, *, name: str | None = None, name_source: str = "site",
            threshold: float | None = None) -> dict[str, Any]:
    """The operating point in force, as the findings document records it (see findings.OperatingPointInForce)."""
    if threshold is not None:
        return {"name": "custom", "target": None, "target_value": None, "threshold": float(threshold),
                "calibration_set": None, "source": "override"}
    source = name_source
    if name is None:
        name, source = card.default_operating_point, "card"
    if name is not None:
        try:
            op = card.operating_point(name)
        except KeyError:
            names = [o.name for o in card.operating_points] or ["(none)"]
            raise OperatingPointError(
                f"operating point {name!r} is not in the {card.role} card ({card.name} {card.version}); it has "
                f"{', '.join(names)}: fix [triage] in the site config or the --operating-point option") from None
        return {"name": op.name, "target": op.target, "target_value": op.target_value, "threshold": op.threshold,
                "calibration_set": op.calibration_set, "source": source}
    if card.decision is None:
        raise OperatingPointError(f"the {card.role} card has no decision threshold and no operating points; "
                                  "pass --threshold")
    return {"name": "card_decision", "target": None, "target_value": None, "threshold": card.decision.threshold,
            "calibration_set": card.decision.meaning, "source": "card"}

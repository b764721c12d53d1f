"""The gate for each pipeline: every card's stated domain against one study, all checks in one verdict.

CT (pancreas): the attributes and body statistics against every stage card that states them, stage 1's
organs against its anatomy rules, each stage's pooled features against its OOD statistics. Mammography:
each image's attributes and breast statistics, and each image's features. A main card (stage 1, mammo)
without a domain makes the study out of domain: nothing validated, nothing cleared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgescreen.appliance.modelcard import ModelCard
from edgescreen.appliance.pipeline.domain import anatomy, attributes, intensity, ood
from edgescreen.appliance.pipeline.domain.verdict import DomainReport

if TYPE_CHECKING:
    from edgescreen.appliance.pipeline.pancreas import CanonicalCt, Stage1Result, Stage2Result


def _no_domain(card: ModelCard) -> str:
    return (f"the {card.role} model card ({card.name} {card.version}) states no validated domain, so no study "
            "can be cleared with it")


def _ood(report: DomainReport, card: ModelCard, features: dict[str, np.ndarray] | None, what: str) -> None:
    if card.domain is None or card.domain.ood is None:
        report.skipped(f"ood:{card.role}", "the card has no OOD statistics (no features output calibrated)")
        return
    vector = (features or {}).get(card.domain.ood.output)
    if vector is None:
        report.skipped(f"ood:{card.role}", f"{what} produced no {card.domain.ood.output!r} output")
        return
    ood.check(card.domain.ood, vector, report, card.role)


def assess_ct(cards: dict[str, ModelCard], ct: CanonicalCt, stage1: Stage1Result, stage2: Stage2Result | None) -> DomainReport:
    """The pancreas cascade's verdict on one loaded series and its stage results."""
    report = DomainReport()
    main = cards["pancreas.stage1"]
    if main.domain is None:
        report.flag("card", _no_domain(main))
    header = ct.volume.datasets[0]
    stats: dict[str, float] | None = None
    for role, card in cards.items():
        domain = card.domain
        if domain is None:
            continue
        attributes.check_ct(domain, header, ct.volume.spacing_mm, report)
        if domain.intensity is not None:
            if domain.intensity.region != "body":
                report.skipped("intensity", f"{role} states {domain.intensity.region} statistics, not body")
            else:
                stats = stats or intensity.ct_statistics(ct.hu, ct.grid.spacing)
                intensity.check(domain.intensity, stats, report)
    rules = main.domain.anatomy if main.domain is not None else None
    if rules is not None:
        hu, grid = ct.hu, ct.grid

        def hu_at(lps: np.ndarray) -> np.ndarray:
            idx = np.rint(grid.to_index(lps)).astype(np.int64)
            idx = np.clip(idx, 0, np.asarray(hu.shape) - 1)
            return hu[tuple(idx.T)]

        anatomy.check(rules, stage1.labels, stage1.classes, stage1.grid, report, hu_at)
    else:
        report.skipped("anatomy", "the stage 1 card states no anatomy rules")
    _ood(report, main, stage1.features, "stage 1")
    if "pancreas.stage2" in cards:
        if stage2 is not None and stage2.grid is not None:
            _ood(report, cards["pancreas.stage2"], stage2.features, "stage 2")
        else:
            report.skipped("ood:pancreas.stage2", "stage 2 did not run (no pancreas)")
    return report


def assess_mg(card: ModelCard, images: Sequence[tuple[Any, np.ndarray, np.ndarray, dict[str, np.ndarray] | None]]
              ) -> DomainReport:
    """The mammography verdict: per image (header or None, raw pixels, percentile-scaled pixels, features)."""
    report = DomainReport()
    domain = card.domain
    if domain is None:
        report.flag("card", _no_domain(card))
        return report
    for header, raw, scaled, features in images:
        if header is not None:
            attributes.check_mg(domain, header, report)
        elif domain.pixel_spacing_mm or domain.detector_type or domain.bits_stored:
            report.flag("dicom", "a plain image file states no pixel spacing, detector or bit depth: the validated "
                                 "domain cannot be confirmed (send the DICOM image)")
        if domain.intensity is not None:
            intensity.check(domain.intensity, intensity.mg_statistics(raw, scaled), report)
        _ood(report, card, features, "the mammography model")
    return report

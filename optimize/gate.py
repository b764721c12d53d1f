"""The accuracy gate: a candidate is usable only if it agrees with FP32 and with the truth on held-out cases.

What is measured, per output kind the model card declares:

* segmentation: Dice of the candidate's masks against the FP32 masks (>= 0.98), and the change of Dice
  against ground truth (FP32's minus the candidate's, <= 0.01). Dice is *pooled* over the held-out cases
  per class (sum of overlaps over sum of sizes: a 3-voxel miss in a tiny case does not count as a
  failed case) and then averaged over the foreground classes, so a small organ such as the pancreas
  weighs as much as the liver; the worst class is reported beside it.
* classification: AUC against truth (one-vs-rest, averaged over the classes that have both positive
  and negative held-out cases) may drop by at most 0.005, and the decisions (argmax for softmax, the
  card's threshold or 0.5 for sigmoid) must agree with FP32 on >= 99 % of cases. Note the AUC's
  granularity: with 8 normal and 16 lesion cases one swapped pair moves it by 1/128 = 0.0078, so the
  0.005 bound asks for the FP32 ranking exactly; the mean absolute probability change (``prob_mae``)
  is reported beside it to show how close a failing candidate came.
* heatmap: not in the issue's gate, but a heatmap is drawn on the clinic's screen, so a candidate
  whose heatmap does not correlate with FP32's (Pearson r < 0.95) is refused too.
* features (the pooled encoder features the validated-domain gate reads): never gated on their own
  values, since quantisation moves them and only their effect counts; their drift against FP32 is
  reported (mean relative L2 error, worst cosine). Their effect is gated where the card has an
  ``domain.ood`` statistic on that output: the share of held-out in-domain cases whose features lie
  beyond the card's threshold (the in-domain flag rate) must stay at or under the card's target (1 %),
  unless FP32 itself flags more of these cases, in which case the candidate must not flag more than
  FP32 does. A quantiser that pushes in-domain studies out of the domain would make the appliance
  answer `indeterminate` to studies it can read. A sliding-window model's per-case features come from
  one tile, not from the study-wide mean the appliance scores, so its flag rate is measured on whole
  volumes instead (optimize.window) and only the drift is reported here.

Several outputs of one kind (rare) are gated on their worst figure. The thresholds are a dataclass so a
site with a stricter policy can pass its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgescreen.appliance.modelcard import ModelCard, OutputSpec
from edgescreen.appliance.pipeline import activations, metrics
from edgescreen.optimize.calibration import Case


@dataclass(frozen=True)
class Thresholds:
    dice_vs_fp32_min: float = 0.98
    dice_vs_truth_drop_max: float = 0.01
    auc_drop_max: float = 0.005
    decision_agreement_min: float = 0.99
    heatmap_corr_min: float = 0.95


@dataclass
class GateResult:
    """The figures of one candidate; ``passed`` is False with a reason per failed figure."""

    passed: bool
    dice_vs_fp32: float | None = None
    dice_vs_fp32_worst_class: str | None = None
    dice_vs_truth_fp32: float | None = None
    dice_vs_truth: float | None = None
    dice_vs_truth_drop: float | None = None
    auc_fp32: float | None = None
    auc: float | None = None
    auc_drop: float | None = None
    decision_agreement: float | None = None
    prob_mae: float | None = None
    heatmap_corr: float | None = None
    features_rel_error: float | None = None
    features_cosine_min: float | None = None
    ood_flag_rate: float | None = None
    ood_flag_rate_fp32: float | None = None
    ood_target_flag_rate: float | None = None
    heldout_cases: int = 0
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------------------- primitives


def activate(logits: np.ndarray, activation: str, axis: int = 1) -> np.ndarray:
    """Probabilities from raw outputs, as the card says (outputs are stored pre-activation): the appliance's
    own activation (appliance.pipeline.activations), in float64 for the gate's statistics."""
    return np.asarray(activations.activate(logits, activation, axis=axis), dtype=np.float64)


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC (appliance.pipeline.metrics.auc: one copy of the rule); None without both classes."""
    labels = np.asarray(labels).astype(int)
    if labels.min(initial=1) == labels.max(initial=0) or not labels.size:
        return None
    return metrics.auc(labels, np.asarray(scores, dtype=np.float64))


def macro_auc(probs: np.ndarray, truth: np.ndarray) -> float | None:
    """One-vs-rest AUC averaged over the classes that have positives and negatives (cases x classes)."""
    values = [binary_auc(probs[:, c], truth[:, c]) for c in range(probs.shape[1])]
    usable = [v for v in values if v is not None]
    return float(np.mean(usable)) if usable else None


class PooledDice:
    """Per-class Dice pooled over cases: sum 2|A and B| / sum (|A| + |B|)."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.inter = np.zeros(len(classes))
        self.total = np.zeros(len(classes))

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """a, b: boolean masks (classes, *spatial)."""
        axes = tuple(range(1, a.ndim))
        self.inter += np.logical_and(a, b).sum(axis=axes)
        self.total += a.sum(axis=axes) + b.sum(axis=axes)

    def per_class(self) -> dict[str, float]:
        """Dice per class; 1.0 where both sides are empty on every case (nothing to find, nothing found),
        as the models' own evaluation counts it (models/train/ct_common.dice)."""
        return {c: float(2 * i / t) if t > 0 else 1.0
                for c, i, t in zip(self.classes, self.inter, self.total, strict=True)}

    def mean(self) -> tuple[float | None, str | None]:
        per = self.per_class()
        if not per:
            return None, None
        worst = min(per, key=per.__getitem__)
        return float(np.mean(list(per.values()))), worst


def seg_masks(raw: np.ndarray, spec: OutputSpec) -> tuple[np.ndarray, list[str]]:
    """Foreground masks (classes, *spatial) of one case's output (1, C, *spatial), and their names.

    Softmax: the argmax label map, one mask per class but the first (background). Sigmoid: each
    channel above 0.5.
    """
    x = np.asarray(raw)[0]
    if spec.activation == "softmax":
        labels = x.argmax(axis=0)
        return np.stack([labels == c for c in range(1, x.shape[0])]), spec.classes[1:]
    return activate(x, spec.activation, axis=0) > 0.5, spec.classes


def truth_masks(truth: np.ndarray, spec: OutputSpec, like: np.ndarray) -> np.ndarray:
    """Truth as masks shaped like the `seg_masks` result ``like`` (classes, *spatial).

    Softmax outputs take a label map (spatial, values = class index); sigmoid outputs take one binary
    map per class, or a single spatial map when the output has one class (a lesion mask).
    """
    t = np.asarray(truth)
    if spec.activation == "softmax":
        return np.stack([t == c for c in range(1, len(spec.classes))])
    return (t[None] if t.shape == like.shape[1:] else t.reshape(like.shape)) > 0


def _decision_thresholds(card: ModelCard, spec: OutputSpec) -> np.ndarray:
    thr = np.full(len(spec.classes), 0.5)
    if card.decision is not None and card.decision.output == spec.name:
        thr[spec.classes.index(card.decision.class_name)] = card.decision.threshold
    return thr


def _decisions(probs: np.ndarray, card: ModelCard, spec: OutputSpec) -> np.ndarray:
    """Per case a decision vector: the argmax for softmax, thresholded probabilities for sigmoid."""
    if spec.activation == "softmax":
        return probs.argmax(axis=1)[:, None]
    return probs >= _decision_thresholds(card, spec)[None, :]


def features_drift(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> tuple[float, float]:
    """(mean relative L2 error, worst cosine similarity) of per-case feature vectors against FP32's."""
    rel, cos = [], []
    for r, c in zip(reference, candidate, strict=True):
        a = np.asarray(r, dtype=np.float64).reshape(-1)
        b = np.asarray(c, dtype=np.float64).reshape(-1)
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        rel.append(float(np.linalg.norm(b - a)) / max(na, 1e-12))
        cos.append(1.0 if na < 1e-12 and nb < 1e-12 else float(a @ b) / max(na * nb, 1e-12))
    return float(np.mean(rel)) if rel else 0.0, float(np.min(cos)) if cos else 1.0


def ood_flag_rates(card: ModelCard, output: str, reference: Sequence[np.ndarray],
                   candidate: Sequence[np.ndarray]) -> tuple[float, float, float] | None:
    """(candidate's, FP32's, target) in-domain flag rate of the card's OOD statistic on `output`'s
    per-case features, or None when the card has no OOD statistic on that output."""
    ood = card.domain.ood if card.domain is not None else None
    if ood is None or ood.output != output or not len(reference):
        return None
    from edgescreen.appliance.pipeline.domain.ood import (
        distance,  # the appliance's own score: one copy of the rule
    )

    def rate(vectors: Sequence[np.ndarray]) -> float:
        return float(np.mean([distance(np.asarray(v).reshape(-1), ood) > ood.threshold for v in vectors]))

    return rate(candidate), rate(reference), float(ood.target_flag_rate)


def flag_rate_ok(rate: float, fp32_rate: float, target: float) -> bool:
    """At or under the target, or (when FP32 itself flags more of these cases) no more than FP32 flags."""
    return rate <= max(target, fp32_rate) + 1e-12


# ----------------------------------------------------------------------------------------------- gate


def evaluate(card: ModelCard, cases: Sequence[Case], reference: Sequence[dict[str, np.ndarray]],
             candidate: Sequence[dict[str, np.ndarray]], thresholds: Thresholds = Thresholds()) -> GateResult:
    """Gate a candidate's outputs against FP32's (``reference``) and the cases' truth."""
    if not (len(cases) == len(reference) == len(candidate)):
        raise ValueError(f"{len(cases)} cases but {len(reference)} reference and {len(candidate)} candidate outputs")
    result = GateResult(passed=True, heldout_cases=len(cases))
    worst: dict[str, list[float]] = {}

    def keep(name: str, value: float | None) -> None:
        if value is not None:
            worst.setdefault(name, []).append(value)

    for spec in card.outputs:
        if spec.kind == "segmentation":
            names = spec.classes[1:] if spec.activation == "softmax" else spec.classes
            vs_ref, ref_truth, cand_truth = PooledDice(names), PooledDice(names), PooledDice(names)
            has_truth = all(spec.name in c.truth for c in cases)
            for case, ref, cand in zip(cases, reference, candidate, strict=True):
                ref_m, _ = seg_masks(ref[spec.name], spec)
                cand_m, _ = seg_masks(cand[spec.name], spec)
                vs_ref.add(ref_m, cand_m)
                if has_truth:
                    t = truth_masks(case.truth[spec.name], spec, ref_m)
                    ref_truth.add(ref_m, t)
                    cand_truth.add(cand_m, t)
            dice, worst_class = vs_ref.mean()
            if dice is not None and dice <= min(worst.get("dice_vs_fp32", [dice])):
                per = vs_ref.per_class()
                result.dice_vs_fp32_worst_class = f"{spec.name}:{worst_class}={per[worst_class]:.4f}"
            keep("dice_vs_fp32", dice)
            if has_truth:
                d_ref, d_cand = ref_truth.mean()[0], cand_truth.mean()[0]
                keep("dice_vs_truth_fp32", d_ref)
                keep("dice_vs_truth", d_cand)
                if d_ref is not None and d_cand is not None:
                    keep("dice_vs_truth_drop", d_ref - d_cand)
        elif spec.kind == "classification":
            ref_p = np.concatenate([activate(np.asarray(r[spec.name]).reshape(1, -1), spec.activation) for r in reference])
            cand_p = np.concatenate([activate(np.asarray(c[spec.name]).reshape(1, -1), spec.activation) for c in candidate])
            agree = np.all(_decisions(ref_p, card, spec) == _decisions(cand_p, card, spec), axis=1)
            keep("decision_agreement", float(agree.mean()))
            keep("prob_mae", float(np.abs(ref_p - cand_p).mean()))
            if all(spec.name in c.truth for c in cases):
                truth = np.stack([np.asarray(c.truth[spec.name]).reshape(-1) for c in cases])
                a_ref, a_cand = macro_auc(ref_p, truth), macro_auc(cand_p, truth)
                keep("auc_fp32", a_ref)
                keep("auc", a_cand)
                if a_ref is not None and a_cand is not None:
                    keep("auc_drop", a_ref - a_cand)
        elif spec.kind == "heatmap":
            corrs = []
            for ref, cand in zip(reference, candidate, strict=True):
                a = activate(np.asarray(ref[spec.name]), spec.activation).ravel()
                b = activate(np.asarray(cand[spec.name]), spec.activation).ravel()
                corrs.append(1.0 if a.std() < 1e-9 and b.std() < 1e-9 else float(np.corrcoef(a, b)[0, 1]))
            keep("heatmap_corr", float(np.nanmean(corrs)) if not np.all(np.isnan(corrs)) else 0.0)
        elif spec.kind == "features":
            ref_f = [np.asarray(r[spec.name]) for r in reference]
            cand_f = [np.asarray(c[spec.name]) for c in candidate]
            rel, cos = features_drift(ref_f, cand_f)
            keep("features_rel_error", rel)
            keep("features_cosine_min", cos)
            if card.preprocessing.patch_size is None:  # a sliding-window model is flag-checked per volume
                rates = ood_flag_rates(card, spec.name, ref_f, cand_f)
                if rates is not None:
                    keep("ood_flag_rate", rates[0])
                    keep("ood_flag_rate_fp32", rates[1])
                    keep("ood_target_flag_rate", rates[2])

    lower_is_worse = {"dice_vs_fp32", "dice_vs_truth", "dice_vs_truth_fp32", "auc", "auc_fp32", "decision_agreement",
                      "heatmap_corr", "features_cosine_min", "ood_target_flag_rate"}
    for name, values in worst.items():
        setattr(result, name, min(values) if name in lower_is_worse else max(values))
    t = thresholds
    checks = [
        ("dice_vs_fp32", result.dice_vs_fp32, lambda v: v >= t.dice_vs_fp32_min, f">= {t.dice_vs_fp32_min}"),
        ("dice_vs_truth_drop", result.dice_vs_truth_drop, lambda v: v <= t.dice_vs_truth_drop_max,
         f"<= {t.dice_vs_truth_drop_max}"),
        ("auc_drop", result.auc_drop, lambda v: v <= t.auc_drop_max, f"<= {t.auc_drop_max}"),
        ("decision_agreement", result.decision_agreement, lambda v: v >= t.decision_agreement_min,
         f">= {t.decision_agreement_min}"),
        ("heatmap_corr", result.heatmap_corr, lambda v: v >= t.heatmap_corr_min, f">= {t.heatmap_corr_min}"),
    ]
    for name, value, ok, wanted in checks:
        if value is not None and not (np.isfinite(value) and ok(value)):
            result.passed = False
            worst = f"; worst {result.dice_vs_fp32_worst_class}" if name == "dice_vs_fp32" else ""
            result.reasons.append(f"{name} {value:.4f} (needs {wanted}{worst})")
    if result.ood_flag_rate is not None and not flag_rate_ok(result.ood_flag_rate, result.ood_flag_rate_fp32 or 0.0,
                                                             result.ood_target_flag_rate or 0.0):
        result.passed = False
        result.reasons.append(f"ood_flag_rate {result.ood_flag_rate:.4f} of in-domain held-out cases flagged out of "
                              f"domain (needs <= {result.ood_target_flag_rate:.4f}, FP32 flags "
                              f"{result.ood_flag_rate_fp32:.4f})")
    if not len(cases):
        result.passed = False
        result.reasons.append("no held-out cases")
    return result

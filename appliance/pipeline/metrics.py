"""The one copy of every figure the project reports: AUC, bootstrap CIs, sensitivity at a specificity,
operating-point thresholds, balanced accuracy, Dice.

numpy only, so the appliance (calibration, evaluation), models/evaluate.py and the trainers all import
it from here; the appliance never imports models.train. Argument order is always (labels, scores).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

N_BOOT = 1000


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half); ValueError when a class is missing."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both classes")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def bootstrap_ci(values: np.ndarray, stat: Callable[[np.ndarray], float], n_boot: int = N_BOOT, seed: int = 0) -> list[float]:
    """95% percentile bootstrap CI of ``stat`` over resampled rows (resamples where stat fails are skipped)."""
    values = np.asarray(values)
    rng = np.random.default_rng(seed)
    n = len(values)
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            v = stat(values[idx])
        except ValueError:
            continue
        if np.isfinite(v):
            out.append(v)
    if not out:
        raise ValueError("no bootstrap resample gave a finite value")
    return [float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))]


def threshold_for_specificity(normal_scores: np.ndarray, specificity: float) -> float:
    """The lowest threshold (score >= threshold is positive) whose specificity on these normals is >= target."""
    neg = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if len(neg) == 0:
        raise ValueError("needs normal scores")
    k = int(np.ceil(specificity * len(neg)))
    return float(np.nextafter(neg[k - 1], np.inf))


def threshold_for_sensitivity(lesion_scores: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity on these positives is >= target."""
    pos = np.sort(np.asarray(lesion_scores, dtype=np.float64))[::-1]
    if len(pos) == 0:
        raise ValueError("needs positive scores")
    k = int(np.ceil(sensitivity * len(pos)))
    return float(pos[k - 1])


def sens_at_spec(labels: np.ndarray, scores: np.ndarray, spec: float = 0.99) -> float:
    """Sensitivity at the lowest threshold whose specificity on these normals is >= ``spec``."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    neg, pos = scores[labels == 0], scores[labels == 1]
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("needs both classes")
    return float(np.mean(pos >= threshold_for_specificity(neg, spec)))


def balanced_accuracy(pairs: np.ndarray) -> float:
    """Mean per-class recall over the classes present; ``pairs`` rows are (truth, prediction)."""
    pairs = np.asarray(pairs)
    recalls = [np.mean(pairs[pairs[:, 0] == c, 1] == c) for c in np.unique(pairs[:, 0])]
    return float(np.mean(recalls))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (nothing to find, nothing found)."""
    p, t = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def flag_rate(flags: list[bool] | np.ndarray) -> float:
    arr = np.asarray(flags, dtype=bool)
    return float(arr.mean()) if arr.size else float("nan")


def truncated(value: float, digits: int = 3) -> str:
    """A figure as the project reports it: truncated, never rounded up, so it never looks better than
    measured (0.9999 -> "0.999"); "n/a" for a missing or undefined one."""
    if value is None or not np.isfinite(value):
        return "n/a"
    q = 10 ** digits
    return f"{np.floor(float(value) * q) / q:.{digits}f}"


def figure(value: float, ci: list[float] | None = None, digits: int = 3) -> str:
    """`truncated` with its 95% interval: "0.912 (95% CI 0.850-0.951)"."""
    return truncated(value, digits) + (f" (95% CI {truncated(ci[0], digits)}-{truncated(ci[1], digits)})" if ci else "")

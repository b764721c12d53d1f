"""(d) How far the model's own pooled features lie from its training distribution (Mahalanobis).

The card holds the training features' mean and principal subspace; the distance is the Mahalanobis
distance in that subspace plus the residual outside it (probabilistic PCA), and the threshold was set
on held-out in-domain studies so that at most `target_flag_rate` of them are flagged.
"""

from __future__ import annotations

import numpy as np

from edgescreen.appliance.modelcard import OodDomain
from edgescreen.appliance.pipeline.domain.verdict import DomainReport


def distance(features: np.ndarray, ood: OodDomain) -> float:
    """sqrt(d2) of one feature vector (F,) against the card's statistics."""
    f = np.asarray(features, dtype=np.float64).reshape(-1)
    mean = np.asarray(ood.mean, dtype=np.float64)
    if f.shape != mean.shape:
        raise ValueError(f"features have {f.size} values; the card's ood statistics have {mean.size}")
    comps = np.asarray(ood.components, dtype=np.float64)
    centred = f - mean
    proj = comps @ centred
    d2 = float(np.sum(proj**2 / np.asarray(ood.variances, dtype=np.float64)))
    if ood.residual_variance is not None and comps.shape[0] < mean.size:
        residual = centred - comps.T @ proj
        d2 += float(residual @ residual) / ood.residual_variance
    return float(np.sqrt(d2))


def fit(features: np.ndarray, k: int | None = None) -> dict:
    """Mean, principal components, variances and residual variance of training features (n, F)."""
    x = np.asarray(features, dtype=np.float64)
    n, f = x.shape
    k = min(k or f, f, max(n - 1, 1))
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s**2 / max(n - 1, 1)
    floor = max(float(var.max()) * 1e-6, 1e-12)
    var = np.maximum(var, floor)
    residual = float(var[k:].mean()) if k < len(var) else None
    if k < f and residual is None:
        residual = floor
    return {"mean": mean.tolist(), "components": vt[:k].tolist(), "variances": var[:k].tolist(),
            "residual_variance": residual}


def check(ood: OodDomain, features: np.ndarray, report: DomainReport, role: str) -> None:
    name = f"ood:{role}"
    d = distance(features, ood)
    report.measure(f"ood_distance_{role}", d)
    if d > ood.threshold:
        report.flag(name, f"{role}: image features lie {d:.1f} from the training distribution (Mahalanobis; in-domain "
                          f"studies stay below {ood.threshold:.1f}): the images do not look like what the model learned from")
    report.passed(name)

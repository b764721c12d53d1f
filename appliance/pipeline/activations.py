"""The one copy of the activations a card names ("softmax", "sigmoid", "none"), as training computes them.

Every consumer (the pancreas cascade, the mammography model, the evaluation, the trainers' exports)
turns raw outputs into probabilities here, so a model reads the same everywhere.
"""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, dtype=np.float32), -60, 60)))).astype(np.float32)


def activate(values: np.ndarray, activation: str, axis: int = 1) -> np.ndarray:
    """The card's activation over the class axis (1 for (N, C, ...) outputs)."""
    if activation == "softmax":
        return softmax(values, axis=axis)
    if activation == "sigmoid":
        return sigmoid(values)
    return np.asarray(values, dtype=np.float32)

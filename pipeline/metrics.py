"""Ranking metrics for fraud scores."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC ROC; NaN when only one class is present (undefined, not 0.5)."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.sum() == 0:
        return float("nan")
    return float(average_precision_score(labels, scores))

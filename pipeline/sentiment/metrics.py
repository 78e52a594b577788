"""Classification metrics for the evaluate command and the model card."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.sentiment import LABELS


def classification_report(labels: np.ndarray, predicted: np.ndarray,
                          names: tuple[str, ...] = LABELS) -> dict[str, Any]:
    """Accuracy, macro and weighted F1, per-class precision/recall/F1/support, and the confusion
    matrix (rows: true label, columns: predicted label, both in ``names`` order)."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    k = len(names)
    if labels.shape != predicted.shape:
        raise ValueError(f"{len(labels)} labels but {len(predicted)} predictions")
    for what, values in (("label", labels), ("prediction", predicted)):
        if values.size and (values.min() < 0 or values.max() >= k):
            raise ValueError(f"a {what} index is outside 0..{k - 1} ({', '.join(names)})")
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(axis=1)
    tp = np.diag(confusion).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(confusion.sum(axis=0) > 0, tp / confusion.sum(axis=0), 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    # Macro F1 over the classes in the labels or the predictions (scikit-learn's default): a
    # class the data lacks but the model predicts is counted, with F1 0.
    present = (support > 0) | (confusion.sum(axis=0) > 0)
    n = int(support.sum())
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / n) if n else 0.0,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(names)},
        "confusion_matrix": {"labels": list(names), "rows_true_columns_predicted":
                             confusion.tolist()},
    }

"""Ranking metrics for fraud scores."""

from __future__ import annotations

import numpy as np
import polars as pl
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


def card_precision_at_k(days: np.ndarray, cards: np.ndarray, labels: np.ndarray,
                        scores: np.ndarray, k: int = 100, *, remove_detected: bool = True
                        ) -> tuple[float, list[float]]:
    """The handbook's Card Precision@k (ch. 4.2): per day, each card gets the max score and the
    max label of its transactions that day; the k highest-scored cards are the day's alerts and
    the precision is (compromised cards among them) / k — always over k, even on a day with
    fewer cards. Compromised cards caught in an earlier day's top k are left out of later days
    (``remove_detected``). Returns (mean over days, per-day precisions in day order).

    Ties in score are broken by card id, so the result does not depend on row order."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(scores)
    if not len(days) == len(cards) == len(labels) == n:
        raise ValueError("days, cards, labels and scores must have the same length, got "
                         f"{len(days)}, {len(cards)}, {len(labels)}, {n}")
    if n == 0:
        return float("nan"), []
    per_card = (
        pl.DataFrame({"day": days, "card": cards, "label": np.asarray(labels, dtype=np.int64),
                      "score": np.asarray(scores, dtype=np.float64)})
        .group_by("day", "card").agg(pl.col("score").max(), pl.col("label").max())
        .sort("day", pl.col("score"), "card", descending=[False, True, False])
    )
    detected: set = set()
    per_day: list[float] = []
    for (_,), day in per_card.group_by("day", maintain_order=True):
        if detected:
            day = day.filter(~pl.col("card").is_in(list(detected)))
        top = day.head(k)
        caught = top.filter(pl.col("label") == 1)["card"].to_list()
        per_day.append(len(caught) / k)
        if remove_detected:
            detected.update(caught)
    return float(np.mean(per_day)), per_day

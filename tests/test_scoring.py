"""Scoring math on hand-made neighbours, the label-time rule, and alert thresholds."""

from datetime import datetime, timedelta

import faiss
import numpy as np
import polars as pl
import pytest

from pipeline import schema
from pipeline.index import FraudIndex, IndexConfig
from pipeline.scoring import ScoringConfig, alert_thresholds, knn_score, similarity


def test_similarity_of_distances():
    sq = np.array([[0.0, 9.0, np.inf]])
    assert similarity(sq).tolist() == [[1.0, 0.25, 0.0]]


def test_knn_score_by_hand():
    sims = np.array([[0.5, 0.25], [1.0, 1.0], [0.0, 0.0]])
    labels = np.array([[1, 0], [1, 1], [1, 1]])
    got = knn_score(sims, labels, prior=0.1, smoothing=1.0)
    # (0.5 + 0.1) / (0.75 + 1); (2 + 0.1) / (2 + 1); no evidence -> the prior
    assert got == pytest.approx([0.6 / 1.75, 2.1 / 3.0, 0.1])


def test_knn_score_weighs_genuine_neighbours_and_stays_in_bounds():
    rng = np.random.default_rng(0)
    sims = rng.uniform(0, 1, size=(500, 10))
    labels = rng.integers(0, 2, size=(500, 10))
    s = knn_score(sims, labels, prior=0.02, smoothing=0.5)
    assert ((s >= 0) & (s <= 1)).all()
    # Turning one genuine neighbour into a fraud never lowers the score.
    flipped = labels.copy()
    flipped[:, 0] = 1
    assert (knn_score(sims, flipped, prior=0.02, smoothing=0.5) >= s - 1e-12).all()
    # A close fraud among many close genuine neighbours scores lower than a lone close fraud.
    crowd = knn_score(np.array([[0.9] * 10]), np.array([[1] + [0] * 9]), prior=0.0, smoothing=1)
    alone = knn_score(np.array([[0.9] + [0.0] * 9]), np.array([[1] + [0] * 9]), prior=0.0,
                      smoothing=1)
    assert crowd[0] == pytest.approx(0.9 / 10.0)
    assert alone[0] == pytest.approx(0.9 / 1.9)


def test_knn_score_rejects_bad_settings():
    with pytest.raises(ValueError, match="prior"):
        knn_score(np.ones((1, 1)), np.ones((1, 1)), prior=1.5, smoothing=1)
    with pytest.raises(ValueError, match="smoothing"):
        knn_score(np.ones((1, 1)), np.ones((1, 1)), prior=0.1, smoothing=-1)


def _tiny_index(times: list[datetime], labels: list[int], points: list[float]) -> FraudIndex:
    vectors = np.array([[p] for p in points], dtype=np.float32)
    index = faiss.IndexFlatL2(1)
    index.add(vectors)
    meta = pl.DataFrame({
        schema.TRANSACTION_ID: [f"h{i}" for i in range(len(points))],
        schema.TX_TIME: times,
        "label_time": [t + timedelta(days=7) for t in times],
        schema.IS_FRAUD: pl.Series(labels, dtype=pl.Int8),
        schema.CUSTOMER_ID: ["c"] * len(points),
        schema.TERMINAL_ID: ["t"] * len(points),
    })
    return FraudIndex(None, index, meta, meta.head(0), {}, IndexConfig(use_gpu=False))


def test_neighbours_only_count_labels_known_before_the_transaction():
    t0 = datetime(2024, 1, 1)
    # h0 is nearest but was labelled only 2 days before the query would see it: excluded.
    idx = _tiny_index([t0 + timedelta(days=5), t0, t0 - timedelta(days=3)], [1, 0, 1],
                      [0.0, 1.0, 2.0])
    query_time = np.array([int((t0 + timedelta(days=10)).timestamp() * 1e6)])
    d, pos = idx.neighbours(np.array([[0.0]], dtype=np.float32), query_time,
                            np.array(["q"], dtype=object), k=2)
    assert pos.tolist() == [[1, 2]]
    assert d.tolist() == [[1.0, 4.0]]
    # Later, h0's label is known and it is the nearest.
    later = np.array([int((t0 + timedelta(days=13)).timestamp() * 1e6)])
    _, pos = idx.neighbours(np.array([[0.0]], dtype=np.float32), later,
                            np.array(["q"], dtype=object), k=2)
    assert pos.tolist() == [[0, 1]]


def test_neighbours_exclude_the_transaction_itself_and_pad_missing():
    t0 = datetime(2024, 1, 1)
    idx = _tiny_index([t0, t0], [1, 0], [0.0, 5.0])
    when = np.array([int((t0 + timedelta(days=30)).timestamp() * 1e6)])
    d, pos = idx.neighbours(np.array([[0.0]], dtype=np.float32), when,
                            np.array(["h0"], dtype=object), k=2)
    assert pos.tolist() == [[1, -1]]
    assert np.isinf(d[0, 1])
    assert idx.labels_at(pos).tolist() == [[0, 0]]


def test_alerts_per_day_threshold_is_the_nth_score_of_each_day():
    frame = pl.DataFrame({
        schema.TX_TIME: [datetime(2024, 1, 1, h) for h in (1, 2, 3)]
        + [datetime(2024, 1, 2, 5)],
        "score": [0.9, 0.5, 0.1, 0.3],
    })
    t = alert_thresholds(frame, ScoringConfig(alerts_per_day=2))
    assert t.tolist() == [0.5, 0.5, 0.5, 0.3]  # day 2 has one row: it is its own top-2
    assert alert_thresholds(frame, ScoringConfig(threshold=0.42)).tolist() == [0.42] * 4
    with pytest.raises(ValueError, match="alerts_per_day"):
        alert_thresholds(frame, ScoringConfig(alerts_per_day=0))

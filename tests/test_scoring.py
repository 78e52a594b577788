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
    # NaN smoothing gave every row the prior, infinite smoothing a NaN score (a "pass").
    for smoothing in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="smoothing"):
            knn_score(np.ones((1, 1)), np.ones((1, 1)), prior=0.1, smoothing=smoothing)


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


def _spread_index(n: int = 400, seed: int = 0) -> tuple[FraudIndex, np.ndarray]:
    """n 2-d points labelled one hour apart over n hours, from 2024-01-08 (transactions from
    2024-01-01 with a 7-day label delay)."""
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n, 2)).astype(np.float32)
    t0 = datetime(2024, 1, 1)
    times = [t0 + timedelta(hours=i) for i in range(n)]
    index = faiss.IndexFlatL2(2)
    index.add(points)
    meta = pl.DataFrame({
        schema.TRANSACTION_ID: [f"h{i}" for i in range(n)],
        schema.TX_TIME: times,
        "label_time": [t + timedelta(days=7) for t in times],
        schema.IS_FRAUD: pl.Series(rng.integers(0, 2, n), dtype=pl.Int8),
        schema.CUSTOMER_ID: ["c"] * n,
        schema.TERMINAL_ID: ["t"] * n,
    })
    return FraudIndex(None, index, meta, meta.head(0), {}, IndexConfig(use_gpu=False)), points


def _brute_force(idx: FraudIndex, points, queries, times, ids, k):
    label_time = idx.meta["label_time"].dt.epoch("us").to_numpy()
    meta_ids = idx.meta[schema.TRANSACTION_ID].to_numpy()
    out = []
    for q, t, i in zip(queries, times, ids, strict=True):
        ok = np.flatnonzero((label_time <= t) & (meta_ids != i))
        d = ((points[ok] - q) ** 2).sum(axis=1)
        out.append(ok[np.argsort(d, kind="stable")][:k].tolist())
    return out


def test_neighbours_of_backfilled_queries_never_search_the_whole_index(monkeypatch):
    """Scoring transactions older than most of the index's labels (a back-fill, re-scoring
    history against today's index): a query with no label known at its time, or only a few,
    used to be searched again and again until the depth was the whole index — rows × index
    size distances at once (100k rows against a 250k index: 300 GB). A row with no label
    known is not searched, one with a few stops once it has them all, and no search call
    holds more than ``NEIGHBOUR_SEARCH_ELEMENTS`` distances; the neighbours are still exactly
    the brute-force ones."""
    import pipeline.index as index_module

    idx, points = _spread_index()
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(300, 2)).astype(np.float32)
    t_first = int(idx.meta["label_time"].dt.epoch("us").min())
    hour = 3_600_000_000
    # 100 with no label known yet, 100 with 1-5 known, 100 with ~half known; 50 of the
    # last are indexed rows themselves (their own label must not count).
    times = np.concatenate([t_first - hour * rng.integers(1, 100, 100),
                            t_first + hour * rng.integers(0, 5, 100),
                            t_first + hour * rng.integers(150, 250, 100)])
    ids = np.array([f"q{i}" for i in range(250)] + [f"h{i}" for i in range(50)], dtype=object)
    queries[250:] = points[:50]
    calls: list[tuple[int, int]] = []
    search = idx._search  # every search call neighbours makes (its queries checked once)

    def recorded(vectors, k):
        calls.append((len(vectors), k))
        return search(vectors, k)

    monkeypatch.setattr(idx, "_search", recorded)
    monkeypatch.setattr(index_module, "NEIGHBOUR_SEARCH_ELEMENTS", 2_000, raising=False)
    k = 5
    d, pos = idx.neighbours(queries, times, ids, k)
    want = _brute_force(idx, points, queries, times, ids, k)
    assert [[int(p) for p in row if p >= 0] for row in pos] == want
    assert all(len(w) == 0 for w in want[:100]) and np.isinf(d[:100]).all()
    assert max(rows * depth for rows, depth in calls) <= 2_000
    # The rows with no label known at their time are not searched at all.
    assert sum(rows for rows, depth in calls if depth == calls[0][1]) == 200


def test_a_stacked_index_scores_a_large_batch_one_search_call_at_a_time(monkeypatch):
    """A --scorer knn-stacked index ran its booster's neighbour search (100 candidates a row,
    with per-candidate card and terminal strings) over the whole batch at once: memory grew
    with the file, not with ``SEARCH_ROWS`` as the rest of scoring. It now goes one search
    call at a time, keeps only the neighbours an explanation shows, and the scores, the
    contributions (which add up to the score's log-odds) and the explanations are those of
    the batch scored whole."""
    import json

    from pipeline import scoring
    from pipeline.features import compute_features
    from pipeline.scoring import FraudScorer
    from pipeline.stacking import build_stacked_index
    from pipeline.synthetic import SyntheticConfig, generate

    data = generate(SyntheticConfig(n_customers=80, n_terminals=160, n_days=28, seed=7))
    split = data[schema.TX_TIME].min() + timedelta(days=21)
    history = compute_features(data.filter(pl.col(schema.TX_TIME) < split))
    index = build_stacked_index(history, config=IndexConfig(kind="flat", use_gpu=False))
    batch = data.filter(pl.col(schema.TX_TIME) >= split).head(240)
    whole = FraudScorer(index).score(batch)

    sizes: list[int] = []
    predict = index.model.predict

    def recorded(frame, *args, **kwargs):
        sizes.append(frame.height)
        return predict(frame, *args, **kwargs)

    monkeypatch.setattr(index.model, "predict", recorded)
    monkeypatch.setattr(scoring, "SEARCH_ROWS", 100)
    parts = FraudScorer(index).score(batch)
    assert sizes == [100, 100, 40]
    assert np.allclose(parts.scores["score"].to_numpy(), whole.scores["score"].to_numpy(),
                       atol=1e-6)
    stacked = parts.evidence.stacked
    assert stacked.neighbours.positions.shape == (240, 10)
    margin = stacked.contributions.sum(axis=1)
    assert np.allclose(1 / (1 + np.exp(-margin)), parts.scores["score"].to_numpy(), atol=1e-5)
    ours, theirs = parts.explanations, whole.explanations
    for a, b in zip(ours, theirs, strict=True):
        assert [n["transaction_id"] for n in a["model"]["neighbours_other_cards_terminals"]] \
            == [n["transaction_id"] for n in b["model"]["neighbours_other_cards_terminals"]]
        assert json.dumps(a["model"]["contributions_log_odds"]) \
            == json.dumps(b["model"]["contributions_log_odds"]) or np.allclose(
            list(a["model"]["contributions_log_odds"].values()),
            list(b["model"]["contributions_log_odds"].values()), atol=1e-5)


def _synthetic_scorer(config):
    from pipeline.features import compute_features
    from pipeline.scoring import FraudScorer
    from pipeline.synthetic import SyntheticConfig, generate
    from pipeline.vectors import VectorConfig

    data = generate(SyntheticConfig(n_customers=60, n_terminals=120, n_days=21, seed=3))
    split = data[schema.TX_TIME].min() + timedelta(days=15)
    history = compute_features(data.filter(pl.col(schema.TX_TIME) < split))
    index = FraudIndex.build(history, encoder=None, vector_config=VectorConfig(text_dim=0),
                             config=IndexConfig(kind="flat", use_gpu=False), until=split)
    return FraudScorer(index, config), data, split


def _early_and_late(data, split, late=60):
    """Five rows of the first hours (no label known yet at their time: the 7-day label delay)
    and ``late`` rows after the index's cutoff."""
    first = data[schema.TX_TIME].min()
    early = data.filter(pl.col(schema.TX_TIME) < first + timedelta(hours=12)).head(5)
    return pl.concat([early, data.filter(pl.col(schema.TX_TIME) >= split).head(late)])


def test_scores_match_a_brute_force_of_the_readme_formula():
    """score = (Σ fraud similarity + α·prior) / (Σ similarity + α) over the k nearest labels
    known at the row's time (itself excluded), recomputed in float64 over the whole index; a
    row with no label known yet has no neighbour, says so, and scores its prior."""
    scorer, data, split = _synthetic_scorer(ScoringConfig(k=10, prior=0.7, threshold=0.7))
    scored = scorer.score(_early_and_late(data, split))
    score = scored.scores["score"].to_numpy()
    ev = scored.evidence
    assert (ev.used[:5] == 0).all() and (ev.used[5:] == 10).all()
    assert score[:5] == pytest.approx([0.7] * 5, abs=1e-7)
    assert all(e["neighbours"] == [] and e["neighbours_used"] == 0 and e["total_weight"] == 0
               for e in scored.explanations[:5])
    index = scorer.index
    points = index.vectorizer.transform(index.meta).astype(np.float64)
    queries = ev.vectors.astype(np.float64)
    label_time = index.meta["label_time"].dt.epoch("us").to_numpy()
    ids = index.meta[schema.TRANSACTION_ID].to_numpy()
    labels = index.meta[schema.IS_FRAUD].to_numpy()
    times = ev.featured[schema.TX_TIME].dt.epoch("us").to_numpy()
    for row, (q, t, i) in enumerate(zip(queries, times, ev.featured[schema.TRANSACTION_ID],
                                        strict=True)):
        ok = np.flatnonzero((label_time <= t) & (ids != i))
        d = np.sqrt(((points[ok] - q) ** 2).sum(axis=1))
        near = np.argsort(d, kind="stable")[:10]
        sims = 1.0 / (1.0 + d[near])
        want = ((sims * (labels[ok][near] == 1)).sum() + 0.7) / (sims.sum() + 1.0)
        # FAISS's float32 distances and the float32 arithmetic (see the next test) aside.
        assert score[row] == pytest.approx(want, abs=1e-6)


@pytest.mark.xfail(strict=True, reason="scores are computed in float32; a float64 fix changes "
                   "every recorded score by ~1e-8, past audit replay's 1e-9 SCORE_TOLERANCE, "
                   "so it needs audit.py to replay old records in float32 (see the report)")
def test_scores_are_the_readme_formula_in_full_precision():
    """FAISS's float32 distances make the similarities, their sums and the score float32: a row
    with no known neighbour scores 0.699999988 instead of its prior 0.7 and passes a threshold
    of exactly 0.7, and every score is off the formula over its explanation's weights."""
    scorer, data, split = _synthetic_scorer(ScoringConfig(k=10, prior=0.7, threshold=0.7))
    scored = scorer.score(_early_and_late(data, split))
    score = scored.scores["score"].to_numpy()
    ev = scored.evidence
    assert score[:5].tolist() == [0.7] * 5
    assert scored.scores["decision"][:5].to_list() == ["alert"] * 5
    formula = (ev.fraud_weight + 0.7) / (ev.total_weight + 1.0)
    np.testing.assert_allclose(score, formula, rtol=1e-15, atol=0)


def test_a_batch_in_another_time_zone_is_scored_on_utc_days():
    """A batch whose tx_time is zone-aware (a frame handed to FraudScorer.score, not through
    ingest) kept its zone: --alerts-per-day ranked Tokyo days, not the UTC days the README
    promises, and the recorded transaction time (and so the input hash) was Tokyo wall-clock
    time with no zone. The same instants now score, rank and hash as naive UTC."""
    scorer, data, split = _synthetic_scorer(ScoringConfig(k=10, alerts_per_day=3))
    batch = data.filter(pl.col(schema.TX_TIME) >= split)
    utc = scorer.score(batch)
    tokyo = scorer.score(batch.with_columns(
        pl.col(schema.TX_TIME).dt.replace_time_zone("UTC").dt.convert_time_zone("Asia/Tokyo")))
    assert tokyo.scores.schema[schema.TX_TIME] == pl.Datetime("us")
    assert tokyo.scores.equals(utc.scores)
    assert tokyo.texts() == utc.texts()

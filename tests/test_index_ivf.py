"""IVF past ``ivf_min`` vectors, with its recall@k against exact search measured and recorded."""

from __future__ import annotations

from datetime import timedelta

import faiss
import numpy as np
import polars as pl
import pytest

from pipeline import schema
from pipeline.features import compute_features
from pipeline.index import (
    FraudIndex,
    IndexConfig,
    _choose_kind,
    _make_index,
    measure_recall,
    recall_at_k,
)
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig


def clustered(n: int = 20_000, dim: int = 16, centres: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.normal(0, 10, (centres, dim))
    return (middle[rng.integers(0, centres, n)] + rng.normal(0, 1, (n, dim))).astype(np.float32)


def test_recall_at_k_counts_exact_neighbours_found():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, -1]])
    assert recall_at_k(exact, exact) == 1.0
    found = np.array([[3, 2, 9, 8], [4, 7, 7, 7]])  # order does not matter; -1 is no neighbour
    assert recall_at_k(found, exact) == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="shapes differ"):
        recall_at_k(found[:, :2], exact)


def test_ivf_recall_against_exact_search_on_clustered_data():
    vectors = clustered()
    config = IndexConfig(kind="ivf", ivf_nprobe=16)
    ivf = _make_index("ivf", vectors, config)
    recall = measure_recall(ivf, vectors, k=10, queries=500)
    assert recall >= 0.95
    # Probing a single cell of ~566 must lose neighbours: the measure is not always 1.
    ivf.nprobe = 1
    assert measure_recall(ivf, vectors, k=10, queries=500) < recall


def test_recall_does_not_count_a_query_finding_itself():
    """The sample queries are indexed vectors: an index that finds nothing but the query's own
    vector (as any IVF list or HNSW node it sits in does) has recall 0 for the transactions it
    will be asked about, not 1/k."""
    vectors = clustered(n=2_000)

    class OnlyItself:
        def search(self, queries, k):
            own = [int(np.flatnonzero((vectors == q).all(axis=1))[0]) for q in queries]
            positions = np.full((len(queries), k), -1, dtype=np.int64)
            positions[:, 0] = own
            return np.zeros((len(queries), k), np.float32), positions

    assert measure_recall(OnlyItself(), vectors, k=10, queries=50) == 0.0
    exact = faiss.IndexFlatL2(vectors.shape[1])
    exact.add(vectors)
    assert measure_recall(exact, vectors, k=10, queries=50) == 1.0


def test_auto_picks_ivf_past_ivf_min_and_records_recall():
    config = IndexConfig(exact_max=100, ivf_min=300, ivf_nlist=8, recall_queries=200)
    assert _choose_kind(config, 100, on_gpu=False) == "flat"
    assert _choose_kind(config, 300, on_gpu=False) == "hnsw"
    assert _choose_kind(config, 301, on_gpu=False) == "ivf"
    data = generate(SyntheticConfig(n_customers=60, n_terminals=120, n_days=20, seed=2))
    history = compute_features(data.filter(
        pl.col(schema.TX_TIME) < data[schema.TX_TIME].min() + timedelta(days=14)))
    index = FraudIndex.build(history, encoder=None, vector_config=VectorConfig(text_dim=0),
                             config=config)
    assert index.manifest["faiss_index"] == "ivf" and index.size > config.ivf_min
    assert 0.9 <= index.manifest["recall_at_10"] <= 1.0
    exact = FraudIndex.build(history, encoder=None, vector_config=VectorConfig(text_dim=0))
    assert exact.manifest["faiss_index"] == "flat" and exact.manifest["recall_at_10"] is None

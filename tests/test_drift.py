"""Score drift (pipeline.drift): PSI at the edges, and the reference scores an index gives its
own history, for every kind of index. The textbook PSI values are in test_dashboard.py."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from pipeline import schema
from pipeline.drift import PSI_SIGNIFICANT, index_reference_scores, psi


def test_a_shift_away_from_a_constant_reference_is_significant():
    """All reference scores tied: the deciles collapse into one cut, and the bin above it used
    to hold the reference's value and everything higher, so a batch that moved entirely away
    from it read as PSI 0."""
    reference = np.full(500, 0.3)
    same = psi(reference, np.full(200, 0.3))
    assert same.value == pytest.approx(0.0) and same.level == "stable"
    moved = psi(reference, np.full(200, 0.7))
    assert moved.value > PSI_SIGNIFICANT and moved.level == "significant shift"
    below = psi(reference, np.full(200, 0.1))
    assert below.value > PSI_SIGNIFICANT
    assert sum(moved.expected_share) == pytest.approx(1.0)
    assert sum(moved.actual_share) == pytest.approx(1.0)


def test_a_tied_mass_in_the_reference_has_its_own_bin():
    """70 % of the reference at one score (kNN scores tie where every neighbour is genuine):
    a batch whose tied mass moves just above that score is a shift, not the same bin."""
    rng = np.random.default_rng(0)
    reference = np.concatenate([np.full(7000, 0.05), rng.uniform(0.1, 1.0, 3000)])
    same = psi(reference, np.concatenate([np.full(700, 0.05), rng.uniform(0.1, 1.0, 300)]))
    assert same.value < 0.05
    moved = np.concatenate([np.full(700, 0.06), rng.uniform(0.1, 1.0, 300)])
    assert psi(reference, moved).value > PSI_SIGNIFICANT
    # Continuous scores get no extra bins: ten bins at the deciles, as before.
    continuous = psi(rng.beta(2, 8, 2000), rng.beta(2, 8, 2000))
    assert len(continuous.edges) == 11 and continuous.value < 0.05


def test_psi_refuses_edges_that_are_not_finite():
    scores = np.linspace(0, 1, 50)
    for edges in ([np.nan], [0.5, np.inf]):
        with pytest.raises(ValueError, match="edges"):
            psi(scores, scores, edges=np.array(edges))


def test_reference_scores_of_an_ivf_index(tmp_path):
    """IVF lists have no direct map once read back (reconstruct failed), and nprobe is not in
    the file (faiss reads 1): the reference must search as the index scores, with the
    manifest's nprobe. With nprobe = every list, IVF is exact: the same scores as flat."""
    from pipeline.features import compute_features
    from pipeline.index import FraudIndex, IndexConfig
    from pipeline.synthetic import SyntheticConfig, generate
    from pipeline.vectors import VectorConfig

    data = generate(SyntheticConfig(n_customers=80, n_terminals=160, n_days=21, seed=5))
    history = compute_features(data.filter(
        pl.col(schema.TX_TIME) < data[schema.TX_TIME].min() + timedelta(days=14)))
    refs = {}
    for kind, config in (("flat", IndexConfig(kind="flat")),
                         ("ivf", IndexConfig(kind="ivf", ivf_nlist=8, ivf_nprobe=8))):
        index = FraudIndex.build(history, encoder=None, vector_config=VectorConfig(text_dim=0),
                                 config=config)
        assert index.manifest["faiss_index"] == kind
        version = index.save(kind, root=tmp_path)
        refs[kind] = index_reference_scores(tmp_path, f"{kind}@{version}", k=10, smoothing=1.0,
                                            sample=300)
    assert refs["ivf"].shape == (300,)
    assert (np.abs(refs["ivf"] - refs["flat"]) < 1e-6).mean() > 0.99

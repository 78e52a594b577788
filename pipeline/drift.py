"""Score drift: the population stability index (PSI) of a batch's scores against a reference,
and the reference an index gives its own history.

PSI = sum over bins of (actual share - expected share) * ln(actual share / expected share), with
bins cut at the reference's quantiles (and a bin of its own for a score the reference ties on).
Read it as the usual rule of thumb: below 0.1 stable, 0.1-0.25 a moderate shift worth a look,
above 0.25 a significant shift (retrain or investigate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25
# An empty bin would make the log infinite; shares are floored at this value.
PSI_EPSILON = 1e-4


@dataclass(frozen=True)
class PSIResult:
    """The PSI value and, per bin, its edges, both shares and its contribution (for a figure)."""

    value: float
    edges: list[float]  # len(bins) + 1; the outer edges are -inf and +inf
    expected_share: list[float]
    actual_share: list[float]
    contributions: list[float]
    expected_n: int
    actual_n: int

    @property
    def level(self) -> str:
        if self.value < PSI_MODERATE:
            return "stable"
        return "moderate shift" if self.value < PSI_SIGNIFICANT else "significant shift"


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10,
        edges: np.ndarray | None = None, epsilon: float = PSI_EPSILON) -> PSIResult:
    """PSI of ``actual`` against ``expected``. Bins: ``edges`` (interior cut points) if given,
    else the reference's quantiles (repeated cut points, from tied scores, are merged)."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    for name, values in (("expected", expected), ("actual", actual)):
        if values.ndim != 1 or len(values) == 0:
            raise ValueError(f"psi: {name} must be a non-empty 1-D array of scores")
        if not np.isfinite(values).all():
            raise ValueError(f"psi: {name} holds NaN or infinite scores")
    if bins < 2:
        raise ValueError(f"psi: bins must be >= 2, got {bins}")
    if edges is None:
        cuts = np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1])
        # A score holding a bin's worth of the reference or more (tied scores: the cuts collapse
        # onto it) gets a bin of its own, [v, next float after v): in the bin above, with
        # everything up to the next cut, a batch that moved off it would not show.
        values, counts = np.unique(expected, return_counts=True)
        tied = values[counts >= len(expected) / bins]
        edges = np.unique(np.concatenate([cuts, tied, np.nextafter(tied, np.inf)]))
    else:
        edges = np.unique(np.asarray(edges, dtype=np.float64).ravel())
        if not np.isfinite(edges).all():
            raise ValueError("psi: edges must be finite cut points (the outer bins are open)")
    # Bin i holds values in [edges[i-1], edges[i]); right-closed at the top.
    e_counts = np.bincount(np.searchsorted(edges, expected, side="right"),
                           minlength=len(edges) + 1)
    a_counts = np.bincount(np.searchsorted(edges, actual, side="right"),
                           minlength=len(edges) + 1)
    e_share = np.maximum(e_counts / len(expected), epsilon)
    a_share = np.maximum(a_counts / len(actual), epsilon)
    parts = (a_share - e_share) * np.log(a_share / e_share)
    return PSIResult(
        value=float(parts.sum()),
        edges=[float("-inf"), *map(float, edges), float("inf")],
        expected_share=(e_counts / len(expected)).tolist(),
        actual_share=(a_counts / len(actual)).tolist(),
        contributions=parts.tolist(),
        expected_n=len(expected), actual_n=len(actual))


def index_reference_scores(root: str | Path, index_version: str, *, k: int, smoothing: float,
                           prior: float | None = None, sample: int = 2000,
                           seed: int = 0) -> np.ndarray:
    """The kNN scores an index gives a random sample of its own labelled history, leave one
    out (every other indexed row counts, as for a batch scored after the index's label cutoff;
    never the row itself): the training score distribution a new batch is compared with.

    Reads only the FAISS file and the metadata, both checked against the manifest first (no
    encoder is loaded: the stored vectors are searched directly)."""
    import faiss

    from pipeline import artifacts, schema
    from pipeline.index import FraudIndex, IndexConfig, set_search_settings
    from pipeline.scoring import knn_score, similarity

    name, _, version = index_version.rpartition("@")
    if not name or not version or version == "unsaved":
        raise artifacts.ArtifactError(f"index version {index_version!r} does not name a saved "
                                      "index (NAME@VERSION)")
    directory, manifest = artifacts.resolve(Path(root), name, version,
                                            require=("index.faiss", "meta.parquet"))
    import polars as pl

    stored = faiss.read_index(str(directory / "index.faiss"))
    # Search as the index scores (FraudIndex.load); IVF lists need a direct map before their
    # vectors can be read back.
    config = IndexConfig(**{**manifest.get("index_config", {}), "use_gpu": False})
    set_search_settings(stored, config)
    if isinstance(stored, faiss.IndexIVF):
        stored.make_direct_map()
    meta = pl.read_parquet(directory / "meta.parquet")
    index = FraudIndex(None, stored, meta, meta.clear(), manifest,  # type: ignore[arg-type]
                       config)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(index.size, size=min(sample, index.size), replace=False))
    vectors = np.vstack([stored.reconstruct(int(r)) for r in rows])
    times = np.full(len(rows), np.iinfo(np.int64).max)  # every label counts
    ids = meta[schema.TRANSACTION_ID].to_numpy()[rows]
    distances, positions = index.neighbours(vectors, times, ids, k)
    scores = knn_score(similarity(distances), index.labels_at(positions),
                       prior=index.fraud_rate if prior is None else prior, smoothing=smoothing)
    return scores.astype(np.float64)

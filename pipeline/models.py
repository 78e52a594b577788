"""Named fraud scorers for the evaluation protocol: the handbook's baselines and the kNN family.

Every scorer has ``fit(train)`` and ``score(test)`` on feature frames (canonical columns plus the
handbook features, as :func:`pipeline.features.compute_features` makes them) and returns one
score per test row, higher meaning more likely fraud.

- ``logreg``, ``random-forest``, ``xgboost``: the handbook's baselines (ch. 5.3), standardised
  15 features, with the handbook's selected hyper-parameters; XGBoost with ``base_score=0.5`` and
  ``tree_method="exact"`` as the handbook's XGBoost 1.x ran.
- ``knn``: the pipeline's scorer (:mod:`pipeline.scoring`) on the numeric features.
- ``knn-text``: the same with the merchant-text embedding (identical to ``knn`` on data without
  descriptive text, such as the handbook's).
- ``knn-weighted``, ``knn-stacked``: see :mod:`pipeline.stacking`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from pipeline import schema
from pipeline.encoder import TextEncoder
from pipeline.features import with_derived_features
from pipeline.index import FraudIndex, IndexConfig
from pipeline.scoring import ScoringConfig, knn_score, similarity
from pipeline.stacking import StackedModel, StackingConfig, stacked_vector_config
from pipeline.vectors import VectorConfig, has_text


def feature_matrix(frame: pl.DataFrame, features: tuple[str, ...] = schema.MODEL_FEATURES
                   ) -> np.ndarray:
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise ValueError(f"missing feature columns {missing}; compute the features first "
                         "(pipeline.features.compute_features)")
    return frame.select(pl.col(features).cast(pl.Float64)).to_numpy()


def labels_of(frame: pl.DataFrame) -> np.ndarray:
    if schema.IS_FRAUD not in frame.columns:
        raise ValueError("training rows need the label column 'is_fraud'")
    labels = frame[schema.IS_FRAUD]
    if labels.null_count():
        raise ValueError(f"{labels.null_count()} training row(s) have no is_fraud label")
    return labels.cast(pl.Int8).to_numpy()


class HandbookBaseline:
    """StandardScaler (fit on the training rows) then a classifier, as the handbook's
    ``fit_model_and_get_predictions`` and its model-selection pipeline do."""

    def __init__(self, name: str, make_estimator: Callable[[], object],
                 features: tuple[str, ...] = schema.MODEL_FEATURES):
        self.name = name
        self.make_estimator = make_estimator
        self.features = features
        self.scaler = None
        self.estimator = None

    def fit(self, train: pl.DataFrame, history: pl.DataFrame | None = None
            ) -> HandbookBaseline:
        from sklearn.preprocessing import StandardScaler

        x = feature_matrix(train, self.features)
        self.scaler = StandardScaler().fit(x)
        self.estimator = self.make_estimator()
        self.estimator.fit(self.scaler.transform(x), labels_of(train))
        return self

    def score(self, test: pl.DataFrame, history: pl.DataFrame | None = None) -> np.ndarray:
        if self.estimator is None:
            raise RuntimeError(f"scorer {self.name!r} is not fitted")
        x = self.scaler.transform(feature_matrix(test, self.features))
        return self.estimator.predict_proba(x)[:, 1]


def logistic_regression(n_jobs: int = 1, encoder: TextEncoder | None = None,
                        label_delay_days: int = 7) -> HandbookBaseline:
    from sklearn.linear_model import LogisticRegression

    return HandbookBaseline("logreg", lambda: LogisticRegression(C=0.1, random_state=0))


def random_forest(n_jobs: int = 1, encoder: TextEncoder | None = None,
                  label_delay_days: int = 7) -> HandbookBaseline:
    from sklearn.ensemble import RandomForestClassifier

    return HandbookBaseline("random-forest", lambda: RandomForestClassifier(
        n_estimators=100, max_depth=20, random_state=0, n_jobs=n_jobs))


def xgboost_baseline(n_jobs: int = 1, encoder: TextEncoder | None = None,
                     label_delay_days: int = 7) -> HandbookBaseline:
    from xgboost import XGBClassifier

    return HandbookBaseline("xgboost", lambda: XGBClassifier(
        n_estimators=100, learning_rate=0.1, max_depth=3, random_state=0, n_jobs=n_jobs,
        base_score=0.5, tree_method="exact", verbosity=0))


@dataclass(frozen=True)
class KnnSettings:
    """The pipeline's kNN scorer: vector layout, neighbours and smoothing."""

    vector: VectorConfig = field(default_factory=lambda: VectorConfig(text_dim=0))
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    index: IndexConfig = field(default_factory=lambda: IndexConfig(kind="flat", use_gpu=None))


class KnnScorer:
    """The production kNN score: a FraudIndex of the training rows, queried with each test
    row's vector; score = smoothed similarity-weighted fraud share of its k neighbours."""

    def __init__(self, name: str = "knn", settings: KnnSettings | None = None,
                 encoder: TextEncoder | None = None, use_text: bool = False):
        self.name = name
        self.settings = settings or KnnSettings()
        self.encoder = encoder
        self.use_text = use_text
        self.index: FraudIndex | None = None

    def fit(self, train: pl.DataFrame, history: pl.DataFrame | None = None) -> KnnScorer:
        labels_of(train)
        self.index = FraudIndex.build(train, encoder=self._encoder_for(train),
                                      vector_config=self.vector_config(train),
                                      config=self.settings.index)
        return self

    def vector_config(self, train: pl.DataFrame) -> VectorConfig:
        return self.settings.vector

    def _encoder_for(self, frame: pl.DataFrame) -> TextEncoder | None:
        """The text encoder, loaded only when the data has descriptive text to embed."""
        if not self.use_text or not has_text(frame.columns) or self.settings.vector.text_dim == 0:
            return None
        if self.encoder is None:
            self.encoder = TextEncoder()
        return self.encoder

    def neighbours(self, frame: pl.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, positions in the index) of each row's k nearest labelled
        neighbours whose label was known at the row's time."""
        if self.index is None:
            raise RuntimeError(f"scorer {self.name!r} is not fitted")
        vectors = self.index.vectorizer.transform(frame)
        times = frame[schema.TX_TIME].dt.epoch("us").to_numpy()
        ids = frame[schema.TRANSACTION_ID].cast(pl.String).to_numpy()
        return self.index.neighbours(vectors, times, ids, k)

    def score(self, test: pl.DataFrame, history: pl.DataFrame | None = None) -> np.ndarray:
        cfg = self.settings.scoring
        distances, positions = self.neighbours(test, cfg.k)
        prior = cfg.prior if cfg.prior is not None else self.index.fraud_rate
        return knn_score(similarity(distances), self.index.labels_at(positions), prior=prior,
                         smoothing=cfg.smoothing)


def _settings(text_dim: int, label_delay_days: int) -> KnnSettings:
    """kNN settings whose index waits ``label_delay_days`` for a neighbour's label."""
    return KnnSettings(vector=VectorConfig(text_dim=text_dim),
                       index=IndexConfig(kind="flat", use_gpu=None,
                                         label_delay_days=label_delay_days))


def knn(n_jobs: int = 1, encoder: TextEncoder | None = None, label_delay_days: int = 7
        ) -> KnnScorer:
    return KnnScorer("knn", _settings(0, label_delay_days))


def knn_text(n_jobs: int = 1, encoder: TextEncoder | None = None, label_delay_days: int = 7
             ) -> KnnScorer:
    return KnnScorer("knn-text", _settings(8, label_delay_days), encoder=encoder, use_text=True)


class KnnWeighted(KnnScorer):
    """The pipeline's kNN score on a better vector: the 15 features plus the amount-to-usual
    ratios, each weighted by what it is worth (learned on the training rows), plus the text."""

    def __init__(self, name: str = "knn-weighted", settings: KnnSettings | None = None,
                 encoder: TextEncoder | None = None, use_text: bool = True, n_jobs: int = 1):
        super().__init__(name, settings or KnnSettings(vector=VectorConfig(text_dim=8)),
                         encoder, use_text)
        self.n_jobs = n_jobs

    def vector_config(self, train: pl.DataFrame) -> VectorConfig:
        text_dim = self.settings.vector.text_dim if self._encoder_for(train) else 0
        return stacked_vector_config(train, text_dim=text_dim, n_jobs=self.n_jobs)

    def fit(self, train: pl.DataFrame, history: pl.DataFrame | None = None) -> KnnWeighted:
        return super().fit(with_derived_features(train), history)

    def score(self, test: pl.DataFrame, history: pl.DataFrame | None = None) -> np.ndarray:
        return super().score(with_derived_features(test), history)


class KnnStacked(KnnWeighted):
    """Neighbour evidence into XGBoost: the weighted kNN's statistics at several k, the
    terminal's most recent known labels, and the features (see :mod:`pipeline.stacking`)."""

    def __init__(self, name: str = "knn-stacked", stacking: StackingConfig | None = None,
                 encoder: TextEncoder | None = None, use_text: bool = True, n_jobs: int = 1,
                 settings: KnnSettings | None = None):
        super().__init__(name, settings, encoder, use_text, n_jobs)
        self.model = StackedModel(stacking)

    def fit(self, train: pl.DataFrame, history: pl.DataFrame | None = None) -> KnnStacked:
        super().fit(train, history)
        labelled = train if history is None else history
        self.model.fit(with_derived_features(train), self.index, labelled, n_jobs=self.n_jobs)
        return self

    def score(self, test: pl.DataFrame, history: pl.DataFrame | None = None) -> np.ndarray:
        if self.index is None:
            raise RuntimeError(f"scorer {self.name!r} is not fitted")
        labelled = self.index.meta if history is None else history
        return self.model.predict(test, self.index, labelled, contributions=False).scores


SCORERS: dict[str, Callable[..., object]] = {
    "logreg": logistic_regression,
    "random-forest": random_forest,
    "xgboost": xgboost_baseline,
    "knn": knn,
    "knn-text": knn_text,
    "knn-weighted": lambda n_jobs=1, encoder=None, label_delay_days=7: KnnWeighted(
        settings=_settings(8, label_delay_days), encoder=encoder, n_jobs=n_jobs),
    "knn-stacked": lambda n_jobs=1, encoder=None, label_delay_days=7: KnnStacked(
        stacking=StackingConfig(label_delay_days=label_delay_days),
        settings=_settings(8, label_delay_days), encoder=encoder, n_jobs=n_jobs),
}


def make_scorer(name: str, n_jobs: int = 1, encoder: TextEncoder | None = None,
                label_delay_days: int = 7):
    """A fresh, unfitted scorer by name; ``encoder``: a text encoder to share (the scorers that
    embed text load the default one, only when the data has text, otherwise);
    ``label_delay_days``: how long a label takes to be known (the evaluation protocol's delay:
    neighbours and the stacked model's terminal evidence wait as long)."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; expected one of {', '.join(SCORERS)}")
    return SCORERS[name](n_jobs=n_jobs, encoder=encoder, label_delay_days=label_delay_days)

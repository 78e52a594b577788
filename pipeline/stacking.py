"""kNN evidence turned into a better fraud score: learned feature weights for the neighbour
search, neighbour statistics at several k, the terminal's most recent labelled transactions, and
a gradient-boosted model (XGBoost) over those together with the features.

Two kinds of neighbours are the evidence a decision shows:

- feature-space neighbours: the k labelled transactions nearest in the (weighted) vector space,
  from other cards and other terminals (same-card and same-terminal rows are left out, so that
  the statistics mean the same in training, where a row's own card would otherwise vote, and in
  scoring);
- terminal neighbours: the terminal's most recent transactions whose label is known at the time
  of the payment (transaction time + label delay), with how recent they are. A compromised
  terminal turns every payment into fraud for weeks; its last known labels say so more sharply
  than the handbook's windowed fraud shares.

The booster is saved as XGBoost JSON (never pickle) beside the index, hash-checked like the rest
of the artifact. Its per-input contributions (``pred_contribs``, in log-odds) go into each
decision's explanation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline import schema
from pipeline.features import AMOUNT_RATIO_FEATURES, with_derived_features
from pipeline.index import FraudIndex, IndexConfig
from pipeline.scoring import knn_score, similarity
from pipeline.vectors import VectorConfig

BOOSTER_FILE = "booster.json"
STACKING_FILE = "stacking.json"
VECTOR_FEATURES = (*schema.MODEL_FEATURES, *AMOUNT_RATIO_FEATURES)
TERMINAL_FEATURES = (
    "TERMINAL_LAST_LABEL", "TERMINAL_FRAUD_SHARE_LAST_3", "TERMINAL_FRAUD_SHARE_LAST_10",
    "TERMINAL_DAYS_SINCE_FRAUD", "TERMINAL_DAYS_IN_FRAUD_RUN", "TERMINAL_DAYS_SINCE_LABEL",
)
NO_EVENT_DAYS = 999.0  # "never" for the days-since inputs
NO_FRAUD_DISTANCE = 10.0  # distance to the nearest fraud when none is among the neighbours


@dataclass(frozen=True)
class StackingConfig:
    """ks: neighbour counts whose smoothed fraud shares the booster sees; fetch: candidates
    searched so that k remain after leaving out same-card and same-terminal rows; booster:
    XGBoost settings (the handbook baseline's capacity: more overfits a week of ~600 frauds)."""

    ks: tuple[int, ...] = (5, 20, 50)
    fetch: int = 100
    use_knn: bool = True  # False: no feature-space neighbour inputs (a control for the ablation)
    smoothing: float = 1.0
    learn_weights: bool = True
    label_delay_days: int = 7
    booster: dict[str, Any] = field(default_factory=lambda: {
        "n_estimators": 100, "learning_rate": 0.1, "max_depth": 3, "random_state": 0,
        "base_score": 0.5, "tree_method": "exact"})

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be neighbour counts >= 1, got {self.ks}")
        if self.fetch < max(self.ks):
            raise ValueError(f"fetch ({self.fetch}) must be >= the largest k ({max(self.ks)})")

    @property
    def knn_features(self) -> tuple[str, ...]:
        if not self.use_knn:
            return ()
        return (*(f"KNN_FRAUD_SHARE_{k}" for k in self.ks), "KNN_NEAREST_FRAUD_DISTANCE",
                "KNN_NEAREST_DISTANCE")

    @property
    def inputs(self) -> tuple[str, ...]:
        """The booster's inputs, in order."""
        return (*VECTOR_FEATURES, *TERMINAL_FEATURES, *self.knn_features)


def learned_weights(train: pl.DataFrame, features: tuple[str, ...] = VECTOR_FEATURES,
                    n_jobs: int = 1) -> dict[str, float]:
    """Per-feature weights for the neighbour search: the square root of each feature's share of
    a shallow booster's split gain (mean weight 1), so squared distances weigh a feature by how
    much it separates fraud from genuine. A feature never split on gets weight 0."""
    from xgboost import XGBClassifier

    frame = with_derived_features(train)
    x = frame.select(pl.col(features).cast(pl.Float64)).to_numpy()
    y = frame[schema.IS_FRAUD].cast(pl.Int8).to_numpy()
    model = XGBClassifier(n_estimators=50, learning_rate=0.1, max_depth=3, random_state=0,
                          n_jobs=n_jobs, base_score=0.5, tree_method="exact", verbosity=0)
    gain = model.fit(x, y).get_booster().get_score(importance_type="gain")
    values = np.array([gain.get(f"f{i}", 0.0) for i in range(len(features))])
    if values.sum() <= 0:
        return {f: 1.0 for f in features}
    weights = np.sqrt(values / values.mean())
    return {f: round(float(w), 6) for f, w in zip(features, weights, strict=True)}


# --- terminal neighbours ------------------------------------------------------------------------


def terminal_evidence(queries: pl.DataFrame, labelled: pl.DataFrame, delay_days: int = 7
                      ) -> pl.DataFrame:
    """For each query row (transaction_id, terminal_id, tx_time): what the terminal's labelled
    transactions known at that time (transaction time + delay <= query time; a ``label_time``
    column, where not null, gives a reviewed label's time instead, as in
    :meth:`FraudIndex.build`) say — the last label, the fraud share of the last 3 and 10, days
    since the last known fraud, days since the current run of frauds began (null-coded as 999
    when the last label is genuine), days since the last known label. A terminal's label counts
    only once its earlier ones are known too (so "the last n" never skips an unknown one). Rows
    come back in query order."""
    tx, delay = pl.col(schema.TX_TIME), timedelta(days=delay_days)
    fraud = pl.col(schema.IS_FRAUD)
    label_time = (pl.coalesce(pl.col("label_time").cast(pl.Datetime("us")), tx + delay)
                  if "label_time" in labelled.columns else tx + delay)
    known = (
        labelled.filter(fraud.is_not_null())
        .select(pl.col(schema.TERMINAL_ID).cast(pl.String), tx, fraud.cast(pl.Int8),
                label_time.alias("_known"))
        .sort(schema.TERMINAL_ID, schema.TX_TIME)
        .with_columns(
            pl.col("_known").cum_max().over(schema.TERMINAL_ID).alias("_known"),
            fraud.cast(pl.Float64).alias("TERMINAL_LAST_LABEL"),
            fraud.cast(pl.Float64).rolling_mean(3, min_samples=1).over(schema.TERMINAL_ID)
            .alias("TERMINAL_FRAUD_SHARE_LAST_3"),
            fraud.cast(pl.Float64).rolling_mean(10, min_samples=1).over(schema.TERMINAL_ID)
            .alias("TERMINAL_FRAUD_SHARE_LAST_10"),
            pl.when(fraud == 1).then(tx).forward_fill().over(schema.TERMINAL_ID)
            .alias("_last_fraud"),
            # The run of frauds started at the first fraud after a genuine (or the first row).
            pl.when((fraud == 1) & (fraud.shift(1).over(schema.TERMINAL_ID).fill_null(0) == 0))
            .then(tx).forward_fill().over(schema.TERMINAL_ID).alias("_run_start"),
            tx.alias("_last_label"),
        )
        .with_columns(pl.when(fraud == 1).then(pl.col("_run_start")).alias("_run_start"))
        .drop(schema.TX_TIME, schema.IS_FRAUD)
        .sort("_known")
    )
    rows = (
        queries.select(pl.col(schema.TRANSACTION_ID), pl.col(schema.TERMINAL_ID).cast(pl.String),
                       tx)
        .with_row_index("_row")
        .sort(schema.TX_TIME)
    )
    joined = rows.join_asof(known, left_on=schema.TX_TIME, right_on="_known",
                            by=schema.TERMINAL_ID, strategy="backward", check_sortedness=False)

    def days_since(column: str) -> pl.Expr:
        return ((tx - pl.col(column)).dt.total_seconds() / 86400.0).fill_null(NO_EVENT_DAYS)

    return joined.sort("_row").select(
        schema.TRANSACTION_ID,
        pl.col("TERMINAL_LAST_LABEL", "TERMINAL_FRAUD_SHARE_LAST_3",
               "TERMINAL_FRAUD_SHARE_LAST_10").fill_null(0.0),
        days_since("_last_fraud").alias("TERMINAL_DAYS_SINCE_FRAUD"),
        days_since("_run_start").alias("TERMINAL_DAYS_IN_FRAUD_RUN"),
        days_since("_last_label").alias("TERMINAL_DAYS_SINCE_LABEL"),
    )


def terminal_history(labelled: pl.DataFrame, terminal: str, at: Any, delay_days: int = 7,
                     n: int = 5) -> list[dict[str, Any]]:
    """The terminal's last ``n`` transactions whose label was known at ``at``, newest first."""
    rows = (labelled.filter((pl.col(schema.TERMINAL_ID).cast(pl.String) == terminal)
                            & (pl.col(schema.TX_TIME) + timedelta(days=delay_days) <= at)
                            & pl.col(schema.IS_FRAUD).is_not_null())
            .sort(schema.TX_TIME, descending=True).head(n))
    return [{"transaction_id": str(r[schema.TRANSACTION_ID]),
             "tx_time": r[schema.TX_TIME].isoformat(), "is_fraud": int(r[schema.IS_FRAUD])}
            for r in rows.select(schema.TRANSACTION_ID, schema.TX_TIME, schema.IS_FRAUD)
            .iter_rows(named=True)]


# --- feature-space neighbours -------------------------------------------------------------------


@dataclass
class Neighbours:
    """The kept neighbours of each query row: squared distances (inf where none), positions
    in the index's meta (-1 where none) and their labels (0 where none)."""

    distances: np.ndarray
    positions: np.ndarray
    labels: np.ndarray


def other_neighbours(index: FraudIndex, frame: pl.DataFrame, k: int, fetch: int,
                     *, known_by_query_time: bool) -> Neighbours:
    """The k nearest indexed rows of each row of ``frame`` from other cards and other terminals.
    With ``known_by_query_time``, only rows whose label was known at the query's time count
    (scoring); without, every indexed label counts (the booster's own training rows)."""
    vectors = index.vectorizer.transform(frame)
    distances, positions = index.search(vectors, min(fetch, index.size))
    safe = np.where(positions >= 0, positions, 0)
    meta = index.meta
    cards = meta[schema.CUSTOMER_ID].cast(pl.String).to_numpy()
    terminals = meta[schema.TERMINAL_ID].cast(pl.String).to_numpy()
    keep = positions >= 0
    keep &= cards[safe] != frame[schema.CUSTOMER_ID].cast(pl.String).to_numpy()[:, None]
    keep &= terminals[safe] != frame[schema.TERMINAL_ID].cast(pl.String).to_numpy()[:, None]
    if known_by_query_time:
        label_time = meta["label_time"].dt.epoch("us").to_numpy()
        keep &= label_time[safe] <= frame[schema.TX_TIME].dt.epoch("us").to_numpy()[:, None]
    # Stable sort puts the kept candidates first, still in distance order.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)
    out_d = np.where(kept, np.take_along_axis(distances, order, axis=1), np.inf)
    out_p = np.where(kept, np.take_along_axis(positions, order, axis=1), -1)
    if out_d.shape[1] < k:  # an index smaller than k
        pad = k - out_d.shape[1]
        out_d = np.pad(out_d, ((0, 0), (0, pad)), constant_values=np.inf)
        out_p = np.pad(out_p, ((0, 0), (0, pad)), constant_values=-1)
    return Neighbours(out_d.astype(np.float64), out_p, index.labels_at(out_p))


def neighbour_statistics(found: Neighbours, ks: tuple[int, ...], prior: float,
                         smoothing: float) -> np.ndarray:
    """Per row: the smoothed similarity-weighted fraud share of the first k neighbours for each
    k, the distance to the nearest fraud among them, and the distance to the nearest one."""
    sims = similarity(found.distances)
    cols = [knn_score(sims[:, :k], found.labels[:, :k], prior=prior, smoothing=smoothing)
            for k in ks]
    distance = np.sqrt(np.maximum(found.distances, 0.0))
    to_fraud = np.where(found.labels == 1, distance, np.inf).min(axis=1)
    cols.append(np.where(np.isfinite(to_fraud), to_fraud, NO_FRAUD_DISTANCE))
    cols.append(np.where(np.isfinite(distance[:, 0]), distance[:, 0], NO_FRAUD_DISTANCE))
    return np.column_stack(cols)


# --- the stacked model --------------------------------------------------------------------------


@dataclass
class StackedPrediction:
    scores: np.ndarray
    contributions: np.ndarray  # (rows, inputs + 1): per input, then the bias; log-odds
    inputs: np.ndarray         # (rows, inputs): the booster's input values
    neighbours: Neighbours     # feature-space neighbours at the largest k


class StackedModel:
    """XGBoost over the features, the terminal neighbours and the feature-space neighbour
    statistics of a FraudIndex."""

    def __init__(self, config: StackingConfig | None = None):
        self.config = config or StackingConfig()
        self.booster = None  # xgboost.Booster
        self.prior: float = 0.0

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.config.inputs

    def design(self, frame: pl.DataFrame, index: FraudIndex, labelled: pl.DataFrame,
               *, training: bool) -> tuple[np.ndarray, Neighbours]:
        """The booster's input matrix for ``frame`` and the neighbours behind it."""
        cfg = self.config
        frame = with_derived_features(frame)
        if cfg.use_knn:
            found = other_neighbours(index, frame, max(cfg.ks), cfg.fetch,
                                     known_by_query_time=not training)
            knn = neighbour_statistics(found, cfg.ks, self.prior, cfg.smoothing)
        else:
            found = Neighbours(np.full((frame.height, 0), np.inf), np.full((frame.height, 0), -1),
                               np.zeros((frame.height, 0), dtype=np.int8))
            knn = np.zeros((frame.height, 0))
        terminal = terminal_evidence(frame, labelled, cfg.label_delay_days)
        x = np.hstack([
            frame.select(pl.col(VECTOR_FEATURES).cast(pl.Float64)).to_numpy(),
            terminal.select(TERMINAL_FEATURES).to_numpy(),
            knn,
        ])
        return x, found

    def fit(self, train: pl.DataFrame, index: FraudIndex, labelled: pl.DataFrame,
            n_jobs: int = 1) -> StackedModel:
        """``train``: labelled rows with features; ``index``: the neighbours' index (it may hold
        ``train`` itself: same-card rows, the row's own included, never vote); ``labelled``:
        labelled history for the terminal neighbours (only labels known at each row's time are
        used)."""
        from xgboost import XGBClassifier

        y = train[schema.IS_FRAUD].cast(pl.Int8).to_numpy()
        if len(np.unique(y)) < 2:  # a constant booster would give every decision one score
            raise ValueError(f"the stacked model needs both classes in its training rows, got "
                             f"{len(y)} rows with is_fraud in {sorted(set(y.tolist()))}")
        self.prior = float(y.mean())
        x, _ = self.design(train, index, labelled, training=True)
        model = XGBClassifier(**self.config.booster, n_jobs=n_jobs, verbosity=0)
        model.fit(x, y)
        self.booster = model.get_booster()
        self.booster.feature_names = list(self.input_names)
        return self

    def predict(self, frame: pl.DataFrame, index: FraudIndex, labelled: pl.DataFrame,
                *, contributions: bool = True) -> StackedPrediction:
        import xgboost

        if self.booster is None:
            raise RuntimeError("StackedModel is not fitted")
        x, found = self.design(frame, index, labelled, training=False)
        matrix = xgboost.DMatrix(x, feature_names=list(self.input_names))
        scores = self.booster.predict(matrix)
        contributions = (self.booster.predict(matrix, pred_contribs=True) if contributions
                         else np.zeros((len(x), 0)))
        return StackedPrediction(scores.astype(np.float64), contributions, x, found)

    def save(self, directory: str | Path) -> None:
        """XGBoost's JSON model format plus the settings — no pickle."""
        directory = Path(directory)
        if self.booster is None:
            raise RuntimeError("StackedModel is not fitted")
        self.booster.save_model(str(directory / BOOSTER_FILE))
        meta = {"config": {**asdict(self.config), "ks": list(self.config.ks)},
                "prior": self.prior, "inputs": list(self.input_names)}
        (directory / STACKING_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> StackedModel:
        import xgboost

        directory = Path(directory)
        meta = json.loads((directory / STACKING_FILE).read_text())
        cfg = meta["config"]
        self = cls(StackingConfig(**{**cfg, "ks": tuple(cfg["ks"])}))
        if list(self.input_names) != meta["inputs"]:
            raise ValueError(f"{directory / STACKING_FILE}: inputs {meta['inputs']} do not match "
                             f"this version's {list(self.input_names)}")
        self.prior = float(meta["prior"])
        self.booster = xgboost.Booster()
        self.booster.load_model(str(directory / BOOSTER_FILE))
        # The booster reads the inputs by position: one made for another layout would score
        # every row without a word (XGBoost accepts fewer columns than it was trained on).
        count, named = self.booster.num_features(), self.booster.feature_names
        if count != len(self.input_names) or (named is not None
                                              and list(named) != list(self.input_names)):
            raise ValueError(f"{directory / BOOSTER_FILE}: the booster takes {count} inputs"
                             + (f" {list(named)}" if named is not None else "")
                             + f", not the {len(self.input_names)} of {STACKING_FILE} "
                             f"{list(self.input_names)}")
        return self

    def explain(self, prediction: StackedPrediction, row: int, top: int = 8
                ) -> dict[str, Any]:
        """The booster's largest per-input contributions (log-odds) for one row."""
        names = self.input_names
        contrib = prediction.contributions[row]
        order = np.argsort(-np.abs(contrib[:-1]))[:top]
        return {
            "model": "xgboost-stacked",
            "contributions_log_odds": {names[i]: round(float(contrib[i]), 6) for i in order},
            "inputs": {names[i]: round(float(prediction.inputs[row, i]), 6) for i in order},
            "bias_log_odds": round(float(contrib[-1]), 6),
            "other_inputs_log_odds": round(float(np.delete(contrib[:-1], order).sum()), 6),
            "terminal_neighbours": {n: round(float(prediction.inputs[row, names.index(n)]), 6)
                                    for n in TERMINAL_FEATURES},
        }


def stacked_vector_config(train: pl.DataFrame, *, text_dim: int = 8, n_jobs: int = 1,
                          learn: bool = True) -> VectorConfig:
    """The neighbour search's vector: the 15 features plus the amount ratios, weighted."""
    weights = learned_weights(train, VECTOR_FEATURES, n_jobs) if learn else {}
    return VectorConfig(numeric_features=VECTOR_FEATURES, numeric_weights=weights,
                        text_dim=text_dim)


def build_stacked_index(history: pl.DataFrame, *, encoder=None, text_dim: int = 8,
                        config: IndexConfig | None = None, stacking: StackingConfig | None = None,
                        until=None, train_days: int = 7, n_jobs: int = 1) -> FraudIndex:
    """A FraudIndex whose vectors use learned weights, carrying a StackedModel trained on the
    last ``train_days`` days of labelled rows (labels known by ``until``)."""
    config = config or IndexConfig()
    # The terminal neighbours wait the index's label delay (the features were made with it).
    if stacking is None:
        stacking = StackingConfig(label_delay_days=config.label_delay_days)
    elif stacking.label_delay_days != config.label_delay_days:
        raise ValueError(f"stacking label delay ({stacking.label_delay_days} days) differs from "
                         f"the index's ({config.label_delay_days} days)")
    history = with_derived_features(history)
    delay = timedelta(days=config.label_delay_days)
    labelled = history.filter(pl.col(schema.IS_FRAUD).is_not_null())
    if until is not None:  # as FraudIndex.build: an analyst's review time, else time + delay
        known = pl.col(schema.TX_TIME) + delay
        if "label_time" in labelled.columns:
            known = pl.coalesce(pl.col("label_time").cast(pl.Datetime("us")), known)
        labelled = labelled.filter(known <= until)
    if labelled.height == 0:
        raise ValueError("no labelled transaction to train the stacked model on")
    end = labelled[schema.TX_TIME].max()
    train = labelled.filter(pl.col(schema.TX_TIME) > end - timedelta(days=train_days))
    if train[schema.IS_FRAUD].cast(pl.Int64).sum() == 0:
        raise ValueError(f"the last {train_days} days of labelled history hold no fraud: the "
                         "stacked model needs both classes")
    vector = stacked_vector_config(train, text_dim=text_dim if encoder else 0, n_jobs=n_jobs)
    index = FraudIndex.build(history, encoder=encoder, vector_config=vector, config=config,
                             until=until)
    model = StackedModel(stacking).fit(train, index, labelled, n_jobs=n_jobs)
    index.model = model
    index.manifest["model"] = {"kind": "xgboost-stacked", "train_rows": train.height,
                               "train_frauds": int(train[schema.IS_FRAUD].sum()),
                               "train_start": train[schema.TX_TIME].min().isoformat(),
                               "train_end": end.isoformat(),
                               "files": [BOOSTER_FILE, STACKING_FILE],
                               "inputs": list(model.input_names)}
    return index

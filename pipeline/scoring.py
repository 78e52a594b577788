"""Fraud scores from labelled nearest neighbours, with the evidence behind each score.

score = (sum of similarities of fraud neighbours + smoothing * prior)
        / (sum of similarities of all neighbours + smoothing)

Weighing genuine neighbours as well as fraud ones matters: distance to the nearest known fraud
alone ranks worse than random on the handbook data, because frauds sit in dense genuine regions.
The smoothing term pulls scores with little or distant evidence towards the base rate.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from pipeline import schema
from pipeline.features import (
    AMOUNT_RATIO_FEATURES,
    compute_batch_features,
    with_derived_features,
)
from pipeline.index import FraudIndex


@dataclass(frozen=True)
class ScoringConfig:
    """k neighbours; smoothing in units of neighbour similarity; prior defaults to the index's
    fraud rate. threshold / alerts_per_day: the alert rule (alerts_per_day wins when set)."""

    k: int = 20
    smoothing: float = 1.0
    prior: float | None = None
    threshold: float = 0.5
    alerts_per_day: int | None = None
    explain_neighbours: int = 10


def similarity(squared_l2: np.ndarray) -> np.ndarray:
    """Similarity in (0, 1] from squared Euclidean distance; 0 for missing neighbours (inf)."""
    with np.errstate(invalid="ignore"):
        sim = 1.0 / (1.0 + np.sqrt(np.maximum(squared_l2, 0.0)))
    return np.where(np.isfinite(squared_l2), sim, 0.0)


def knn_score(similarities: np.ndarray, labels: np.ndarray, *, prior: float, smoothing: float
              ) -> np.ndarray:
    """Smoothed similarity-weighted fraud share of each row's neighbours, in [0, 1]."""
    if not 0.0 <= prior <= 1.0:
        raise ValueError(f"prior must be in [0, 1], got {prior}")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    fraud = (similarities * (labels == 1)).sum(axis=1)
    total = similarities.sum(axis=1)
    denom = total + smoothing
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(denom > 0, (fraud + smoothing * prior) / denom, prior)
    return np.clip(score, 0.0, 1.0)


ISO_US = "%Y-%m-%dT%H:%M:%S%.6f"


def canonical_rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Each row's schema fields (sorted; times as ISO-8601 text with microseconds)."""
    cols = sorted(c for c in frame.columns if c in schema.DTYPES)
    return frame.select(cols).with_columns(pl.col(pl.Datetime).dt.to_string(ISO_US)).to_dicts()


def row_hashes(frame: pl.DataFrame) -> list[str]:
    """sha256 of each row's canonical JSON: what exactly was scored, for the ledger."""
    rows = canonical_rows(frame)
    return [hashlib.sha256(json.dumps(r, sort_keys=True, separators=(",", ":"),
                                      default=str).encode()).hexdigest() for r in rows]


def batch_hash(hashes: list[str]) -> str:
    """Order-independent hash of a batch, so re-reading the same rows gives the same hash."""
    digest = hashlib.sha256()
    for h in sorted(hashes):
        digest.update(h.encode())
    return digest.hexdigest()


def alert_thresholds(scores: pl.DataFrame, config: ScoringConfig) -> np.ndarray:
    """Per-row threshold: fixed, or per day the score of the N-th highest transaction."""
    if config.alerts_per_day is None:
        return np.full(scores.height, config.threshold)
    n = config.alerts_per_day
    if n < 1:
        raise ValueError(f"alerts_per_day must be >= 1, got {n}")
    per_day = scores.with_columns(
        pl.col("score").sort(descending=True).get(
            pl.min_horizontal(pl.len(), pl.lit(n, pl.UInt32)) - 1
        ).over(pl.col(schema.TX_TIME).dt.date()).alias("_t")
    )
    return per_day["_t"].to_numpy()


@dataclass
class ScoredBatch:
    """Scores, decisions and one explanation per accepted transaction."""

    # transaction_id, tx_time, customer_id, terminal_id, amount, score, threshold, decision,
    # input_hash
    scores: pl.DataFrame
    explanations: list[dict[str, Any]]
    # Per row, what a replay needs (see FraudScorer.decision_inputs); recorded in the ledger.
    inputs: list[dict[str, Any]] = field(default_factory=list)


class FraudScorer:
    """Score transactions against a FraudIndex."""

    def __init__(self, index: FraudIndex, config: ScoringConfig | None = None):
        self.index = index
        self.config = config or ScoringConfig()

    @property
    def prior(self) -> float:
        return self.config.prior if self.config.prior is not None else self.index.fraud_rate

    def features(self, batch: pl.DataFrame, history: pl.DataFrame | None = None) -> pl.DataFrame:
        """The batch's features with the index's stored context (plus ``history``) as windows."""
        context = self.index.context
        if history is not None:
            context = pl.concat([context, history.select(
                [c for c in context.columns if c in history.columns])], how="diagonal_relaxed")
            context = context.unique(schema.TRANSACTION_ID, keep="last", maintain_order=True)
        batch = batch.drop(schema.IS_FRAUD, schema.FRAUD_SCENARIO, strict=False)
        featured = compute_batch_features(batch, context,
                                          label_delay_days=self.index.config.label_delay_days)
        # Vectors with the amount ratios (--scorer knn-stacked) show them among the features.
        if set(AMOUNT_RATIO_FEATURES) & set(self.index.vectorizer.config.numeric_features):
            featured = with_derived_features(featured)
        return featured

    def score(self, batch: pl.DataFrame, history: pl.DataFrame | None = None) -> ScoredBatch:
        cfg = self.config
        featured = self.features(batch, history)
        vectors = self.index.vectorizer.transform(featured)
        times = featured[schema.TX_TIME].dt.epoch("us").to_numpy()
        ids = featured[schema.TRANSACTION_ID].to_numpy()
        distances, positions = self.index.neighbours(vectors, times, ids, cfg.k)
        sims = similarity(distances)
        labels = self.index.labels_at(positions)
        scores = knn_score(sims, labels, prior=self.prior, smoothing=cfg.smoothing)
        stacked = None
        if self.index.model is not None:  # an index built with --scorer knn-stacked
            stacked = self.index.model.predict(featured, self.index, self.index.meta)
            scores = stacked.scores
        frame = featured.select(
            schema.TRANSACTION_ID, schema.TX_TIME, schema.CUSTOMER_ID, schema.TERMINAL_ID,
            schema.AMOUNT,
        ).with_columns(pl.Series("score", scores, dtype=pl.Float64))
        thresholds = alert_thresholds(frame, cfg)
        frame = frame.with_columns(
            pl.Series("threshold", thresholds, dtype=pl.Float64),
            pl.Series("input_hash", row_hashes(featured)),
        ).with_columns(
            pl.when(pl.col("score") >= pl.col("threshold")).then(pl.lit("alert"))
            .otherwise(pl.lit("pass")).alias("decision")
        )
        explanations = self.explain(featured, sims, labels, positions)
        if stacked is not None:
            self.explain_stacked(explanations, stacked)
        inputs = self.decision_inputs(featured, vectors, frame["input_hash"].to_list())
        return ScoredBatch(frame, explanations, inputs)

    def decision_inputs(self, featured: pl.DataFrame, vectors: np.ndarray,
                        input_hashes: list[str]) -> list[dict[str, Any]]:
        """Per row: the scored fields, the features at full precision, the exact query vector,
        the row's place in this search call, and the scoring settings. FAISS's float32
        distances (and the text embeddings) depend on which rows are computed together, so a
        replay searches the recorded vectors of the same call together again."""
        cfg = self.config
        names = list(self.index.vectorizer.config.numeric_features)
        fields = canonical_rows(featured)
        values = featured.select(names).rows()
        call = hashlib.sha256("".join(input_hashes).encode()).hexdigest()[:16]
        settings = {"k": cfg.k, "smoothing": cfg.smoothing, "prior": self.prior,
                    "prior_source": "index" if cfg.prior is None else "config",
                    "threshold": cfg.threshold, "alerts_per_day": cfg.alerts_per_day,
                    "explain_neighbours": cfg.explain_neighbours,
                    "label_delay_days": self.index.config.label_delay_days}
        device = "gpu" if self.index.gpu else "cpu"
        little = np.ascontiguousarray(vectors, dtype="<f4")
        return [{
            "transaction": fields[i],
            "features": {n: _exact(v) for n, v in zip(names, values[i], strict=True)},
            "vector_f32": base64.b64encode(little[i].tobytes()).decode("ascii"),
            "search": {"call": call, "row": i, "rows": len(fields), "device": device},
            "scoring": settings,
        } for i in range(len(fields))]

    def explain_stacked(self, explanations: list[dict[str, Any]], stacked: Any) -> None:
        """Add the stacked model's part: its largest per-input contributions (log-odds), the
        neighbours from other cards and terminals behind its kNN inputs, the kNN score alone."""
        model, meta = self.index.model, self.index.meta
        ids, times = meta[schema.TRANSACTION_ID].to_list(), meta[schema.TX_TIME].to_list()
        found = stacked.neighbours
        sims = similarity(found.distances)
        n_exp = min(self.config.explain_neighbours, found.positions.shape[1])
        for row, explanation in enumerate(explanations):
            explanation["knn_score"] = round(float(
                (explanation["fraud_weight"] + explanation["smoothing"] * explanation["prior"])
                / (explanation["total_weight"] + explanation["smoothing"])), 6)
            explanation["method"] = "knn-stacked"
            explanation["model"] = model.explain(stacked, row)
            explanation["model"]["neighbours_other_cards_terminals"] = [
                {"transaction_id": ids[p], "similarity": round(float(sims[row, j]), 6),
                 "is_fraud": int(found.labels[row, j]), "tx_time": _iso(times[p])}
                for j in range(n_exp) if (p := int(found.positions[row, j])) >= 0]

    def explain(self, featured: pl.DataFrame, sims: np.ndarray, labels: np.ndarray,
                positions: np.ndarray) -> list[dict[str, Any]]:
        """Neighbours (id, similarity, label, time) and features against the card's usual values
        (its mean over the indexed history)."""
        meta = self.index.meta
        names = list(self.index.vectorizer.config.numeric_features)
        usual = (meta.group_by(schema.CUSTOMER_ID).agg(
            pl.len().alias("_n"), *[pl.col(c).mean() for c in names]))
        joined = featured.select(schema.CUSTOMER_ID).join(
            usual, on=schema.CUSTOMER_ID, how="left", maintain_order="left")
        values = _nums(featured.select(names).to_numpy())
        usual_values = _nums(joined.select(names).to_numpy())
        usual_n = joined["_n"].fill_null(0).to_numpy().tolist()
        n_exp = min(self.config.explain_neighbours, positions.shape[1])
        meta_ids = meta[schema.TRANSACTION_ID]
        meta_times = meta[schema.TX_TIME]
        prior, smoothing = self.prior, self.config.smoothing
        # Plain Python values up front: one conversion per array, not one per element. Each
        # neighbour's id and time are looked up once however many rows share it.
        shown = positions[:, :n_exp]
        used = np.unique(shown[shown >= 0])
        ids = dict(zip(used.tolist(), meta_ids.gather(used).to_list(), strict=True))
        times = dict(zip(used.tolist(), map(_iso, meta_times.gather(used).to_list()),
                         strict=True))
        shown_pos = shown.tolist()
        shown_sims = sims[:, :n_exp].tolist()
        shown_labels = labels[:, :n_exp].tolist()
        used_count = (positions >= 0).sum(axis=1).tolist()
        fraud_weight = (sims * (labels == 1)).sum(axis=1).tolist()
        total_weight = sims.sum(axis=1).tolist()
        k = int(positions.shape[1])
        out = []
        for row in range(len(featured)):
            neighbours = []
            for pos, sim, label in zip(shown_pos[row], shown_sims[row], shown_labels[row],
                                       strict=True):
                if pos < 0:
                    break
                neighbours.append({
                    "transaction_id": ids[pos],
                    "similarity": round(sim, 6),
                    "is_fraud": int(label),
                    "tx_time": times[pos],
                })
            card_known = usual_n[row] != 0
            features = {
                name: {"value": value, "card_usual": card if card_known else None}
                for name, value, card in zip(names, values[row], usual_values[row], strict=True)
            }
            out.append({
                "method": "knn-similarity-weighted",
                "k": k,
                "neighbours_used": used_count[row],
                "fraud_weight": round(fraud_weight[row], 6),
                "total_weight": round(total_weight[row], 6),
                "prior": round(prior, 8),
                "smoothing": smoothing,
                "neighbours": neighbours,
                "card_history_transactions": int(usual_n[row]),
                "features": features,
            })
        return out


def _exact(x: float | None) -> float | None:
    """The value at full precision (JSON round-trips floats exactly); non-finite as null."""
    return None if x is None or not math.isfinite(x) else float(x)


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def _nums(values: np.ndarray) -> list[list[float | None]]:
    """``_num`` of every element of a 2-D float array, as nested lists (NaN and inf: None)."""
    return [[round(x, 6) if math.isfinite(x) else None for x in row]
            for row in np.asarray(values, dtype=np.float64).tolist()]


def _iso(t: datetime) -> str:
    return t.isoformat()

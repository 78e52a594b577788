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
from collections.abc import Callable
from dataclasses import dataclass
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
    if not (np.isfinite(smoothing) and smoothing >= 0):
        raise ValueError(f"smoothing must be finite and >= 0, got {smoothing}")
    fraud = (similarities * (labels == 1)).sum(axis=1)
    total = similarities.sum(axis=1)
    denom = total + smoothing
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(denom > 0, (fraud + smoothing * prior) / denom, prior)
    return np.clip(score, 0.0, 1.0)


ISO_US = "%Y-%m-%dT%H:%M:%S%.6f"
HASH_ROWS = 100_000


def canonical_fields(frame: pl.DataFrame) -> list[pl.Expr]:
    """The frame's schema fields (sorted; times as ISO-8601 text with microseconds): what a
    row's input hash and its recorded inputs are made of."""
    return [pl.col(c).dt.to_string(ISO_US) if frame.schema[c] == pl.Datetime else pl.col(c)
            for c in sorted(c for c in frame.columns if c in schema.DTYPES)]


def canonical_rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Each row's schema fields as a dict (see :func:`canonical_fields`)."""
    return frame.select(canonical_fields(frame)).to_dicts()


def row_hashes(frame: pl.DataFrame) -> list[str]:
    """sha256 of each row's canonical JSON: what exactly was scored, for the ledger. A slice
    of rows at a time, so that a large frame never exists as dicts all at once."""
    out: list[str] = []
    for start in range(0, frame.height, HASH_ROWS):
        out.extend(hashlib.sha256(json.dumps(r, sort_keys=True, separators=(",", ":"),
                                             default=str).encode()).hexdigest()
                   for r in canonical_rows(frame.slice(start, HASH_ROWS)))
    return out


def batch_hash(hashes: list[str]) -> str:
    """Order-independent hash of a batch, so re-reading the same rows gives the same hash."""
    digest = hashlib.sha256()
    for h in sorted(hashes):
        digest.update(h.encode())
    return digest.hexdigest()


def alert_thresholds(scores: pl.DataFrame, config: ScoringConfig) -> np.ndarray:
    """Per-row threshold: fixed, or per day the score of the N-th highest transaction (an alert
    is score >= threshold, so scores tied with the N-th alert too: more than N on such days)."""
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


# progress(stage, rows done, rows in all): how long work reports how far it is.
Progress = Callable[[str, int, int], None]
SEARCH_ROWS = 100_000  # queries per FAISS search call: bounds the search's temporary arrays
TEXT_ROWS = 20_000  # rows whose explanation and inputs texts are made at a time


@dataclass
class Evidence:
    """Per scored row, what its explanation and replay inputs are made from: its fields and
    features, its query vector, the neighbours shown (the first ``explain_neighbours``), the
    weights over all k, and the search call it was in. Compact arrays rather than per-row
    dicts: the texts are made a slice at a time (:meth:`ScoredBatch.texts`), so a large batch
    never holds every row's explanation at once."""

    scorer: FraudScorer
    featured: pl.DataFrame
    vectors: np.ndarray        # (rows, dim) float32 query vectors
    distances: np.ndarray      # (rows, shown) float32, inf where no neighbour
    positions: np.ndarray      # (rows, shown) index positions, -1 where no neighbour
    labels: np.ndarray         # (rows, shown)
    used: np.ndarray           # (rows,) neighbours found out of k
    fraud_weight: np.ndarray   # (rows,) similarity of the fraud neighbours, over all k
    total_weight: np.ndarray   # (rows,) similarity of all neighbours
    call_starts: np.ndarray    # first row of each search call
    call_ids: list[str]
    stacked: Any = None        # the stacked model's prediction (a --scorer knn-stacked index)
    knn_scores: np.ndarray | None = None  # (rows,) the kNN score; set by score() with stacked

    def call_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.call_starts, rows, side="right") - 1


@dataclass
class ScoredBatch:
    """Scores and decisions per accepted transaction, and the evidence to explain each."""

    # transaction_id, tx_time, customer_id, terminal_id, amount, score, threshold, decision,
    # input_hash
    scores: pl.DataFrame
    evidence: Evidence | None = None
    # The evidence row of each row of ``scores`` (a day taken out of a batch); None: the same.
    rows: np.ndarray | None = None

    def take(self, mask: pl.Series) -> ScoredBatch:
        """The rows where ``mask`` is true, explained as they were in the whole batch."""
        keep = mask.arg_true().to_numpy()
        rows = keep if self.rows is None else self.rows[keep]
        return ScoredBatch(self.scores.filter(mask), self.evidence, rows)

    def texts(self, start: int = 0, stop: int | None = None) -> tuple[list[str], list[str]]:
        """The explanation and replay-inputs JSON texts of rows ``start:stop``, as the ledger
        records them."""
        stop = self.scores.height if stop is None else min(stop, self.scores.height)
        if self.evidence is None or stop <= start:
            return [], []
        rows = (np.arange(start, stop) if self.rows is None else self.rows[start:stop])
        scorer = self.evidence.scorer
        return (scorer.explanation_texts(self.evidence, rows),
                scorer.input_texts(self.evidence, rows))

    @property
    def explanations(self) -> list[dict[str, Any]]:
        """Every row's explanation as a dict (for small batches: a large one is read with
        :meth:`texts` a slice at a time)."""
        return [json.loads(t) for t in self.texts()[0]]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        """Every row's replay inputs as a dict (see :meth:`FraudScorer.input_texts`)."""
        return [json.loads(t) for t in self.texts()[1]]


class FraudScorer:
    """Score transactions against a FraudIndex."""

    def __init__(self, index: FraudIndex, config: ScoringConfig | None = None):
        self.index = index
        self.config = config or ScoringConfig()
        self._usual: pl.DataFrame | None = None
        self._neighbour_texts: tuple[pl.Series, pl.Series] | None = None

    @property
    def prior(self) -> float:
        return self.config.prior if self.config.prior is not None else self.index.fraud_rate

    def features(self, batch: pl.DataFrame, history: pl.DataFrame | None = None) -> pl.DataFrame:
        """The batch's features with the index's stored context (plus ``history``) as windows."""
        context = self.index.context
        batch = _naive_utc(batch)
        if history is not None:
            history = _naive_utc(history)
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

    def score(self, batch: pl.DataFrame, history: pl.DataFrame | None = None, *,
              progress: Progress | None = None) -> ScoredBatch:
        """Scores, alert decisions and input hashes of every row; the neighbours found are
        kept compactly as the rows' evidence. Queries are searched ``SEARCH_ROWS`` at a time:
        each such search call is recorded with its rows (see :meth:`input_texts`).
        ``progress(stage, done, total)`` is told of each search call."""
        cfg = self.config
        featured = self.features(batch, history)
        n = featured.height
        shown = min(cfg.explain_neighbours, cfg.k)
        times = featured[schema.TX_TIME].dt.epoch("us").to_numpy()
        ids = featured[schema.TRANSACTION_ID].to_numpy()
        hashes = row_hashes(featured)
        scores = np.empty(n, dtype=np.float64)
        knn_scores = np.empty(n, dtype=np.float64)
        vectors = np.empty((n, self.index.vectorizer.dimension), dtype=np.float32)
        distances = np.full((n, shown), np.inf, dtype=np.float32)
        positions = np.full((n, shown), -1, dtype=np.int64)
        labels = np.zeros((n, shown), dtype=np.int8)
        used = np.zeros(n, dtype=np.int32)
        fraud_weight, total_weight = np.zeros(n), np.zeros(n)
        starts = list(range(0, n, SEARCH_ROWS)) or [0]
        model = self.index.model  # an index built with --scorer knn-stacked
        predictions = []
        for start in starts:
            part = slice(start, min(start + SEARCH_ROWS, n))
            vectors[part] = self.index.vectorizer.transform(featured[part])
            d, pos = self.index.neighbours(vectors[part], times[part], ids[part], cfg.k)
            sims, labs = similarity(d), self.index.labels_at(pos)
            knn_scores[part] = knn_score(sims, labs, prior=self.prior, smoothing=cfg.smoothing)
            scores[part] = knn_scores[part]
            distances[part], positions[part] = d[:, :shown], pos[:, :shown]
            labels[part] = labs[:, :shown]
            used[part] = (pos >= 0).sum(axis=1)
            fraud_weight[part] = (sims * (labs == 1)).sum(axis=1)
            total_weight[part] = sims.sum(axis=1)
            if model is not None:  # its own neighbour search, a search call at a time too
                predictions.append(_shown_only(
                    model.predict(featured[part], self.index, self.index.meta), shown))
                scores[part] = predictions[-1].scores
            if progress is not None:
                progress("nearest neighbours", part.stop, n)
        stacked = _concat_predictions(predictions) if model is not None else None
        frame = featured.select(
            schema.TRANSACTION_ID, schema.TX_TIME, schema.CUSTOMER_ID, schema.TERMINAL_ID,
            schema.AMOUNT,
        ).with_columns(pl.Series("score", scores, dtype=pl.Float64))
        thresholds = alert_thresholds(frame, cfg)
        frame = frame.with_columns(
            pl.Series("threshold", thresholds, dtype=pl.Float64),
            pl.Series("input_hash", hashes, dtype=pl.String),
        ).with_columns(
            pl.when(pl.col("score") >= pl.col("threshold")).then(pl.lit("alert"))
            .otherwise(pl.lit("pass")).alias("decision")
        )
        call_ids = [hashlib.sha256("".join(hashes[s:s + SEARCH_ROWS]).encode())
                    .hexdigest()[:16] for s in starts]
        evidence = Evidence(
            scorer=self, featured=featured, vectors=vectors, distances=distances,
            positions=positions, labels=labels, used=used, fraud_weight=fraud_weight,
            total_weight=total_weight,
            call_starts=np.array(starts, dtype=np.int64), call_ids=call_ids, stacked=stacked,
            knn_scores=knn_scores)
        return ScoredBatch(frame, evidence)

    def card_usual(self) -> pl.DataFrame:
        """Per card of the indexed history: its transactions and its mean of each feature."""
        if self._usual is None:
            names = list(self.index.vectorizer.config.numeric_features)
            self._usual = self.index.meta.group_by(schema.CUSTOMER_ID).agg(
                pl.len().alias("_n"), *[pl.col(c).mean() for c in names])
        return self._usual

    def explanation_texts(self, evidence: Evidence, rows: np.ndarray) -> list[str]:
        """Each row's explanation as JSON (keys sorted): its neighbours (id, similarity,
        label, time) and its features against the card's usual values (its mean over the
        indexed history). Built as one polars expression over the rows, not dict by dict."""
        names = sorted(self.index.vectorizer.config.numeric_features)
        featured = evidence.featured[rows]
        joined = featured.select(schema.CUSTOMER_ID).join(
            self.card_usual(), on=schema.CUSTOMER_ID, how="left", maintain_order="left")
        known = joined["_n"].fill_null(0)
        columns: dict[str, Any] = {"_n": known}
        for c, name in enumerate(names):
            columns[f"_v{c}"] = featured[name].cast(pl.Float64)
            columns[f"_u{c}"] = joined[name].cast(pl.Float64)
        columns |= {"_used": evidence.used[rows].astype(np.int64),
                    "_fw": evidence.fraud_weight[rows], "_tw": evidence.total_weight[rows],
                    "_neighbours": self._neighbour_lists(evidence, rows)}
        features = pl.struct(**{name: pl.struct(
            card_usual=pl.when(pl.col("_n") > 0).then(_shown(pl.col(f"_u{c}"))),
            value=_shown(pl.col(f"_v{c}"))) for c, name in enumerate(names)})
        explanation = pl.struct(
            card_history_transactions=pl.col("_n").cast(pl.Int64),
            features=features,
            fraud_weight=pl.col("_fw").round(6),
            k=pl.lit(self.config.k, pl.Int64),
            method=pl.lit("knn-similarity-weighted"),
            neighbours=pl.col("_neighbours"),
            neighbours_used=pl.col("_used"),
            prior=pl.lit(round(self.prior, 8), pl.Float64),
            smoothing=pl.lit(float(self.config.smoothing), pl.Float64),
            total_weight=pl.col("_tw").round(6),
        )
        texts = pl.DataFrame(columns).select(explanation.struct.json_encode()).to_series()
        texts = texts.to_list()
        if evidence.stacked is not None:
            texts = [self.explain_stacked(text, evidence.stacked, int(row), float(knn))
                     for text, row, knn in zip(texts, rows, evidence.knn_scores[rows],
                                               strict=True)]
        return texts

    def _neighbour_lists(self, evidence: Evidence, rows: np.ndarray) -> pl.Series:
        """Each row's shown neighbours as a list of structs (id, similarity, label, time):
        made flat, one struct per (row, neighbour), then cut into rows of ``shown`` with the
        missing ones (no neighbour found) dropped."""
        positions = evidence.positions[rows]
        n, shown = positions.shape
        if shown == 0:
            return pl.Series([[]] * n, dtype=pl.List(pl.Null))
        flat = positions.ravel()
        safe = pl.Series(np.where(flat >= 0, flat, 0))
        ids, times = self.neighbour_texts()
        neighbour = pl.DataFrame({
            "_p": flat, "_l": evidence.labels[rows].ravel().astype(np.int64),
            "_s": similarity(evidence.distances[rows]).ravel(),
            "_i": ids.gather(safe), "_t": times.gather(safe),
        }).select(pl.when(pl.col("_p") >= 0).then(pl.struct(
            is_fraud=pl.col("_l"), similarity=pl.col("_s").round(6),
            transaction_id=pl.col("_i"), tx_time=pl.col("_t")))).to_series()
        return neighbour.reshape((n, shown)).arr.to_list().list.drop_nulls()

    def neighbour_texts(self) -> tuple[pl.Series, pl.Series]:
        """The indexed transactions' ids and times as explanations show them (ISO text),
        made once per scorer rather than once per neighbour shown."""
        if self._neighbour_texts is None:
            meta = self.index.meta
            self._neighbour_texts = (meta[schema.TRANSACTION_ID].cast(pl.String),
                                     meta.select(_iso_expr(pl.col(schema.TX_TIME))).to_series())
        return self._neighbour_texts

    def explain_stacked(self, text: str, stacked: Any, row: int, knn: float) -> str:
        """Add the stacked model's part to one explanation: its largest per-input
        contributions (log-odds), the neighbours from other cards and terminals behind its kNN
        inputs, and the kNN score alone (``knn``, rounded once: made again from the rounded
        weights it could be off by more than its last decimal)."""
        from pipeline.ledger import canonical_json

        meta = self.index.meta
        explanation = json.loads(text)
        explanation["knn_score"] = round(knn, 6)
        explanation["method"] = "knn-stacked"
        explanation["model"] = self.index.model.explain(stacked, row)
        found = stacked.neighbours
        sims = similarity(found.distances[row])
        shown = min(self.config.explain_neighbours, found.positions.shape[1])
        explanation["model"]["neighbours_other_cards_terminals"] = [
            {"transaction_id": meta[schema.TRANSACTION_ID][p],
             "similarity": round(float(sims[j]), 6), "is_fraud": int(found.labels[row, j]),
             "tx_time": _iso(meta[schema.TX_TIME][p])}
            for j in range(shown) if (p := int(found.positions[row, j])) >= 0]
        return canonical_json(explanation)

    def input_texts(self, evidence: Evidence, rows: np.ndarray) -> list[str]:
        """Each row's replay inputs as JSON: the scored fields, the features at full
        precision, the exact query vector, the row's place in its search call, the scoring
        settings, and (an index with a text part) the device and precision the text encoder
        ran in: fp16 vectors differ from fp32 ones by more than replay's fp32 tolerance.
        FAISS's float32 distances (and the text embeddings) depend on which
        rows are computed together, so a replay searches the recorded vectors of the same
        call together again."""
        from pipeline.ledger import canonical_json

        cfg = self.config
        names = sorted(self.index.vectorizer.config.numeric_features)
        featured = evidence.featured[rows]
        settings = canonical_json({
            "k": cfg.k, "smoothing": cfg.smoothing, "prior": self.prior,
            "prior_source": "index" if cfg.prior is None else "config",
            "threshold": cfg.threshold, "alerts_per_day": cfg.alerts_per_day,
            "explain_neighbours": cfg.explain_neighbours,
            "label_delay_days": self.index.config.label_delay_days})
        device = self.index.search_device
        vectorizer = self.index.vectorizer
        encoder = (canonical_json({"device": vectorizer.encoder.device,
                                   "precision": vectorizer.encoder.precision})
                   if vectorizer.use_text_ and vectorizer.encoder is not None else None)
        calls = evidence.call_of(rows)
        ends = np.append(evidence.call_starts[1:], evidence.featured.height)
        little = np.ascontiguousarray(evidence.vectors[rows], dtype="<f4")
        search = pl.DataFrame({
            "_call": [evidence.call_ids[c] for c in calls.tolist()],
            "_row": rows - evidence.call_starts[calls],
            "_rows": ends[calls] - evidence.call_starts[calls],
            "_vector": [base64.b64encode(v.tobytes()).decode("ascii") for v in little]})
        frame = featured.select(
            pl.struct([_finite(pl.col(c).cast(pl.Float64)).alias(c) for c in names])
            .struct.json_encode().alias("_features"),
            pl.struct(canonical_fields(featured)).struct.json_encode().alias("_transaction"),
        ).hstack(search)
        text = pl.concat_str(
            pl.lit(f'{{"encoder":{encoder},"features":' if encoder else '{"features":'),
            pl.col("_features"),
            pl.lit(f',"scoring":{settings},"search":{{"call":"'), pl.col("_call"),
            pl.lit(f'","calls":{len(evidence.call_ids)},"device":"{device}","row":'),
            pl.col("_row").cast(pl.String), pl.lit(',"rows":'), pl.col("_rows").cast(pl.String),
            pl.lit('},"transaction":'), pl.col("_transaction"),
            pl.lit(',"vector_f32":"'), pl.col("_vector"), pl.lit('"}'),
        )
        return frame.select(text).to_series().to_list()


def _shown_only(prediction: Any, shown: int) -> Any:
    """A stacked prediction keeping only the neighbours an explanation shows."""
    from pipeline.stacking import Neighbours, StackedPrediction

    found = prediction.neighbours
    return StackedPrediction(prediction.scores, prediction.contributions, prediction.inputs,
                             Neighbours(found.distances[:, :shown], found.positions[:, :shown],
                                        found.labels[:, :shown]))


def _concat_predictions(parts: list[Any]) -> Any:
    """The stacked predictions of a batch's search calls as one."""
    from pipeline.stacking import Neighbours, StackedPrediction

    return StackedPrediction(
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.contributions for p in parts]),
        np.concatenate([p.inputs for p in parts]),
        Neighbours(*(np.concatenate([getattr(p.neighbours, f) for p in parts])
                     for f in ("distances", "positions", "labels"))))


def _naive_utc(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with a zone-aware tx_time as naive UTC, as ingest stores it: the alert days,
    the recorded transaction time and the input hash are UTC's whatever zone a frame came in."""
    dtype = frame.schema.get(schema.TX_TIME)
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        return frame.with_columns(pl.col(schema.TX_TIME).dt.convert_time_zone("UTC")
                                  .dt.replace_time_zone(None).dt.cast_time_unit("us"))
    return frame


def _finite(x: pl.Expr) -> pl.Expr:
    """The value at full precision (JSON round-trips floats exactly); non-finite as null."""
    return pl.when(x.is_finite()).then(x)


def _shown(x: pl.Expr) -> pl.Expr:
    """A value for people: six decimals; non-finite as null."""
    return pl.when(x.is_finite()).then(x.round(6))


def _iso_expr(t: pl.Expr) -> pl.Expr:
    """``datetime.isoformat()`` of each time: microseconds only where there are some."""
    return (pl.when(t.dt.microsecond() == 0).then(t.dt.to_string("%Y-%m-%dT%H:%M:%S"))
            .otherwise(t.dt.to_string("%Y-%m-%dT%H:%M:%S%.6f")))


def _iso(t: datetime) -> str:
    return t.isoformat()

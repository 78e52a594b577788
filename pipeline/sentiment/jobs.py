"""Sentiment jobs as plain functions (what the CLI and the ``classify_news`` flow run):
classify a news file, record every classification in the ledger, update the per-ticker daily
table, train a model, evaluate one."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.ingest import IngestResult, write_quarantine
from pipeline.ledger import BatchReceipt, Decision, Ledger, canonical_json
from pipeline.news import BODY, HEADLINE, NEWS_ID, PUBLISHED_AT, SOURCE, TICKERS, read_news
from pipeline.news_store import ArticleSentiment, NewsStore
from pipeline.scoring import batch_hash
from pipeline.sentiment import LABEL_INDEX, LABELS, Classifier, Prediction
from pipeline.sentiment.articles import classify_articles
from pipeline.sentiment.data import LabelledTexts
from pipeline.sentiment.metrics import classification_report
from pipeline.tickers import TickerExtractor

KIND = "sentiment"
FAILED = "failed"


@dataclass
class ClassifiedNews:
    """One batch's results: a row per accepted article, and each one's full prediction."""

    results: pl.DataFrame
    predictions: list[Prediction]
    audit: dict[str, Any]
    inputs: list[dict[str, Any]] = field(default_factory=list)  # what each article said


@dataclass(frozen=True)
class SentimentReport:
    batch_id: str
    rows_in: int
    rows_classified: int
    rows_quarantined: int
    failures: int
    labels: dict[str, int]
    ledger_added: int
    ledger_already_present: int
    daily_rows: int
    output: str
    quarantine: str | None
    model_id: str
    seconds: float
    per_ticker: list[dict[str, Any]] = field(default_factory=list)


def article_hash(row: dict[str, Any]) -> str:
    """sha256 of what the classifier saw about an article (and its id and time)."""
    material = {k: row.get(k) for k in (NEWS_ID, SOURCE, HEADLINE, BODY)}
    material[PUBLISHED_AT] = str(row.get(PUBLISHED_AT))
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()


def classify_news(ingested: IngestResult, classifier: Classifier, *,
                  extractor: TickerExtractor | None = None, explain: bool = True
                  ) -> ClassifiedNews:
    """Label every accepted article; tickers are those given plus those found in the text."""
    extractor = extractor or TickerExtractor()
    frame = ingested.accepted
    rows = frame.to_dicts()
    results = classify_articles(classifier, frame[HEADLINE].to_list(), frame[BODY].to_list(),
                                explain=explain)
    predictions = [r.prediction for r in results]
    tickers = [extractor.extract_all(r[HEADLINE], r[BODY], given=r[TICKERS] or [])
               for r in rows]
    audit = classifier.audit_fields()
    out = pl.DataFrame({
        NEWS_ID: frame[NEWS_ID], PUBLISHED_AT: frame[PUBLISHED_AT], SOURCE: frame[SOURCE],
        HEADLINE: frame[HEADLINE],
        TICKERS: pl.Series(tickers, dtype=pl.List(pl.String)),
        "label": [p.label if p.failure is None else FAILED for p in predictions],
        "score": [p.score for p in predictions],
        "confidence": [p.confidence for p in predictions],
        **{f"p_{label}": [p.probabilities.get(label) for p in predictions] for label in LABELS},
        "units": [r.units for r in results],
        "failure": [p.failure for p in predictions],
        "model_id": [audit["model_id"]] * len(rows),
        "input_hash": [article_hash(r) for r in rows],
    }, schema_overrides={"label": pl.String, "score": pl.Float64, "confidence": pl.Float64,
                         **{f"p_{label}": pl.Float64 for label in LABELS}, "units": pl.Int32,
                         "failure": pl.String, "model_id": pl.String, "input_hash": pl.String})
    inputs = [{k: r[k] for k in (SOURCE, HEADLINE, BODY)} | {PUBLISHED_AT: str(r[PUBLISHED_AT]),
               "given_tickers": r[TICKERS] or []} for r in rows]
    return ClassifiedNews(out, predictions, audit, inputs)


def resolve_batch_id(input_path: str | Path, classified: ClassifiedNews,
                     batch_id: str | None, ingested: IngestResult | None = None) -> str:
    """The given batch id, else one from the input rows and the model: the same articles
    classified by the same model land on the same batch and add nothing. A file with no
    article classified is named by its quarantined rows too (given ``ingested``): by the
    classified rows alone every such file of one name would get the same id, and the second
    would conflict in the ledger."""
    if batch_id:
        return batch_id
    hashes = classified.results["input_hash"].to_list()
    if not hashes and ingested is not None and ingested.quarantined.height:
        hashes = ingested.quarantine_hashes()
    digest = batch_hash([*hashes, f"model:{classified.audit['model_id']}"])
    return f"{Path(input_path).stem}-{digest[:12]}"


def decisions_for(classified: ClassifiedNews, batch_id: str) -> list[Decision]:
    audit = classified.audit
    identity = {k: v for k, v in audit.items() if k not in ("index_version",)}
    decisions = []
    inputs = classified.inputs or [None] * len(classified.predictions)
    for row, pred, given in zip(classified.results.iter_rows(named=True),
                                classified.predictions, inputs, strict=True):
        explanation = {
            **identity,
            "probabilities": pred.probabilities,
            "signed_score": round(pred.score, 6),
            "tickers": row[TICKERS],
            "units": row["units"],
            **pred.explanation,
        }
        if pred.failure is not None:
            explanation["failure"] = pred.failure
        decisions.append(Decision(
            batch_id=batch_id, kind=KIND, subject_id=row[NEWS_ID],
            score=pred.confidence if pred.failure is None else 0.0, threshold=0.0,
            decision=pred.label if pred.failure is None else FAILED,
            model_version=audit["model_id"], index_version=audit.get("index_version") or "-",
            input_hash=row["input_hash"], explanation=explanation, inputs=given,
            subject_time=row.get(PUBLISHED_AT)))
    return decisions


def record(ledger: Ledger, ingested: IngestResult, classified: ClassifiedNews,
           batch_id: str) -> BatchReceipt:
    """Every classification (failures included) and every quarantined row, in one
    transaction."""
    input_hash = batch_hash(classified.results["input_hash"].to_list()
                            + ingested.quarantine_hashes())
    return ledger.record_batch(batch_id, KIND, input_hash, ingested.rows_in,
                               decisions_for(classified, batch_id),
                               ingested.ledger_rows())


def article_rows(classified: ClassifiedNews, batch_id: str) -> list[ArticleSentiment]:
    """One row per (article, ticker) for the daily table; failed articles are left out."""
    out = []
    for row in classified.results.iter_rows(named=True):
        if row["label"] == FAILED:
            continue
        for ticker in row[TICKERS]:
            out.append(ArticleSentiment(row[NEWS_ID], ticker, row[PUBLISHED_AT], row["label"],
                                        row["score"], row["model_id"], batch_id))
    return out


def classified_ids(classified: ClassifiedNews) -> list[str]:
    """The news ids given a label in this run (failed ones keep what the store had)."""
    return [row[NEWS_ID] for row in classified.results.iter_rows(named=True)
            if row["label"] != FAILED]


def write_results(classified: ClassifiedNews, ingested: IngestResult, batch_id: str,
                  output: str | Path) -> tuple[Path, Path | None]:
    from pipeline.jobs import quarantine_path, write_frame

    frame = classified.results.with_columns(pl.lit(batch_id).alias("batch_id"))
    if Path(output).suffix.lower() == ".csv":
        frame = frame.with_columns(pl.col(TICKERS).list.join(","))
    out = write_frame(frame, output)
    qpath = write_quarantine(ingested, quarantine_path(out)) if ingested.quarantined.height \
        else None
    return out, qpath


def classify_file(input_path: str | Path, classifier: Classifier, output: str | Path, *,
                  ledger: Ledger, store: NewsStore | None = None, batch_id: str | None = None,
                  extractor: TickerExtractor | None = None) -> SentimentReport:
    started = time.perf_counter()
    ingested = read_news(input_path)
    classified = classify_news(ingested, classifier, extractor=extractor)
    batch_id = resolve_batch_id(input_path, classified, batch_id, ingested)
    out, qpath = write_results(classified, ingested, batch_id, output)
    receipt = record(ledger, ingested, classified, batch_id)
    daily = (store.record(article_rows(classified, batch_id), classified_ids(classified))
             if store is not None else 0)
    return report_for(batch_id, ingested, classified, receipt, daily, out, qpath,
                      time.perf_counter() - started)


def report_for(batch_id: str, ingested: IngestResult, classified: ClassifiedNews,
               receipt: BatchReceipt, daily_rows: int, out: Path, qpath: Path | None,
               seconds: float) -> SentimentReport:
    results = classified.results
    counts = {label: int((results["label"] == label).sum()) for label in (*LABELS, FAILED)}
    per_ticker = (results.filter(pl.col("label") != FAILED).explode(TICKERS)
                  .drop_nulls(TICKERS).group_by(TICKERS)
                  .agg(pl.len().alias("articles"), pl.col("score").mean().round(4)
                       .alias("mean_score"))
                  .sort(["articles", TICKERS], descending=[True, False]).head(10))
    return SentimentReport(
        batch_id=batch_id, rows_in=ingested.rows_in, rows_classified=results.height,
        rows_quarantined=ingested.quarantined.height, failures=counts.pop(FAILED),
        labels=counts, ledger_added=receipt.added,
        ledger_already_present=receipt.already_present, daily_rows=daily_rows,
        output=str(out), quarantine=str(qpath) if qpath else None,
        model_id=classified.audit["model_id"], seconds=round(seconds, 2),
        per_ticker=per_ticker.rename({TICKERS: "ticker"}).to_dicts())


def evaluate(classifier: Classifier, data: LabelledTexts, *, batch_size: int = 256
             ) -> dict[str, Any]:
    """Accuracy, macro/weighted F1 and the confusion matrix of ``classifier`` on ``data``.
    A text the backend failed on counts as wrong (reported separately as ``failures``)."""
    started = time.perf_counter()
    predicted = np.empty(len(data), dtype=np.int64)
    failures = 0
    for start in range(0, len(data), batch_size):
        chunk = classifier.classify(data.texts[start:start + batch_size], explain=False)
        for i, pred in enumerate(chunk, start=start):
            if pred.failure is not None or pred.label is None:
                failures += 1
                predicted[i] = (data.labels[i] + 1) % len(LABELS)  # wrong, whatever it was
            else:
                predicted[i] = LABEL_INDEX[pred.label]
    seconds = time.perf_counter() - started
    report = classification_report(data.labels, predicted)
    return {**report, "failures": failures, "data": {"source": data.source,
                                                    "sha256": data.sha256, "rows": len(data)},
            "model": classifier.audit_fields(), "seconds": round(seconds, 2),
            "texts_per_second": round(len(data) / seconds, 1) if seconds else None}


def write_json(value: Any, path: str | Path) -> Path:
    from pipeline.artifacts import atomic_write_bytes

    return atomic_write_bytes(path, (json.dumps(value, indent=2, default=str) + "\n").encode())

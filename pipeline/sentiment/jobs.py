"""Sentiment jobs as plain functions (what the CLI and the ``classify_news`` flow run):
classify a news file, record every classification in the ledger, update the per-ticker daily
table, train a model, evaluate one."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.ingest import IngestResult, write_quarantine
from pipeline.ledger import BatchReceipt, Decision, Ledger, canonical_json
from pipeline.news import BODY, HEADLINE, NEWS_ID, PUBLISHED_AT, SOURCE, TICKERS, read_news
from pipeline.news_store import ArticleSentiment, NewsStore
from pipeline.reconcile import Reconciliation, compare, recorded_decisions
from pipeline.reconcile import warning as reconcile_warning
from pipeline.scoring import batch_hash
from pipeline.sentiment import LABEL_INDEX, LABELS, Classifier, Prediction, signed_score
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
    # When the batch was already in the ledger (see pipeline.reconcile): this run's
    # classifications that differ from the recorded ones (label, confidence), those with
    # another label, and the model the recorded ones name (None: this run recorded the
    # batch). The output file, the daily table and the counts above are the recorded ones.
    ledger_differing: int = 0
    ledger_differing_labels: int = 0
    ledger_model_version: str | None = None


def article_hash(row: dict[str, Any]) -> str:
    """sha256 of what the classifier saw about an article (and its id and time)."""
    material = {k: row.get(k) for k in (NEWS_ID, SOURCE, HEADLINE, BODY)}
    material[PUBLISHED_AT] = str(row.get(PUBLISHED_AT))
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()


# Articles per classify call: an encoder/hf call batches its texts by length over the whole
# call, so a file of up to this many articles is labelled exactly as in one call; an LLM labels
# each article on its own, so small chunks cost nothing and report progress often.
CHUNK_ARTICLES = {"llm": 32}
DEFAULT_CHUNK_ARTICLES = 4096


def classify_news(ingested: IngestResult, classifier: Classifier, *,
                  extractor: TickerExtractor | None = None, explain: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> ClassifiedNews:
    """Label every accepted article; tickers are those given plus those found in the text.
    ``progress(done, total)`` is told after each chunk of articles."""
    extractor = extractor or TickerExtractor()
    frame = ingested.accepted
    rows = frame.to_dicts()
    headlines, bodies = frame[HEADLINE].to_list(), frame[BODY].to_list()
    size = CHUNK_ARTICLES.get(getattr(classifier, "backend", ""), DEFAULT_CHUNK_ARTICLES)
    results: list = []
    for start in range(0, len(rows), size):
        results += classify_articles(classifier, headlines[start:start + size],
                                     bodies[start:start + size], explain=explain)
        if progress is not None:
            progress(len(results), len(rows))
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


def reconcile(ledger: Ledger, classified: ClassifiedNews, batch_id: str
              ) -> tuple[ClassifiedNews, Reconciliation]:
    """For a batch the ledger already holds: how this run's classifications differ from the
    recorded ones, and this run's results with each article's recorded label, confidence,
    probabilities, signed score, tickers and model (what the output file and the daily table
    then get). News batches are small: the recorded explanations are read whole."""
    recorded = recorded_decisions(ledger, batch_id, KIND, explanation=True)
    results = classified.results
    fresh = results.select(
        pl.col(NEWS_ID).alias("subject_id"), pl.col("label").alias("decision"),
        pl.col("confidence").alias("score"), pl.lit(0.0).alias("threshold"))
    check = compare(fresh, recorded, version_column="model_version",
                    run_version=classified.audit["model_id"])
    by_id = {row["subject_id"]: row for row in recorded.iter_rows(named=True)}
    columns: dict[str, list[Any]] = {name: [] for name in (
        "label", "score", "confidence", *(f"p_{label}" for label in LABELS), "units",
        "failure", "model_id", TICKERS)}
    for row in results.iter_rows(named=True):
        held = by_id.get(row[NEWS_ID])
        if held is None:  # not recorded (cannot happen for one input hash): left as it is
            for name in columns:
                columns[name].append(row[name])
            continue
        explanation = json.loads(held["explanation"])
        probabilities = explanation.get("probabilities") or {}
        columns["label"].append(held["decision"])
        columns["score"].append(signed_score(probabilities))
        columns["confidence"].append(held["score"])  # a failure's is 0.0, as recorded
        for label in LABELS:
            columns[f"p_{label}"].append(probabilities.get(label))
        columns["units"].append(explanation.get("units", row["units"]))
        columns["failure"].append(explanation.get("failure"))
        columns["model_id"].append(held["model_version"])
        columns[TICKERS].append(explanation.get("tickers", row[TICKERS]))
    as_recorded = results.with_columns(
        pl.Series(name, values, dtype=results.schema[name]) for name, values in columns.items())
    return ClassifiedNews(as_recorded, classified.predictions, classified.audit,
                          classified.inputs), check


def ledger_warning(report: SentimentReport, retry: str = "`--batch-id NEW`") -> str | None:
    """What to tell the user when the ledger already held the batch with other labels (or
    from another model), else None."""
    if report.ledger_model_version is None:
        return None
    check = Reconciliation(report.rows_classified, report.ledger_differing,
                           report.ledger_differing_labels,
                           tuple(report.ledger_model_version.split(", ")), report.model_id)
    if not check.disagrees:
        return None
    return reconcile_warning(what="classifications", batch=f"batch {report.batch_id}",
                             check=check, total=report.rows_classified, output=report.output,
                             label_words="with another label", version_word="model",
                             retry=retry)


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
                  extractor: TickerExtractor | None = None,
                  progress: Callable[[int, int], None] | None = None) -> SentimentReport:
    """Classify a news file and record it as one ledger batch; ``progress(done, total)``
    counts the articles classified."""
    started = time.perf_counter()
    ingested = read_news(input_path)
    classified = classify_news(ingested, classifier, extractor=extractor, progress=progress)
    batch_id = resolve_batch_id(input_path, classified, batch_id, ingested)
    receipt, classified, check = record_and_reconcile(ledger, ingested, classified, batch_id)
    out, qpath = write_results(classified, ingested, batch_id, output)
    # ledger_batch on a first run too: a later batch recorded meanwhile (another process)
    # keeps its rows even when that process updated the table first.
    daily = (store.record(article_rows(classified, batch_id), classified_ids(classified),
                          ledger_batch=batch_id)
             if store is not None else 0)
    return report_for(batch_id, ingested, classified, receipt, daily, out, qpath,
                      time.perf_counter() - started, check)


def record_and_reconcile(ledger: Ledger, ingested: IngestResult, classified: ClassifiedNews,
                         batch_id: str
                         ) -> tuple[BatchReceipt, ClassifiedNews, Reconciliation | None]:
    """:func:`record` the batch; for one the ledger already held, the results as recorded
    and how this run's differ (see :func:`reconcile`); else this run's and None."""
    receipt = record(ledger, ingested, classified, batch_id)
    if not receipt.already_present:
        return receipt, classified, None
    as_recorded, check = reconcile(ledger, classified, batch_id)
    return receipt, as_recorded, check


def report_for(batch_id: str, ingested: IngestResult, classified: ClassifiedNews,
               receipt: BatchReceipt, daily_rows: int, out: Path, qpath: Path | None,
               seconds: float, check: Reconciliation | None = None) -> SentimentReport:
    """The job's report; ``classified`` as recorded (what the output file holds)."""
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
        per_ticker=per_ticker.rename({TICKERS: "ticker"}).to_dicts(),
        ledger_differing=check.differing if check else 0,
        ledger_differing_labels=check.labels_differing if check else 0,
        ledger_model_version=(check.recorded_version or None) if check else None)


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
                                                    "sha256": data.sha256, "rows": len(data),
                                                    "label_map": data.label_map},
            "model": classifier.audit_fields(), "seconds": round(seconds, 2),
            "texts_per_second": round(len(data) / seconds, 1) if seconds else None}


def write_json(value: Any, path: str | Path) -> Path:
    from pipeline.artifacts import atomic_write_bytes

    return atomic_write_bytes(path, (json.dumps(value, indent=2, default=str) + "\n").encode())

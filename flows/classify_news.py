"""Prefect flow: classify a news file, record every classification in the ledger, and update
the per-ticker daily sentiment table. Scheduled by serving it:
``python -m flows.classify_news --input news.jsonl --model NAME --cron "*/15 * * * *"``."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote
from pydantic import SecretStr

from flows.score_transactions import readable_retry, transient_db_error
from pipeline.inbox import drain, output_for, pending, settle_interval
from pipeline.ingest import IngestResult, InputError
from pipeline.ledger import BatchReceipt, Ledger
from pipeline.news import read_news
from pipeline.news_store import NewsStore
from pipeline.privacy import flow_db_url
from pipeline.reconcile import Reconciliation
from pipeline.sentiment.backends import load_classifier
from pipeline.sentiment.jobs import (
    ClassifiedNews,
    SentimentReport,
    article_rows,
    classified_ids,
    ledger_warning,
    record_and_reconcile,
    report_for,
    resolve_batch_id,
    write_results,
)
from pipeline.sentiment.jobs import (
    classify_news as classify_batch,
)
from pipeline.settings import SENTIMENT_MODEL_ENV, JobSettings
from pipeline.tickers import TickerExtractor


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=readable_retry, cache_policy=NO_CACHE)
def ingest_news(path: str) -> IngestResult:
    return read_news(path)


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def load_model(backend: str, model: str, root: str | None, endpoint: str | None):
    return load_classifier(backend, model, root=root, endpoint=endpoint)


@task(cache_policy=NO_CACHE)
def classify(ingested: IngestResult, classifier, companies: str | None) -> ClassifiedNews:
    return classify_batch(ingested, classifier, extractor=TickerExtractor.from_file(companies))


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def write_outputs(classified: ClassifiedNews, ingested: IngestResult, batch_id: str,
                  output: str) -> tuple[Path, Path | None]:
    return write_results(classified, ingested, batch_id, output)


@task(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=transient_db_error,
      cache_policy=NO_CACHE)
def record_decisions(db: str | None, ingested: IngestResult, classified: ClassifiedNews,
                     batch_id: str
                     ) -> tuple[BatchReceipt, ClassifiedNews, Reconciliation | None]:
    """The batch into the ledger; a batch it already held comes back as recorded (the
    output file and the daily table get those labels; see pipeline.reconcile)."""
    with Ledger(db) as ledger:
        return record_and_reconcile(ledger, ingested, classified, batch_id)


@task(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=transient_db_error,
      cache_policy=NO_CACHE)
def update_daily(db: str | None, classified: ClassifiedNews, batch_id: str) -> int:
    """The batch's articles into the per-ticker daily table, as recorded in the ledger as
    ``batch_id``: articles a later ledger batch has classified since (a re-run of an older
    batch, or another run that recorded a later batch meanwhile) keep their later rows."""
    with NewsStore(db) as store:
        return store.record(article_rows(classified, batch_id), classified_ids(classified),
                            ledger_batch=batch_id)


@flow(name="classify_news", log_prints=True)
def classify_news(input: str, model: str, output: str, backend: str = "encoder",
                  endpoint: str | None = None, batch_id: str | None = None,
                  db: str | SecretStr | None = None, root: str | None = None,
                  companies: str | None = None) -> SentimentReport:
    """Classify ``input`` with ``model``; decisions go to the ledger at ``db`` (default
    ``$FINSENTINEL_DB`` or the local SQLite ledger). Re-running a batch adds nothing. A ``db``
    with a password must be a ``SecretStr`` (Prefect masks it) or come from the environment."""
    import time

    db = flow_db_url(db)

    started = time.perf_counter()
    ingested = ingest_news(input)
    classifier = load_model(backend, model, root, endpoint)
    classified = classify(quote(ingested), quote(classifier), companies)
    batch_id = resolve_batch_id(input, classified, batch_id, ingested)
    # The ledger first: a batch it already held keeps its recorded labels, and the output
    # file and the daily table get those, not this run's (pipeline.reconcile).
    receipt, classified, check = record_decisions(db, quote(ingested), quote(classified),
                                                  batch_id)
    out, qpath = write_outputs(quote(classified), quote(ingested), batch_id, output)
    daily = update_daily(db, quote(classified), batch_id)
    report = report_for(batch_id, ingested, classified, receipt, daily, out, qpath,
                        time.perf_counter() - started, check)
    create_table_artifact(
        key="news-sentiment-batch",
        table=[{"batch_id": batch_id, "rows_in": report.rows_in,
                "classified": report.rows_classified, "quarantined": report.rows_quarantined,
                "failures": report.failures, **report.labels,
                "ledger_added": report.ledger_added, "ticker_days": report.daily_rows}],
        description=f"News batch {batch_id} with {report.model_id}")
    if report.per_ticker:
        create_table_artifact(key="news-sentiment-tickers", table=report.per_ticker,
                              description=f"Tickers in batch {batch_id}")
    print(f"batch {batch_id}: {report.rows_classified} classified {report.labels}, "
          f"{report.rows_quarantined} quarantined, {report.failures} failures, "
          f"{report.ledger_added} new ledger records, {daily} ticker-days updated")
    warning = ledger_warning(report, retry="the flow's batch_id parameter")
    if warning:
        get_run_logger().warning(warning)
    return report


@flow(name="classify_inbox", log_prints=True)
def classify_inbox(inbox: str | None = None, model: str | None = None,
                   output_dir: str | None = None, backend: str = "encoder",
                   endpoint: str | None = None, db: str | SecretStr | None = None,
                   root: str | None = None, companies: str | None = None,
                   settle_seconds: float | None = None) -> list[SentimentReport]:
    """The 15-minute job: classify every news file waiting in the inbox (default
    ``$FINSENTINEL_NEWS_INBOX``) with ``model`` (default ``$FINSENTINEL_SENTIMENT_MODEL``),
    results to ``output_dir`` (default ``$FINSENTINEL_WORKDIR/news``), then move the file to
    ``inbox/done`` (``inbox/failed`` with the reason when the file is unusable). A file modified
    less than ``settle_seconds`` ago (default ``$FINSENTINEL_INBOX_SETTLE_SECONDS``, else 60;
    0: no wait) may still be being copied in: it is left for a later run."""
    settings = JobSettings.from_env()
    flow_db_url(db)  # a plain-text password is refused here, before any file is tried
    settle = settle_interval(settle_seconds)  # a bad setting too
    model = model or settings.sentiment_model
    if not model:
        raise ValueError(f"no sentiment model: pass model or set ${SENTIMENT_MODEL_ENV}")
    inbox_dir = Path(inbox or settings.news_inbox)
    out_dir = Path(output_dir or settings.news_results)
    out_dir.mkdir(parents=True, exist_ok=True)
    return drain(
        pending(inbox_dir, settle_seconds=settle),
        lambda path: classify_news(
            str(path), model, str(output_for(path, out_dir, ".sentiment.parquet")),
            # db as given: a SecretStr stays one, masked in the subflow's parameters too.
            backend=backend, endpoint=endpoint, db=db, root=root, companies=companies,
            return_state=True),
        what="news", inbox=inbox_dir, unusable=InputError, settle_seconds=settle)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the classify_news flow on a schedule.")
    parser.add_argument("--input", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--backend", default="encoder")
    parser.add_argument("--endpoint")
    parser.add_argument("--db", help="ledger URL without a password (else FINSENTINEL_DB)")
    parser.add_argument("--root", help="models folder (default FINSENTINEL_MODELS, ./models)")
    parser.add_argument("--companies", help="JSON map of company names to tickers, added to the "
                        "built-in one")
    parser.add_argument("--cron", default="*/15 * * * *")
    args = parser.parse_args()
    classify_news.serve(name="classify-news", cron=args.cron, parameters={
        "input": args.input, "model": args.model, "output": args.output,
        "backend": args.backend, "endpoint": args.endpoint, "db": args.db, "root": args.root,
        "companies": args.companies})


if __name__ == "__main__":
    main()

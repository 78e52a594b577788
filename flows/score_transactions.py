"""Prefect flow: score a batch of transactions against an index and record every decision."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from prefect.utilities.annotations import quote
from pydantic import SecretStr

from pipeline import jobs
from pipeline.inbox import drain, output_for, pending, settle_interval
from pipeline.index import FraudIndex
from pipeline.ingest import IngestResult, InputError, read_transactions
from pipeline.ledger import Ledger, is_transient
from pipeline.privacy import flow_db_url, pseudonymise_records
from pipeline.scoring import FraudScorer, ScoredBatch, ScoringConfig
from pipeline.settings import JobSettings


def readable_retry(_task: object, _run: object, state: State) -> bool:
    """Retry a read only for what another attempt can fix (an I/O error on shared storage); an
    unusable file (InputError: empty, not a table, columns missing) fails the same way every
    time, so it fails at once and the inbox moves it to ``failed/``."""
    return not isinstance(state.result(raise_on_failure=False), InputError)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=readable_retry, cache_policy=NO_CACHE)
def ingest_batch(path: str) -> IngestResult:
    return read_transactions(path)


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def load_index(name: str, root: str | None) -> FraudIndex:
    return FraudIndex.load(name, root)


@task(cache_policy=NO_CACHE)
def score(ingested: IngestResult, index: FraudIndex, config: ScoringConfig) -> ScoredBatch:
    return FraudScorer(index, config).score(ingested.accepted)


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def write_outputs(scored: ScoredBatch, ingested: IngestResult, batch_id: str, output: str
                  ) -> tuple[Path, Path | None]:
    return jobs.write_outputs(scored, ingested, batch_id, output)


def transient_db_error(_task: object, _run: object, state: State) -> bool:
    """Retry the ledger write only for what another attempt can fix (locks, serialization
    failures, dropped connections); a conflicting batch or a bad record fails at once."""
    return is_transient(state.result(raise_on_failure=False))


@task(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=transient_db_error,
      cache_policy=NO_CACHE)
def record_decisions(db: str | None, ingested: IngestResult, scored: ScoredBatch,
                     index: FraudIndex, batch_id: str) -> jobs.Recorded:
    """The batch into the ledger; a batch it already held comes back as recorded (the
    output file gets those decisions; see pipeline.reconcile)."""
    with Ledger(db) as ledger:
        return jobs.record_and_reconcile(ledger, ingested, scored, index, batch_id)


@flow(name="score_transactions", log_prints=True)
def score_transactions(input: str, index: str, output: str, batch_id: str | None = None,
                       db: str | SecretStr | None = None, root: str | None = None,
                       threshold: float = 0.5, alerts_per_day: int | None = None,
                       k: int = 20) -> jobs.ScoreReport:
    """Score ``input`` against index ``index``; decisions go to the ledger at ``db``
    (default ``$FINSENTINEL_DB`` or the local SQLite ledger). Re-running a batch adds nothing.
    A ``db`` with a password must be a ``SecretStr`` (Prefect masks it) or come from the env."""
    db = flow_db_url(db)
    config = ScoringConfig(k=k, threshold=threshold, alerts_per_day=alerts_per_day)
    ingested = ingest_batch(input)
    fraud_index = load_index(index, root)
    # quote(): large results pass through as they are; Prefect need not walk them for futures.
    scored = score(quote(ingested), quote(fraud_index), config)
    batch_id = jobs.resolve_batch_id(input, scored, batch_id, ingested)
    # The ledger first, then the output: a batch it already held keeps its recorded decisions,
    # and the output file gets those, not this run's (pipeline.reconcile).
    recorded = record_decisions(db, quote(ingested), quote(scored), quote(fraud_index),
                                batch_id)
    out, qpath = write_outputs(quote(recorded.scored), quote(ingested), batch_id, output)
    report = jobs.report_for(batch_id, ingested, recorded.scored, recorded.receipt, out, qpath,
                             fraud_index, recorded.check)
    create_table_artifact(
        key="fraud-batch-counts",
        table=[{"batch_id": batch_id, "rows_in": report.rows_in, "scored": report.rows_scored,
                "quarantined": report.rows_quarantined, "alerts": report.alerts,
                "ledger_added": report.ledger_added,
                "ledger_differing": report.ledger_differing}],
        description=f"Batch {batch_id} against {report.index_version}",
    )
    if report.top_alerts:
        # Artifacts are logs: customer and transaction ids appear only as keyed pseudonyms.
        shown = pseudonymise_records(report.top_alerts, ("transaction_id", "customer_id"))
        create_table_artifact(key="fraud-top-alerts", table=shown,
                              description=f"Top alerts of batch {batch_id}")
    print(f"batch {batch_id}: {report.rows_scored} scored, {report.rows_quarantined} "
          f"quarantined, {report.alerts} alerts, {report.ledger_added} new ledger records")
    warning = jobs.ledger_warning(report, retry="the flow's batch_id parameter")
    if warning:
        get_run_logger().warning(warning)
    return report


@flow(name="score_inbox", log_prints=True)
def score_inbox(inbox: str | None = None, index: str | None = None,
                output_dir: str | None = None, db: str | SecretStr | None = None,
                root: str | None = None, threshold: float = 0.5,
                alerts_per_day: int | None = None, k: int = 20,
                settle_seconds: float | None = None) -> list[jobs.ScoreReport]:
    """The hourly job: score every file waiting in the inbox (default ``$FINSENTINEL_INBOX``)
    against index ``index`` (default ``$FINSENTINEL_INDEX_NAME``), scores to ``output_dir``
    (default ``$FINSENTINEL_WORKDIR/scores``), then move the file to ``inbox/done``. A file that
    is unusable goes to ``inbox/failed`` with the reason; any other failure leaves it in the
    inbox for the next run. The run fails if any file did, after trying all of them. A file
    modified less than ``settle_seconds`` ago (default ``$FINSENTINEL_INBOX_SETTLE_SECONDS``,
    else 60; 0: no wait) may still be being copied in: it is left for a later run."""
    flow_db_url(db)  # a plain-text password is refused here, before any file is tried
    settle = settle_interval(settle_seconds)  # a bad setting too
    settings = JobSettings.from_env()
    inbox_dir = Path(inbox or settings.inbox)
    out_dir = Path(output_dir or settings.scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    return drain(
        pending(inbox_dir, settle_seconds=settle),
        lambda path: score_transactions(
            str(path), index or settings.index_name,
            str(output_for(path, out_dir, ".scores.parquet")), db=db, root=root,
            threshold=threshold, alerts_per_day=alerts_per_day, k=k, return_state=True),
        what="transactions", inbox=inbox_dir, unusable=InputError, settle_seconds=settle)

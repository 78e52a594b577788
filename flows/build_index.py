"""Prefect flow: read labelled history, compute features, build and save the FAISS index."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote
from pydantic import SecretStr

from flows.score_transactions import readable_retry
from pipeline import jobs
from pipeline.audit import FeedbackLabels, feedback_labels
from pipeline.encoder import TextEncoder
from pipeline.index import IndexConfig
from pipeline.ingest import IngestResult, read_transactions
from pipeline.ledger import DEFAULT_DB_ENV, Ledger, missing_sqlite_ledger
from pipeline.privacy import flow_db_url
from pipeline.settings import JobSettings
from pipeline.vectors import VectorConfig


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=readable_retry, cache_policy=NO_CACHE)
def ingest_history(path: str) -> IngestResult:
    return read_transactions(path, require_labels=True)


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def read_feedback(db: str | None) -> FeedbackLabels:
    with Ledger(db) as ledger:
        return feedback_labels(ledger)


@task(cache_policy=NO_CACHE)
def build_and_save(ingested: IngestResult, name: str, root: str | None, encoder_ref: str | None,
                   until: datetime | None, text_dim: int, kind: str,
                   feedback: FeedbackLabels | None = None, scorer: str = "knn"
                   ) -> jobs.BuildReport:
    encoder = TextEncoder(encoder_ref) if text_dim > 0 else None
    return jobs.build_index(ingested, name, root=root, encoder=encoder, until=until,
                            vector_config=VectorConfig(text_dim=text_dim),
                            config=IndexConfig(kind=kind), feedback=feedback, scorer=scorer)


@flow(name="build_index", log_prints=True)
def build_index(input: str | None = None, name: str | None = None, root: str | None = None,
                encoder: str | None = None, until: datetime | None = None, text_dim: int = 8,
                kind: str = "auto", db: str | SecretStr | None = None, scorer: str = "knn"
                ) -> jobs.BuildReport:
    """Index labelled history under ``root/name`` (default ``indexes/``). With a ledger (``db``,
    ``$FINSENTINEL_DB``, or the default ledger in ``$FINSENTINEL_WORKDIR`` when it exists),
    analysts' fraud reviews relabel the history they cover.
    ``scorer="knn-stacked"`` stores the stacked model with the index (pipeline.stacking).
    Scheduled runs leave ``input`` and ``name`` out: ``$FINSENTINEL_HISTORY`` and
    ``$FINSENTINEL_INDEX_NAME`` (pipeline.settings) give them."""
    db = flow_db_url(db)
    settings = JobSettings.from_env()
    input = input or str(settings.history)
    name = name or settings.index_name
    ingested = ingest_history(str(Path(input)))
    # Without a configured database: the default ledger, only when it exists (not created).
    reviews = db or os.environ.get(DEFAULT_DB_ENV) or missing_sqlite_ledger() is None
    feedback = read_feedback(db) if reviews else None
    report = build_and_save(quote(ingested), name, root, encoder, until, text_dim, kind,
                            quote(feedback), scorer)
    create_table_artifact(
        key="index-build",
        table=[{"index": f"{report.name}@{report.version}", "rows_in": report.rows_in,
                "quarantined": report.rows_quarantined, "vectors": report.vectors,
                "frauds": report.frauds, "faiss": report.faiss_index,
                "label_cutoff": report.label_cutoff,
                "relabelled_by_reviews": report.feedback_applied}],
        description=f"Index {report.name} built from {input}",
    )
    return report

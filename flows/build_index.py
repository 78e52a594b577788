"""Prefect flow: read labelled history, compute features, build and save the FAISS index."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from pipeline import jobs
from pipeline.encoder import TextEncoder
from pipeline.index import IndexConfig
from pipeline.ingest import IngestResult, read_transactions
from pipeline.vectors import VectorConfig


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def ingest_history(path: str) -> IngestResult:
    return read_transactions(path, require_labels=True)


@task(cache_policy=NO_CACHE)
def build_and_save(ingested: IngestResult, name: str, root: str | None, encoder_ref: str | None,
                   until: datetime | None, text_dim: int, kind: str) -> jobs.BuildReport:
    encoder = TextEncoder(encoder_ref) if text_dim > 0 else None
    return jobs.build_index(ingested, name, root=root, encoder=encoder, until=until,
                            vector_config=VectorConfig(text_dim=text_dim),
                            config=IndexConfig(kind=kind))


@flow(name="build_index", log_prints=True)
def build_index(input: str, name: str, root: str | None = None, encoder: str | None = None,
                until: datetime | None = None, text_dim: int = 8, kind: str = "auto"
                ) -> jobs.BuildReport:
    """Index labelled history under ``root/name`` (default ``indexes/``)."""
    ingested = ingest_history(str(Path(input)))
    report = build_and_save(quote(ingested), name, root, encoder, until, text_dim, kind)
    create_table_artifact(
        key="index-build",
        table=[{"index": f"{report.name}@{report.version}", "rows_in": report.rows_in,
                "quarantined": report.rows_quarantined, "vectors": report.vectors,
                "frauds": report.frauds, "faiss": report.faiss_index,
                "label_cutoff": report.label_cutoff}],
        description=f"Index {report.name} built from {input}",
    )
    return report

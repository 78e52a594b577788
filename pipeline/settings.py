"""Where the scheduled jobs find their inputs and put their outputs.

Read from the environment when a scheduled run starts (not when it is deployed), so one
``prefect.yaml`` serves every machine: a worker's environment says where its data lives.
Every path defaults to a place under ``$FINSENTINEL_WORKDIR`` (default ``finsentinel-work``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

WORKDIR_ENV = "FINSENTINEL_WORKDIR"
INBOX_ENV = "FINSENTINEL_INBOX"
NEWS_INBOX_ENV = "FINSENTINEL_NEWS_INBOX"
HISTORY_ENV = "FINSENTINEL_HISTORY"
INDEX_NAME_ENV = "FINSENTINEL_INDEX_NAME"
SENTIMENT_MODEL_ENV = "FINSENTINEL_SENTIMENT_MODEL"
EVALUATIONS_ENV = "FINSENTINEL_EVALUATIONS"  # also where the dashboard reads evaluation reports
DASK_ADDRESS_ENV = "FINSENTINEL_DASK_ADDRESS"
DEFAULT_INDEX_NAME = "fraud"


@dataclass(frozen=True)
class JobSettings:
    """inbox: transaction files the hourly scoring picks up (moved to ``inbox/done`` once
    scored); news_inbox: the same for news files; history: the labelled transactions the daily
    index build and the weekly evaluation read; scores, news_results, audit, evaluations: where
    results go."""

    workdir: Path
    inbox: Path
    news_inbox: Path
    history: Path
    index_name: str
    sentiment_model: str | None
    scores: Path
    news_results: Path
    audit: Path
    evaluations: Path
    dask_address: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobSettings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        work = Path(get(WORKDIR_ENV) or "finsentinel-work")
        return cls(
            workdir=work,
            inbox=Path(get(INBOX_ENV) or work / "inbox"),
            news_inbox=Path(get(NEWS_INBOX_ENV) or work / "news-inbox"),
            history=Path(get(HISTORY_ENV) or work / "history.parquet"),
            index_name=get(INDEX_NAME_ENV) or DEFAULT_INDEX_NAME,
            sentiment_model=get(SENTIMENT_MODEL_ENV),
            scores=work / "scores",
            news_results=work / "news",
            audit=work / "audit",
            evaluations=Path(get(EVALUATIONS_ENV) or work / "evaluations"),
            dask_address=get(DASK_ADDRESS_ENV),
        )

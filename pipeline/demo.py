"""``finsentinel demo``: the whole fraud pipeline on synthetic data, through the Prefect flows."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import SecretStr

from pipeline import schema
from pipeline.ledger import DEFAULT_DB_ENV, Ledger
from pipeline.metrics import average_precision, roc_auc
from pipeline.privacy import redact_url, url_password
from pipeline.synthetic import SyntheticConfig, generate


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("finsentinel-work/demo")
    customers: int = 1500
    terminals: int = 3000
    days: int = 42
    seed: int = 7
    test_days: int = 7
    db: str | None = None

    def __post_init__(self) -> None:
        problem = demo_config_problem(self)
        if problem is not None:
            raise ValueError(f"demo: {problem[0]}: {problem[1]}")


def min_demo_days(test_days: int) -> int:
    """The fewest days a demo may simulate: the scored days, the label delay of the index (the
    labels of the history it indexes must be known before the scored days start), and one day
    of labelled history."""
    from pipeline.index import IndexConfig

    return test_days + IndexConfig.label_delay_days + 1


def demo_config_problem(config: DemoConfig) -> tuple[str, str] | None:
    """(option, message) for the first option of ``config`` the demo cannot run with, checked
    before any work (a short history used to fail late, inside the index flow)."""
    for option, value in (("--customers", config.customers), ("--terminals", config.terminals),
                          ("test_days", config.test_days)):
        if value < 1:
            return option, f"expected a whole number >= 1, got {value}"
    if config.seed < 0:
        return "--seed", f"expected a whole number >= 0, got {config.seed}"
    least = min_demo_days(config.test_days)
    if config.days < least:
        return "--days", (f"expected at least {least} days ({config.test_days} scored, "
                          f"history whose labels are known before them), got {config.days}")
    return None


@dataclass
class DemoReport:
    transactions: int
    history_rows: int
    batch_rows_in: int
    scored: int
    quarantined: int
    alerts: int
    frauds_in_batch: int
    frauds_alerted: int
    auc_roc: float
    average_precision: float
    index: str
    index_vectors: int
    ledger: str
    ledger_records: int
    ledger_verified: bool
    scores_file: str
    quarantine_file: str | None
    seconds: float
    top_alerts: list[dict[str, Any]] = field(default_factory=list)


def bad_rows(batch: pl.DataFrame) -> pl.DataFrame:
    """Three broken rows, as real feeds send them: they must be quarantined, not lost."""
    base = batch.head(3).with_columns(pl.col(pl.Datetime).dt.to_string("%Y-%m-%dT%H:%M:%S"))
    return base.with_columns(
        pl.Series(schema.TRANSACTION_ID,
                  ["bad-amount", "bad-time", base[schema.TRANSACTION_ID][2]]),
        pl.Series(schema.AMOUNT, [-12.5, 10.0, 10.0]),
        pl.Series(schema.TX_TIME, [base[schema.TX_TIME][0], "not a time", base[schema.TX_TIME][2]]),
    )


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> DemoReport:
    from flows.build_index import build_index
    from flows.score_transactions import score_transactions

    started = time.perf_counter()
    work = config.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    db = config.db or os.environ.get(DEFAULT_DB_ENV) or f"sqlite:///{work / 'ledger.sqlite'}"

    log(f"generating {config.days} days for {config.customers:,} cards …")
    data = generate(SyntheticConfig(n_customers=config.customers, n_terminals=config.terminals,
                                    n_days=config.days, seed=config.seed))
    split = data[schema.TX_TIME].min().replace(hour=0, minute=0, second=0, microsecond=0) \
        + timedelta(days=config.days - config.test_days)
    history = data.filter(pl.col(schema.TX_TIME) < split)
    batch = data.filter(pl.col(schema.TX_TIME) >= split)
    history_path, batch_path = work / "history.parquet", work / "batch.csv"
    history.write_parquet(history_path)
    unlabelled = batch.drop(schema.IS_FRAUD, schema.FRAUD_SCENARIO)
    feed = pl.concat([unlabelled.with_columns(pl.col(pl.Datetime).dt.to_string(
        "%Y-%m-%dT%H:%M:%S")), bad_rows(unlabelled)], how="vertical_relaxed")
    feed.write_csv(batch_path)

    # Both flows on the demo's ledger (reviews for the build, decisions from the scoring):
    # never on another one $FINSENTINEL_DB names when --db says otherwise.
    flow_db = SecretStr(db) if url_password(db) else db
    log(f"building index on {history.height:,} labelled transactions (flow build_index) …")
    built = build_index(input=str(history_path), name="demo", root=str(work / "indexes"),
                        until=split, db=flow_db)
    log(f"scoring {feed.height:,} rows of the last {config.test_days} days "
        "(flow score_transactions) …")
    scored = score_transactions(input=str(batch_path), index="demo", output=str(
        work / "scores.parquet"), db=flow_db, root=str(work / "indexes"))
    with Ledger(db) as ledger:
        verified = ledger.verify()
        records = ledger.count()

    scores = pl.read_parquet(scored.output).join(
        batch.select(schema.TRANSACTION_ID, schema.IS_FRAUD), on=schema.TRANSACTION_ID)
    y, s = scores[schema.IS_FRAUD].to_numpy(), scores["score"].to_numpy()
    alerted = scores.filter(pl.col("decision") == "alert")
    return DemoReport(
        transactions=data.height, history_rows=history.height, batch_rows_in=scored.rows_in,
        scored=scored.rows_scored, quarantined=scored.rows_quarantined, alerts=scored.alerts,
        frauds_in_batch=int(y.sum()), frauds_alerted=int(alerted[schema.IS_FRAUD].sum()),
        auc_roc=roc_auc(y, s), average_precision=average_precision(y, s),
        index=f"{built.name}@{built.version}", index_vectors=built.vectors,
        ledger=redact_url(db), ledger_records=records, ledger_verified=verified.ok,
        scores_file=scored.output, quarantine_file=scored.quarantine,
        seconds=round(time.perf_counter() - started, 1), top_alerts=scored.top_alerts[:5],
    )

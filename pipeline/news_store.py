"""Per-ticker daily news sentiment for the dashboard, in the ledger's database.

Two tables, created if missing: ``news_sentiment_articles`` (one row per (news_id, ticker): the
latest classification of that article) and ``news_sentiment_daily`` (one row per (ticker, day):
mean signed score, counts per label, article count). Writing a batch upserts its article rows
and recomputes the daily rows of the (ticker, day) pairs it touched from the article table, in
one transaction, so re-running a batch, or classifying an article again, never double-counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TypeVar

import sqlalchemy as sa

from pipeline.ledger import (
    BATCHES,
    DECISIONS,
    _sqlite_file,
    engine_for,
    naming_sqlite_file,
    resolve_db_url,
    retry_transient,
    write_transaction,
)

T = TypeVar("T")

METADATA = sa.MetaData()
# Writers of the daily table are serialised (one PostgreSQL advisory lock, SQLite's write lock):
# each recomputes a (ticker, day) from the article rows, which a concurrent writer could miss.
PG_LOCK_KEY = 0x6E657773  # "news"
# Values per IN list: well under PostgreSQL's 65,535 parameters per statement (and SQLite's
# limit), for a backfill touching many ticker-days.
PAIRS_PER_QUERY = 5000

ARTICLES = sa.Table(
    "news_sentiment_articles", METADATA,
    sa.Column("news_id", sa.Text, primary_key=True),
    sa.Column("ticker", sa.Text, primary_key=True),
    sa.Column("day", sa.Date, nullable=False, index=True),
    sa.Column("published_at", sa.DateTime, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("score", sa.Double, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("batch_id", sa.Text, nullable=False),
)

DAILY = sa.Table(
    "news_sentiment_daily", METADATA,
    sa.Column("ticker", sa.Text, primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("mean_score", sa.Double, nullable=False),
    sa.Column("positive", sa.Integer, nullable=False),
    sa.Column("negative", sa.Integer, nullable=False),
    sa.Column("neutral", sa.Integer, nullable=False),
    sa.Column("articles", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
)


def _as_date(value: date | datetime | str) -> date:
    """A ``day`` value as a date, whichever type the driver returned it as."""
    if isinstance(value, datetime):
        return value.date()
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


@dataclass(frozen=True)
class ArticleSentiment:
    news_id: str
    ticker: str
    published_at: datetime  # naive UTC
    label: str
    score: float  # P(positive) - P(negative)
    model_version: str
    batch_id: str


class NewsStore:
    """The per-ticker tables on a database URL (the ledger's, by default)."""

    def __init__(self, url: str | None = None):
        self.url = resolve_db_url(url)
        # engine_for refuses a file that is not a SQLite database, or under a regular file,
        # naming it (LedgerError); what SQLite itself refuses is named by _named.
        self._engine = engine_for(self.url)
        self._file = _sqlite_file(self.url)
        try:
            self._named(lambda: retry_transient(self._create_tables))
        except BaseException:
            self._engine.dispose()
            raise

    def _named(self, fn: Callable[[], T]) -> T:
        """``fn()``, its SQLite errors naming the file and the cause, as the ledger's do."""
        return naming_sqlite_file(self._file, fn)

    def _create_tables(self) -> None:
        with write_transaction(self._engine, lock_key=PG_LOCK_KEY) as conn:
            METADATA.create_all(conn)

    def __enter__(self) -> NewsStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._engine.dispose()

    def _upsert(self, table: sa.Table, rows: list[dict], keys: Sequence[str]):
        dialect = self._engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - other databases are not supported by the ledger either
            raise ValueError(f"news store: unsupported database {dialect!r}")
        stmt = insert(table).values(rows)
        updates = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
        return stmt.on_conflict_do_update(index_elements=list(keys), set_=updates)

    def record(self, articles: Iterable[ArticleSentiment],
               classified: Iterable[str] = (), *, ledger_batch: str | None = None) -> int:
        """Upsert article rows and recompute the touched daily rows; returns daily rows
        written. ``classified``: the news ids this run classified (with or without tickers);
        their earlier rows for tickers they no longer have are removed (a changed company map,
        a corrected text), so a ticker's day counts each article under its current tickers.
        ``ledger_batch``: the ledger batch these rows were recorded as (a first run or a
        re-run): an article a later ledger batch has classified since keeps what that batch
        left here (the table holds each article's latest classification, whichever writer
        comes last: a re-run of an older batch, or an older batch's slower writer). Without
        it, the rows are taken as the latest."""
        rows = [{"news_id": a.news_id, "ticker": a.ticker, "day": a.published_at.date(),
                 "published_at": a.published_at, "label": a.label, "score": float(a.score),
                 "model_version": a.model_version, "batch_id": a.batch_id} for a in articles]
        ids = frozenset(classified)
        if not rows and not ids:
            return 0
        return self._named(lambda: retry_transient(
            lambda: self._record(rows, ids, ledger_batch)))

    def _record(self, rows: list[dict], classified: frozenset[str] = frozenset(),
                ledger_batch: str | None = None) -> int:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with write_transaction(self._engine, lock_key=PG_LOCK_KEY) as conn:
            if ledger_batch is not None:
                later = _classified_since(conn, ledger_batch,
                                          {r["news_id"] for r in rows} | classified)
                rows = [r for r in rows if r["news_id"] not in later]
                classified = classified - later
            touched = {(r["ticker"], r["day"]) for r in rows}
            # An article already stored on another day (its time was corrected) leaves that
            # day, and a ticker it no longer has loses it: those days are recomputed too.
            keys = {(r["news_id"], r["ticker"]) for r in rows}
            ids = sorted({news_id for news_id, _ in keys} | classified)
            stale = []
            for start in range(0, len(ids), PAIRS_PER_QUERY):
                for n, t, d in conn.execute(
                        sa.select(ARTICLES.c.news_id, ARTICLES.c.ticker, ARTICLES.c.day).where(
                            ARTICLES.c.news_id.in_(ids[start:start + PAIRS_PER_QUERY]))):
                    if (n, t) in keys or n in classified:
                        touched.add((t, _as_date(d)))
                    if (n, t) not in keys and n in classified:
                        stale.append({"n": n, "t": t})
            if stale:
                conn.execute(ARTICLES.delete().where(ARTICLES.c.news_id == sa.bindparam("n"),
                                                     ARTICLES.c.ticker == sa.bindparam("t")),
                             stale)
            for start in range(0, len(rows), 1000):
                conn.execute(self._upsert(ARTICLES, rows[start:start + 1000],
                                          ("news_id", "ticker")))
            label = ARTICLES.c.label
            pending = sorted(touched)
            daily = []
            for start in range(0, len(pending), PAIRS_PER_QUERY):
                chunk = pending[start:start + PAIRS_PER_QUERY]
                # Scalar IN lists (which use the indexes; a row-value IN list does not on
                # PostgreSQL), then only the chunk's own pairs are kept.
                pairs = sa.and_(ARTICLES.c.ticker.in_(sorted({t for t, _ in chunk})),
                                ARTICLES.c.day.in_(sorted({d for _, d in chunk})))
                query = (sa.select(
                    ARTICLES.c.ticker, ARTICLES.c.day,
                    sa.func.avg(ARTICLES.c.score).label("mean_score"),
                    sa.func.sum(sa.case((label == "positive", 1), else_=0)).label("positive"),
                    sa.func.sum(sa.case((label == "negative", 1), else_=0)).label("negative"),
                    sa.func.sum(sa.case((label == "neutral", 1), else_=0)).label("neutral"),
                    sa.func.count().label("articles"))
                    .where(pairs).group_by(ARTICLES.c.ticker, ARTICLES.c.day))
                wanted = set(chunk)
                found = [{**dict(r), "mean_score": float(r.mean_score), "updated_at": now}
                         for r in conn.execute(query).mappings()
                         if (r["ticker"], _as_date(r["day"])) in wanted]
                emptied = set(chunk) - {(r["ticker"], _as_date(r["day"])) for r in found}
                for ticker, day in sorted(emptied):  # no article is on these any more
                    conn.execute(DAILY.delete().where(DAILY.c.ticker == ticker,
                                                      DAILY.c.day == day))
                daily += found
            for start in range(0, len(daily), 1000):
                conn.execute(self._upsert(DAILY, daily[start:start + 1000], ("ticker", "day")))
        return len(daily)

    def daily(self, ticker: str | None = None, start: date | None = None,
              end: date | None = None) -> list[dict]:
        """Daily rows ordered by ticker and day (``end`` inclusive)."""
        query = sa.select(DAILY).order_by(DAILY.c.ticker, DAILY.c.day)
        if ticker is not None:
            query = query.where(DAILY.c.ticker == ticker)
        if start is not None:
            query = query.where(DAILY.c.day >= start)
        if end is not None:
            query = query.where(DAILY.c.day <= end)
        return self._named(lambda: self._rows(query))

    def _rows(self, query: sa.Select) -> list[dict]:
        with self._engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def articles(self, ticker: str | None = None) -> list[dict]:
        query = sa.select(ARTICLES).order_by(ARTICLES.c.ticker, ARTICLES.c.day,
                                             ARTICLES.c.news_id)
        if ticker is not None:
            query = query.where(ARTICLES.c.ticker == ticker)
        return self._named(lambda: self._rows(query))


def _classified_since(conn: sa.Connection, batch_id: str, news_ids: set[str]) -> set[str]:
    """The articles among ``news_ids`` that a ledger batch recorded after ``batch_id`` (by the
    batches' creation times) gave a label (not a failure), whatever rows it left here (none,
    when that classification named no ticker). The article rows here come from such ledger
    batches (same database), so the ledger alone says which classification is the latest."""
    ids = sorted(news_ids)
    if not ids:
        return set()
    mine = conn.execute(sa.select(BATCHES.c.created_at).where(
        BATCHES.c.kind == "sentiment",  # pipeline.sentiment.jobs.KIND
        BATCHES.c.batch_id == batch_id)).scalar_one_or_none() or ""
    later: set[str] = set()
    for start in range(0, len(ids), PAIRS_PER_QUERY):
        later.update(conn.execute(
            sa.select(DECISIONS.c.subject_id).distinct()
            .join(BATCHES, sa.and_(BATCHES.c.batch_id == DECISIONS.c.batch_id,
                                   BATCHES.c.kind == DECISIONS.c.kind))
            .where(DECISIONS.c.kind == "sentiment",
                   DECISIONS.c.subject_id.in_(ids[start:start + PAIRS_PER_QUERY]),
                   DECISIONS.c.batch_id != batch_id,
                   DECISIONS.c.decision != "failed",  # pipeline.sentiment.jobs.FAILED
                   BATCHES.c.created_at > mine)).scalars())
    return later

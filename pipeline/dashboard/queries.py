"""The dashboard's reads: plain, paged SQLAlchemy queries over the ledger (and the news tables in
its database), usable and testable without Streamlit.

Every query is bounded: a day's alert queue reads the day's (seq, score) pairs through the
``(kind, subject_time)`` index and the card ids of only as many top rows as the budget needs; the
audit search pages by ``seq`` (keyset, never OFFSET over the whole ledger); a batch's scores
come through the ``batch_id`` index. Card, merchant and channel live in each decision's recorded
inputs (JSON); they are extracted in SQL (SQLite ``json_extract``, PostgreSQL ``jsonb``) only
for rows already narrowed down.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipeline import schema
from pipeline.audit import reviews_in
from pipeline.ledger import BATCHES, DECISIONS, LEDGER_META, Ledger, _iso_bound
from pipeline.news_store import ARTICLES, DAILY

FRAUD = "fraud"
SENTIMENT = "sentiment"
DEFAULT_BUDGET = 100
PAGE_SIZE = 25
SEARCH_PAGE_SIZE = 50
CHUNK = 500


# --- helpers ---------------------------------------------------------------------------------

def _day_bounds(day: date) -> tuple[str, str]:
    """A UTC day as the ledger's created_at text range [day, next day)."""
    start = datetime(day.year, day.month, day.day)
    return _utc_text(start), _utc_text(start + timedelta(days=1))


def _json_text(dialect: str, column: sa.ColumnElement, *path: str) -> sa.ColumnElement:
    """The text at ``path`` inside a JSON text column, in the database's own JSON functions."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        return sa.func.jsonb_extract_path_text(sa.cast(column, JSONB), *path)
    return sa.func.json_extract(column, "$." + ".".join(path))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def main_reasons(explanation: dict[str, Any], limit: int = 3) -> list[str]:
    """The few facts that made a fraud score high, from the explanation scoring wrote: the
    neighbour vote, the stacked model's largest pushes, the features furthest from the card's
    usual values."""
    reasons = []
    neighbours = explanation.get("neighbours") or []
    if neighbours:
        frauds = sum(1 for n in neighbours if n.get("is_fraud") == 1)
        reasons.append(f"{frauds}/{len(neighbours)} nearest neighbours fraud (weight "
                       f"{explanation.get('fraud_weight', 0):.2f} of "
                       f"{explanation.get('total_weight', 0):.2f})")
    model = explanation.get("model") or {}
    pushes = [(name, v) for name, v in (model.get("contributions_log_odds") or {}).items()
              if v > 0]
    for name, value in sorted(pushes, key=lambda p: -p[1])[:1]:
        reasons.append(f"model: {name} +{value:.2f} log-odds")
    ratios = []
    for name, v in (explanation.get("features") or {}).items():
        value, usual = v.get("value"), v.get("card_usual")
        if value is None or usual is None or name in schema.TIME_FEATURES:
            continue
        if usual > 0 and value > usual:
            ratios.append((value / usual, name, value, usual))
    for ratio, name, _value, _usual in sorted(ratios, reverse=True):
        if len(reasons) >= limit or ratio < 1.5:
            break
        reasons.append(f"{name} {ratio:.1f}x the card's usual")
    return reasons[:limit]


# --- results ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlertFilter:
    """The alert queue's filters: the day (UTC) the transactions happened (for records from
    before subject times, the day they were recorded; None: the latest), a minimum score, a
    merchant (name substring or exact terminal id), a channel, and the budget of cards."""

    day: date | None = None
    min_score: float = 0.0
    merchant: str | None = None
    channel: str | None = None
    budget: int = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min score: expected a value in [0, 1], got {self.min_score}")
        if self.budget < 1:
            raise ValueError(f"alert budget: expected at least 1 card, got {self.budget}")


@dataclass(frozen=True)
class AlertPage:
    day: date | None
    cards: int  # cards in the queue (at most the budget)
    page: int
    pages: int
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class SearchFilter:
    """The audit search: any combination; an id or subject matches exactly."""

    decision_id: str | None = None
    subject_id: str | None = None
    batch_id: str | None = None
    kind: str | None = None
    decision: str | None = None
    since: datetime | None = None
    until: datetime | None = None  # exclusive


@dataclass(frozen=True)
class SearchPage:
    rows: list[dict[str, Any]]
    # Cursors: pass ``before`` to get the next (older) page, ``after`` for the previous one.
    before: int | None
    after: int | None


# --- the queries -----------------------------------------------------------------------------

class DashboardQueries:
    """Read-only queries of one ledger database for the dashboard pages."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.dialect = make_dialect(ledger)

    # -- alerts --

    def fraud_days(self, limit: int = 366) -> list[date]:
        """Days (UTC) on which scored transactions happened, newest first: one probe of the
        ``(kind, subject_time)`` index per day, not a scan of the decisions. Records from
        before subject times (schema v2 and older) count on the day they were recorded."""
        days: set[date] = set()
        when = DECISIONS.c.subject_time
        with self.ledger.read() as conn:
            before = None
            while len(days) < limit:
                query = (sa.select(when).where(DECISIONS.c.kind == FRAUD, when.is_not(None))
                         .order_by(when.desc()).limit(1))
                if before is not None:
                    query = query.where(when < before)
                latest = conn.execute(query).scalar()
                if latest is None:
                    break
                day = date.fromisoformat(latest[:10])
                days.add(day)
                before = _day_bounds(day)[0]
            older = conn.execute(sa.select(DECISIONS.c.seq).where(
                DECISIONS.c.kind == FRAUD, when.is_(None)).limit(1)).first()
            if older is not None:
                recorded = sa.func.substr(BATCHES.c.created_at, 1, 10)
                days |= {date.fromisoformat(d) for d in conn.execute(
                    sa.select(recorded).where(BATCHES.c.kind == FRAUD, BATCHES.c.rows_scored > 0)
                    .group_by(recorded).order_by(recorded.desc()).limit(limit)).scalars()}
        return sorted(days, reverse=True)[:limit]

    def alerts(self, flt: AlertFilter, page: int = 0, page_size: int = PAGE_SIZE) -> AlertPage:
        """The day's queue: each card's highest-scoring decision, highest first, for the
        ``budget`` highest cards; one page of it, with reasons and the latest review."""
        day = flt.day
        if day is None:
            days = self.fraud_days(limit=1)
            if not days:
                return AlertPage(None, 0, 0, 0)
            day = days[0]
        lo, hi = _day_bounds(day)
        when = DECISIONS.c.subject_time
        # The day's transactions; records without a subject time by the day they were recorded.
        days = [(when >= lo, when < hi),
                (when.is_(None), DECISIONS.c.created_at >= lo, DECISIONS.c.created_at < hi)]
        score = [DECISIONS.c.score >= flt.min_score] if flt.min_score > 0 else []
        fields = [_json_text(self.dialect, DECISIONS.c.inputs, "transaction", name)
                  for name in (schema.CUSTOMER_ID, schema.MERCHANT_NAME, schema.TERMINAL_ID,
                               schema.CHANNEL)]
        merchant = (flt.merchant or "").strip().lower()
        best: dict[str, int] = {}  # card -> its best decision's seq, in score order
        # The day's seqs in score order are cheap (index + sort of numbers); the JSON fields
        # are read for chunks of the top rows only, until the budget of cards is filled.
        with self.ledger.read() as conn:
            ranked = sorted((-r.score, r.seq) for on_day in days for r in conn.execute(
                sa.select(DECISIONS.c.seq, DECISIONS.c.score)
                .where(DECISIONS.c.kind == FRAUD, *on_day, *score)))
            seqs = [seq for _, seq in ranked]
            for start in range(0, len(seqs), CHUNK):
                chunk = seqs[start:start + CHUNK]
                found = {r[0]: r[1:] for r in conn.execute(
                    sa.select(DECISIONS.c.seq, *fields).where(DECISIONS.c.seq.in_(chunk)))}
                for seq in chunk:
                    card, name, terminal, channel = found[seq]
                    if flt.channel and channel != flt.channel:
                        continue
                    if merchant and merchant not in (name or "").lower() \
                            and merchant != (terminal or "").lower():
                        continue
                    best.setdefault(card or f"(no card) {seq}", seq)
                    if len(best) >= flt.budget:
                        break
                if len(best) >= flt.budget:
                    break
        queue = list(best.values())[:flt.budget]
        pages = max(1, math.ceil(len(queue) / page_size))
        page = min(max(page, 0), pages - 1)
        shown = queue[page * page_size:(page + 1) * page_size]
        rows = self._alert_rows(shown, first_rank=page * page_size + 1)
        return AlertPage(day, len(queue), page, pages, rows)

    def _alert_rows(self, seqs: Sequence[int], first_rank: int) -> list[dict[str, Any]]:
        if not seqs:
            return []
        with self.ledger.read() as conn:
            records = {r.seq: r for r in conn.execute(
                sa.select(DECISIONS.c.seq, DECISIONS.c.decision_id, DECISIONS.c.subject_id,
                          DECISIONS.c.score, DECISIONS.c.threshold, DECISIONS.c.decision,
                          DECISIONS.c.explanation, DECISIONS.c.inputs, DECISIONS.c.created_at)
                .where(DECISIONS.c.seq.in_(list(seqs))))}
            reviews = self._latest_reviews(conn, [r.decision_id for r in records.values()])
        rows = []
        for rank, seq in enumerate(seqs, first_rank):
            r = records[seq]
            explanation = json.loads(r.explanation)
            tx = ((_loads(r.inputs) or {}).get("transaction") or {})
            review = reviews.get(r.decision_id)
            rows.append({
                "rank": rank, "card": tx.get(schema.CUSTOMER_ID),
                "transaction": r.subject_id, "score": float(r.score),
                "threshold": float(r.threshold), "decision": r.decision,
                "amount": tx.get(schema.AMOUNT), "tx_time": tx.get(schema.TX_TIME),
                "merchant": tx.get(schema.MERCHANT_NAME) or tx.get(schema.TERMINAL_ID),
                "channel": tx.get(schema.CHANNEL),
                "reasons": "; ".join(main_reasons(explanation)),
                "status": review["label"] if review else "open",
                "reviewer": review["reviewer"] if review else None,
                "decision_id": r.decision_id, "seq": int(seq),
            })
        return rows

    @staticmethod
    def _latest_reviews(conn: sa.Connection, decision_ids: Sequence[str]
                        ) -> dict[str, dict[str, Any]]:
        return {d: reviews[-1] for d, reviews in reviews_in(conn, decision_ids).items()}

    def channels(self) -> list[str]:
        return list(schema.CHANNELS)

    # -- one case --

    def case(self, decision_id: str) -> dict[str, Any] | None:
        """One decision with its explanation, inputs and every review of it (oldest first)."""
        record = self.ledger.decision(decision_id.strip())
        if record is None:
            return None
        record["reviews"] = self.ledger.feedback(decision_id=record["decision_id"])
        return record

    def record_problem(self, decision_id: str) -> str | None:
        """What is wrong with one decision's ledger record, or None when it is intact: its
        contents must match its hash, and its hash must link to its neighbours in the chain (a
        record edited and re-hashed breaks the next record's link). Three rows read, so the
        Case page can refuse to review a record that fails verification."""
        from pipeline.ledger import GENESIS_HASH, record_hash

        with self.ledger.read() as conn:
            row = conn.execute(sa.select(DECISIONS).where(
                DECISIONS.c.decision_id == decision_id)).mappings().first()
            if row is None:
                return "is not in the ledger"
            seq = int(row["seq"])
            near = dict(conn.execute(sa.select(DECISIONS.c.seq, DECISIONS.c.hash).where(
                DECISIONS.c.seq == seq - 1)).all())
            following = conn.execute(sa.select(DECISIONS.c.prev_hash).where(
                DECISIONS.c.seq == seq + 1)).scalar()
        try:
            if record_hash(row) != row["hash"]:
                return (f"(seq {seq}) does not match its hash: the record was edited after "
                        "it was written")
        except (TypeError, ValueError) as exc:
            return f"(seq {seq}) does not match its hash: {exc}"
        expected = near.get(seq - 1, GENESIS_HASH if seq == 1 else None)
        if row["prev_hash"] != expected:
            return f"(seq {seq}) does not link to the record before it"
        if following is not None and following != row["hash"]:
            return (f"(seq {seq}) does not match its hash as the next record saw it: the "
                    "record was rewritten")
        return None

    # -- sentiment --

    def _has(self, conn: sa.Connection, table: sa.Table) -> bool:
        return sa.inspect(conn).has_table(table.name)

    def tickers(self) -> list[dict[str, Any]]:
        """Tickers with daily sentiment, most articles first."""
        query = (sa.select(DAILY.c.ticker, sa.func.sum(DAILY.c.articles).label("articles"),
                           sa.func.max(DAILY.c.day).label("last_day"))
                 .group_by(DAILY.c.ticker)
                 .order_by(sa.func.sum(DAILY.c.articles).desc(), DAILY.c.ticker))
        with self.ledger.read() as conn:
            if not self._has(conn, DAILY):
                return []
            return [dict(r) for r in conn.execute(query).mappings()]

    def sentiment_daily(self, ticker: str, start: date | None = None,
                        end: date | None = None) -> list[dict[str, Any]]:
        query = sa.select(DAILY).where(DAILY.c.ticker == ticker).order_by(DAILY.c.day)
        if start is not None:
            query = query.where(DAILY.c.day >= start)
        if end is not None:
            query = query.where(DAILY.c.day <= end)
        with self.ledger.read() as conn:
            if not self._has(conn, DAILY):
                return []
            return [dict(r) for r in conn.execute(query).mappings()]

    def headlines(self, ticker: str, day: date, page: int = 0, page_size: int = PAGE_SIZE
                  ) -> list[dict[str, Any]]:
        """The articles behind one (ticker, day) point, with the classification decision each
        came from: headline, label, scores and the explanation."""
        query = (sa.select(ARTICLES, DECISIONS.c.decision_id, DECISIONS.c.inputs,
                           DECISIONS.c.explanation, DECISIONS.c.decision)
                 .join_from(ARTICLES, DECISIONS, sa.and_(
                     DECISIONS.c.kind == SENTIMENT, DECISIONS.c.batch_id == ARTICLES.c.batch_id,
                     DECISIONS.c.subject_id == ARTICLES.c.news_id), isouter=True)
                 .where(ARTICLES.c.ticker == ticker, ARTICLES.c.day == day)
                 .order_by(ARTICLES.c.published_at, ARTICLES.c.news_id)
                 .limit(page_size).offset(page * page_size))
        with self.ledger.read() as conn:
            if not self._has(conn, ARTICLES):
                return []
            rows = []
            for r in conn.execute(query).mappings():
                inputs = _loads(r["inputs"]) or {}
                explanation = _loads(r["explanation"]) or {}
                rows.append({
                    "news_id": r["news_id"], "published_at": r["published_at"],
                    "headline": inputs.get("headline"), "source": inputs.get("source"),
                    "label": r["label"], "score": float(r["score"]),
                    "probabilities": explanation.get("probabilities"),
                    "explanation": explanation, "model_version": r["model_version"],
                    "decision_id": r["decision_id"]})
            return rows

    # -- models and data --

    def latest_batch(self, kind: str = FRAUD, before: str | None = None
                     ) -> dict[str, Any] | None:
        """The newest batch of ``kind`` with decisions (recorded before ``before`` if given)."""
        query = (sa.select(BATCHES).where(BATCHES.c.kind == kind, BATCHES.c.rows_scored > 0)
                 .order_by(BATCHES.c.created_at.desc(), BATCHES.c.batch_id.desc()).limit(1))
        if before is not None:
            query = query.where(BATCHES.c.created_at < before)
        with self.ledger.read() as conn:
            found = conn.execute(query).mappings().first()
            return dict(found) if found else None

    def batch_scores(self, batch_id: str, kind: str = FRAUD) -> dict[str, Any]:
        """A batch's scores, its kNN scores (the stacked model's kNN input where it has one),
        and the index version and scoring settings it was scored with."""
        knn = _json_text(self.dialect, DECISIONS.c.explanation, "knn_score")
        where = (DECISIONS.c.batch_id == batch_id, DECISIONS.c.kind == kind)
        with self.ledger.read() as conn:
            rows = conn.execute(sa.select(DECISIONS.c.score, knn).where(*where)).all()
            first = conn.execute(sa.select(DECISIONS.c.index_version, DECISIONS.c.model_version,
                                           DECISIONS.c.inputs).where(*where)
                                 .order_by(DECISIONS.c.seq).limit(1)).first()
        scores = [float(r[0]) for r in rows]
        knn_scores = [float(r[1]) if r[1] is not None else float(r[0]) for r in rows]
        settings = ((_loads(first.inputs) or {}).get("scoring") or {}) if first else {}
        return {"scores": scores, "knn_scores": knn_scores,
                "index_version": first.index_version if first else None,
                "model_version": first.model_version if first else None,
                "settings": settings}

    # -- audit --

    def search(self, flt: SearchFilter, before: int | None = None, after: int | None = None,
               page_size: int = SEARCH_PAGE_SIZE) -> SearchPage:
        """One page of matching decisions, newest first, keyset-paged on seq."""
        columns = (DECISIONS.c.seq, DECISIONS.c.decision_id, DECISIONS.c.batch_id,
                   DECISIONS.c.kind, DECISIONS.c.subject_id, DECISIONS.c.score,
                   DECISIONS.c.threshold, DECISIONS.c.decision, DECISIONS.c.model_version,
                   DECISIONS.c.index_version, DECISIONS.c.created_at, DECISIONS.c.hash)
        query = self._search_query(flt, *columns)
        if after is not None:  # the newer page: ascending from the cursor, then reversed
            query = query.where(DECISIONS.c.seq > after).order_by(DECISIONS.c.seq)
        else:
            if before is not None:
                query = query.where(DECISIONS.c.seq < before)
            query = query.order_by(DECISIONS.c.seq.desc())
        with self.ledger.read() as conn:
            found = [dict(r) for r in conn.execute(query.limit(page_size + 1)).mappings()]
            more = len(found) > page_size
            found = found[:page_size]
            if after is not None:
                found.reverse()
            reviews = self._latest_reviews(conn, [r["decision_id"] for r in found])
        for row in found:
            review = reviews.get(row["decision_id"])
            row["review"] = review["label"] if review else None
            row["reviewer"] = review["reviewer"] if review else None
        if not found:
            return SearchPage([], None, None)
        older = found[-1]["seq"] if (more or after is not None) else None
        newer = found[0]["seq"] if (before is not None or (after is not None and more)) else None
        return SearchPage(found, older, newer)

    def _search_query(self, flt: SearchFilter, *columns: sa.ColumnElement) -> sa.Select:
        query = sa.select(*columns)
        for column, value in ((DECISIONS.c.decision_id, flt.decision_id),
                              (DECISIONS.c.subject_id, flt.subject_id),
                              (DECISIONS.c.batch_id, flt.batch_id),
                              # `|| ''`: no index on these low-cardinality columns, so
                              # the planner walks seq (newest first) instead of sorting all
                              (DECISIONS.c.kind + "", flt.kind),
                              (DECISIONS.c.decision + "", flt.decision)):
            if value and value.strip():
                query = query.where(column == value.strip())
        if flt.since is not None:
            query = query.where(DECISIONS.c.created_at >= _utc_text(flt.since))
        if flt.until is not None:
            query = query.where(DECISIONS.c.created_at < _utc_text(flt.until))
        return query

    def count(self, flt: SearchFilter) -> int:
        with self.ledger.read() as conn:
            return conn.execute(self._search_query(flt, sa.func.count())
                                .select_from(DECISIONS)).scalar_one()

    def matching_ids(self, flt: SearchFilter) -> list[str]:
        """Every matching decision id, in ledger order (for an export; callers cap the count)."""
        with self.ledger.read() as conn:
            return list(conn.execute(self._search_query(flt, DECISIONS.c.decision_id)
                                     .order_by(DECISIONS.c.seq)).scalars())

    def ledger_head(self) -> dict[str, Any]:
        keys = ("schema_version", "head_seq", "head_hash", "feedback_head_seq",
                "feedback_head_hash")
        with self.ledger.read() as conn:
            meta = dict(conn.execute(sa.select(LEDGER_META.c.key, LEDGER_META.c.value)
                                     .where(LEDGER_META.c.key.in_(keys))).all())
        return {k: meta.get(k) for k in keys}


def make_dialect(ledger: Ledger) -> str:
    with ledger.read() as conn:
        return conn.dialect.name


def _utc_text(value: datetime) -> str:
    """A time as the ledger writes created_at (naive = UTC), so that text order is time order."""
    return _iso_bound(value, "time")


# --- artefacts -------------------------------------------------------------------------------

def artifact_manifests(root: str | Path) -> list[dict[str, Any]]:
    """The live (CURRENT) manifest of every artefact under ``root``, without hashing files
    (that is what "verify" does)."""
    from pipeline import artifacts

    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for base in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            version = artifacts.current_version(root, base.name)
            manifest = json.loads((base / version / artifacts.MANIFEST).read_text())
        except (artifacts.ArtifactError, OSError, ValueError) as exc:
            out.append({"name": base.name, "error": str(exc)})
            continue
        versions = sorted(p.name for p in base.iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        out.append({"name": base.name, "version": version, "versions": len(versions),
                    "manifest": manifest})
    return out


def evaluation_reports(directory: str | Path) -> list[dict[str, Any]]:
    """The evaluation JSON reports (``finsentinel evaluate --output``) in ``directory``."""
    directory = Path(directory)
    reports = []
    if not directory.is_dir():
        return reports
    for path in sorted(directory.glob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and "summary" in document and "folds" in document:
            reports.append({"file": path.name, **document})
    return reports


def neighbour_features(root: str | Path, index_version: str, ids: Sequence[str]
                       ) -> dict[str, dict[str, float]]:
    """The stored features of the given indexed transactions (for the case's neighbourhood
    picture); empty when the index version is not on disk."""
    import polars as pl

    from pipeline import artifacts

    name, _, version = index_version.rpartition("@")
    path = Path(root) / name / version / "meta.parquet"
    if not name or not path.exists():
        return {}
    try:
        artifacts.resolve(Path(root), name, version, verify=False, require=("meta.parquet",))
    except artifacts.ArtifactError:
        return {}
    found = (pl.scan_parquet(path).filter(pl.col(schema.TRANSACTION_ID).is_in(list(ids)))
             .collect())
    names = [c for c in found.columns if c not in ("transaction_id", "tx_time", "label_time",
                                                   "is_fraud", "customer_id", "terminal_id")]
    return {r[schema.TRANSACTION_ID]: {n: r[n] for n in names}
            for r in found.iter_rows(named=True)}

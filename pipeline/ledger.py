"""An append-only, hash-chained audit ledger of automated decisions.

Every decision is one row in ``decisions``; its ``hash`` is the sha256 of the canonical JSON of
all its fields (except ``seq`` and ``hash``) including ``prev_hash``, the previous record's hash
(64 zeros for the first record). Editing, deleting, inserting or reordering records breaks the
chain, and :meth:`Ledger.verify` names the first record where it breaks.

The database is any SQLAlchemy URL: SQLite (the embedded default) or PostgreSQL. A batch is
written in one transaction, so a crash never leaves half a batch. Appends are serialised across
processes so the chain stays linear: SQLite opens write transactions with ``BEGIN IMMEDIATE``
(WAL journal, 30 s busy timeout); PostgreSQL takes a transaction-scoped advisory lock before
reading the head. ``seq`` is assigned under that lock as 1, 2, 3… with no gaps, so a missing
number is itself evidence of a deletion.

Transient errors ("database is locked", serialization failures, dropped connections) are retried
by :func:`retry_transient`; :meth:`Ledger.record_batch` uses it, and a retried batch is safe
because the whole batch is one transaction and re-recording a batch is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from numbers import Real
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError

DEFAULT_DB_ENV = "FINSENTINEL_DB"
DEFAULT_WORKDIR = Path("finsentinel-work")
DEFAULT_DB_FILE = "ledger.sqlite"
SCHEMA_VERSION = "1"
GENESIS_HASH = "0" * 64
DECISION_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://finsentinel/ledger/decision")
BUSY_TIMEOUT_S = 30.0
# pg_advisory_xact_lock key shared by every ledger writer in a database ("FSLEDGER" in ASCII).
PG_LOCK_KEY = 0x46534C4544474552
INSERT_CHUNK = 5000

# Fields hashed into each record, in the order the canonical JSON sorts them anyway.
HASHED_FIELDS = ("batch_id", "created_at", "decision", "decision_id", "explanation",
                 "index_version", "input_hash", "kind", "model_version", "prev_hash", "score",
                 "subject_id", "threshold")

T = TypeVar("T")


class LedgerError(RuntimeError):
    """The ledger cannot record or read what was asked (bad batch, conflicting re-run, schema)."""


# --- schema -------------------------------------------------------------------------------

METADATA = sa.MetaData()

LEDGER_META = sa.Table(
    "ledger_meta", METADATA,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

BATCHES = sa.Table(
    "batches", METADATA,
    sa.Column("batch_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("input_hash", sa.Text, nullable=False),
    sa.Column("rows_in", sa.Integer, nullable=False),
    sa.Column("rows_scored", sa.Integer, nullable=False),
    sa.Column("rows_quarantined", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
)

DECISIONS = sa.Table(
    "decisions", METADATA,
    # Assigned by the ledger under its append lock (gap-free), not by the database.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("decision_id", sa.Text, nullable=False, unique=True),
    sa.Column("batch_id", sa.Text, nullable=False, index=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("subject_id", sa.Text, nullable=False, index=True),
    sa.Column("score", sa.Double, nullable=False),
    sa.Column("threshold", sa.Double, nullable=False),
    sa.Column("decision", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("index_version", sa.Text, nullable=False),
    sa.Column("input_hash", sa.Text, nullable=False),
    sa.Column("explanation", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False, index=True),
    sa.Column("prev_hash", sa.CHAR(64), nullable=False),
    sa.Column("hash", sa.CHAR(64), nullable=False),
    sa.UniqueConstraint("kind", "batch_id", "subject_id", name="uq_decisions_kind_batch_subject"),
)

QUARANTINE = sa.Table(
    "quarantine", METADATA,
    sa.Column("batch_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("row_number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("field", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("raw", sa.Text, nullable=False),
)


# --- records ------------------------------------------------------------------------------

def _check_text(name: str, value: Any, where: str = "") -> str:
    """Non-empty str without NUL (PostgreSQL text cannot hold NUL; SQLite would, silently)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{prefix}{name} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise ValueError(f"{prefix}{name} contains a NUL character, which cannot be stored")
    return value


def _finite_float(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{where}: {name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where}: {name} must be finite, got {number!r} (NaN/inf scores "
                         "cannot be audited)")
    # SQLite stores -0.0 as 0.0; normalise so the hashed value round-trips on every backend.
    return number + 0.0


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays (common in explanations) become plain Python values.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def canonical_json(value: Any) -> str:
    """Sorted keys, compact separators, no NaN/inf: one text per value on every backend."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_json_default)


def explanation_json(explanation: Mapping[str, Any], where: str = "explanation") -> str:
    if not isinstance(explanation, Mapping):
        raise ValueError(f"{where}: explanation must be a dict, got {type(explanation).__name__}")
    try:
        return canonical_json(dict(explanation))
    except ValueError as exc:  # allow_nan=False
        raise ValueError(f"{where}: explanation contains NaN or infinity ({exc}); "
                         "replace it with null or a finite number") from exc
    except TypeError as exc:
        raise ValueError(f"{where}: explanation is not JSON-serialisable ({exc})") from exc


def decision_id_for(kind: str, batch_id: str, subject_id: str) -> str:
    """Deterministic id, so re-running a batch produces the same ids."""
    return str(uuid.uuid5(DECISION_NAMESPACE, f"{kind}:{batch_id}:{subject_id}"))


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the hashed fields (floats by repr, as Python reads them
    back from either backend; the explanation as its stored canonical JSON text)."""
    material = {name: record[name] for name in HASHED_FIELDS}
    material["score"] = float(material["score"])
    material["threshold"] = float(material["threshold"])
    return hashlib.sha256(canonical_json(material).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Decision:
    """One automated decision about one subject (a transaction, an article) in one batch."""

    batch_id: str
    kind: str
    subject_id: str
    score: float
    threshold: float
    decision: str
    model_version: str
    index_version: str
    input_hash: str
    explanation: dict
    decision_id: str = ""

    def __post_init__(self) -> None:
        where = f"decision for subject {self.subject_id!r}"
        for name in ("batch_id", "kind", "subject_id", "decision", "model_version",
                     "index_version", "input_hash"):
            _check_text(name, getattr(self, name), where)
        object.__setattr__(self, "score", _finite_float("score", self.score, where))
        object.__setattr__(self, "threshold", _finite_float("threshold", self.threshold, where))
        explanation_json(self.explanation, where)
        if self.decision_id:
            _check_text("decision_id", self.decision_id, where)
        else:
            object.__setattr__(self, "decision_id",
                               decision_id_for(self.kind, self.batch_id, self.subject_id))


@dataclass(frozen=True)
class QuarantinedRow:
    """An input row that was not scored, and why."""

    row_number: int
    field: str
    reason: str
    raw: str  # JSON text of the original row

    def __post_init__(self) -> None:
        where = f"quarantined row {self.row_number!r}"
        if isinstance(self.row_number, bool) or not isinstance(self.row_number, int):
            raise ValueError(f"{where}: row_number must be an int")
        for name in ("field", "reason"):
            _check_text(name, getattr(self, name), where)
        if not isinstance(self.raw, str) or "\x00" in self.raw:
            raise ValueError(f"{where}: raw must be JSON text without NUL characters")


@dataclass(frozen=True)
class BatchReceipt:
    batch_id: str
    added: int
    already_present: int
    quarantined: int
    head_hash: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    checked: int
    first_bad_seq: int | None
    first_bad_decision_id: str | None
    reason: str


# --- connection handling ------------------------------------------------------------------

def resolve_db_url(url: str | None = None, *, workdir: Path | None = None) -> str:
    """explicit url > $FINSENTINEL_DB > sqlite:///<workdir or ./finsentinel-work>/ledger.sqlite
    (the directory is created). Plain ``postgresql://``/``postgres://`` URLs are rewritten to the
    psycopg 3 driver."""
    chosen = url or os.environ.get(DEFAULT_DB_ENV) or None
    if chosen is None:
        directory = Path(workdir) if workdir is not None else DEFAULT_WORKDIR
        directory.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(directory / DEFAULT_DB_FILE).resolve()}"
    for scheme in ("postgresql://", "postgres://"):
        if chosen.startswith(scheme):
            return "postgresql+psycopg://" + chosen[len(scheme):]
    return chosen


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: locks, serialization failures, deadlocks, dropped connections."""
    if not isinstance(exc, OperationalError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    if sqlstate in ("40001", "40P01", "55P03") or sqlstate.startswith("08"):
        return True
    message = str(exc.orig).lower()
    return "locked" in message or "busy" in message


def retry_transient(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.05,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn`` and retry it with jittered exponential backoff on transient DB errors.
    ``fn`` must be safe to repeat (one whole transaction)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OperationalError as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            sleep(base_delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")  # pragma: no cover


_WRITE_OPTION = "finsentinel_write"


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

    # SQLAlchemy's pysqlite recipe: stop the driver emitting its own (deferred) BEGIN, so that
    # write transactions can take the write lock up front with BEGIN IMMEDIATE.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 30000")
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() not in ("wal", "memory"):
                cursor.execute("PRAGMA journal_mode = WAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")

    return engine


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# --- the ledger ---------------------------------------------------------------------------

class Ledger:
    """The decision ledger in one database. Use as a context manager, or call :meth:`close`."""

    def __init__(self, url: str | None = None):
        self.url = resolve_db_url(url)
        if make_url(self.url).get_backend_name() == "sqlite":
            self._engine = _sqlite_engine(self.url)
        else:
            self._engine = sa.create_engine(self.url, pool_pre_ping=True)
        self._dialect = self._engine.dialect.name
        retry_transient(self._init_schema)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"Ledger({make_url(self.url).render_as_string(hide_password=True)!r})"

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One serialised write transaction: no other writer runs until it commits."""
        with self._engine.connect() as conn:
            if self._dialect == "sqlite":
                conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                if self._dialect == "postgresql":
                    conn.execute(sa.select(sa.func.set_config(
                        "lock_timeout", f"{int(BUSY_TIMEOUT_S * 1000)}ms", True)))
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
                        sa.literal(PG_LOCK_KEY, sa.BigInteger))))
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """One read transaction over a single snapshot (several queries agree with each other)."""
        with self._engine.connect() as conn:
            if self._dialect == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def _init_schema(self) -> None:
        with self._write() as conn:
            METADATA.create_all(conn)
            meta = dict(conn.execute(sa.select(LEDGER_META.c.key, LEDGER_META.c.value)).all())
            version = meta.get("schema_version")
            if version is None:
                conn.execute(LEDGER_META.insert(), [
                    {"key": "schema_version", "value": SCHEMA_VERSION},
                    {"key": "head_seq", "value": "0"},
                    {"key": "head_hash", "value": GENESIS_HASH},
                ])
            elif version != SCHEMA_VERSION:
                raise LedgerError(f"{self!r}: ledger schema_version is {version!r}, but this "
                                  f"code reads version {SCHEMA_VERSION!r}; migrate the database "
                                  "or use a matching finsentinel release")

    # -- writing --

    def record_batch(self, batch_id: str, kind: str, input_hash: str, rows_in: int,
                     decisions: Sequence[Decision],
                     quarantined: Sequence[QuarantinedRow] = ()) -> BatchReceipt:
        """Append a batch's decisions and quarantined rows in one transaction.

        Re-recording a batch with the same input hash adds nothing (idempotent re-runs); with a
        different input hash it is an error, since a batch id must name one input."""
        decisions, quarantined = list(decisions), list(quarantined)
        try:
            _check_text("batch_id", batch_id)
            _check_text("kind", kind)
            _check_text("input_hash", input_hash)
        except ValueError as exc:
            raise LedgerError(str(exc)) from exc
        if rows_in != len(decisions) + len(quarantined):
            raise LedgerError(
                f"batch {batch_id!r} ({kind}): rows_in={rows_in} but {len(decisions)} decisions "
                f"+ {len(quarantined)} quarantined rows = {len(decisions) + len(quarantined)}; "
                "every input row must be either scored or quarantined")
        explanations = self._validate(batch_id, kind, decisions, quarantined)
        try:
            return retry_transient(lambda: self._append(batch_id, kind, input_hash, rows_in,
                                                        decisions, explanations, quarantined))
        except IntegrityError as exc:
            raise LedgerError(f"batch {batch_id!r} ({kind}) conflicts with records already in "
                              f"the ledger; nothing was written: {exc.orig}") from exc

    @staticmethod
    def _validate(batch_id: str, kind: str, decisions: list[Decision],
                  quarantined: list[QuarantinedRow]) -> list[str]:
        explanations, subjects, ids = [], set(), set()
        for i, d in enumerate(decisions):
            where = f"batch {batch_id!r} decision #{i} (subject {d.subject_id!r})"
            if d.batch_id != batch_id or d.kind != kind:
                raise LedgerError(f"{where}: belongs to batch {d.batch_id!r} ({d.kind}), "
                                  f"expected {batch_id!r} ({kind})")
            if d.subject_id in subjects:
                raise LedgerError(f"{where}: subject_id appears more than once in the batch")
            if d.decision_id in ids:
                raise LedgerError(f"{where}: decision_id {d.decision_id!r} is repeated")
            subjects.add(d.subject_id)
            ids.add(d.decision_id)
            try:
                # Recomputed here: the dict may have changed since the Decision was built.
                explanations.append(explanation_json(d.explanation, where))
            except ValueError as exc:
                raise LedgerError(str(exc)) from exc
        row_numbers = [q.row_number for q in quarantined]
        if len(set(row_numbers)) != len(row_numbers):
            repeated = sorted({n for n in row_numbers if row_numbers.count(n) > 1})
            raise LedgerError(f"batch {batch_id!r}: quarantined row numbers {repeated} appear "
                              "more than once (one entry per input row)")
        return explanations

    def _append(self, batch_id: str, kind: str, input_hash: str, rows_in: int,
                decisions: list[Decision], explanations: list[str],
                quarantined: list[QuarantinedRow]) -> BatchReceipt:
        with self._write() as conn:
            existing = conn.execute(
                sa.select(BATCHES.c.input_hash)
                .where(BATCHES.c.batch_id == batch_id, BATCHES.c.kind == kind)).first()
            if existing is not None:
                if existing.input_hash != input_hash:
                    raise LedgerError(
                        f"batch {batch_id!r} ({kind}) is already in the ledger with input hash "
                        f"{existing.input_hash}, but this run's input hash is {input_hash}; "
                        "a batch id must name one input — use a new batch id")
                present = conn.execute(
                    sa.select(sa.func.count()).select_from(DECISIONS)
                    .where(DECISIONS.c.batch_id == batch_id, DECISIONS.c.kind == kind)).scalar_one()
                held = conn.execute(
                    sa.select(sa.func.count()).select_from(QUARANTINE)
                    .where(QUARANTINE.c.batch_id == batch_id, QUARANTINE.c.kind == kind)
                ).scalar_one()
                return BatchReceipt(batch_id, 0, present, held, self._head(conn)[1])

            seq, prev_hash = self._head(conn)
            now = _utc_now()
            rows = []
            for d, explanation in zip(decisions, explanations, strict=True):
                seq += 1
                row = {"decision_id": d.decision_id, "batch_id": batch_id, "kind": kind,
                       "subject_id": d.subject_id, "score": d.score, "threshold": d.threshold,
                       "decision": d.decision, "model_version": d.model_version,
                       "index_version": d.index_version, "input_hash": d.input_hash,
                       "explanation": explanation, "created_at": now, "prev_hash": prev_hash}
                row["hash"] = prev_hash = record_hash(row)
                row["seq"] = seq
                rows.append(row)

            conn.execute(BATCHES.insert().values(
                batch_id=batch_id, kind=kind, input_hash=input_hash, rows_in=rows_in,
                rows_scored=len(decisions), rows_quarantined=len(quarantined), created_at=now))
            for start in range(0, len(rows), INSERT_CHUNK):
                conn.execute(DECISIONS.insert(), rows[start:start + INSERT_CHUNK])
            if quarantined:
                conn.execute(QUARANTINE.insert(), [
                    {"batch_id": batch_id, "kind": kind, "row_number": q.row_number,
                     "field": q.field, "reason": q.reason, "raw": q.raw} for q in quarantined])
            for key, value in (("head_seq", str(seq)), ("head_hash", prev_hash)):
                conn.execute(LEDGER_META.update().where(LEDGER_META.c.key == key)
                             .values(value=value))
            return BatchReceipt(batch_id, len(decisions), 0, len(quarantined), prev_hash)

    @staticmethod
    def _head(conn: Connection) -> tuple[int, str]:
        last = conn.execute(sa.select(DECISIONS.c.seq, DECISIONS.c.hash)
                            .order_by(DECISIONS.c.seq.desc()).limit(1)).first()
        return (0, GENESIS_HASH) if last is None else (int(last.seq), last.hash)

    # -- checking --

    def verify(self) -> VerifyReport:
        """Walk the chain from the genesis record and report the first record where it breaks;
        then check the chain's end against the recorded head and each batch's decision count."""
        columns = [DECISIONS.c.seq, DECISIONS.c.hash, *(DECISIONS.c[n] for n in HASHED_FIELDS)]
        checked, expected_seq, prev_hash, last_id = 0, 1, GENESIS_HASH, None
        with self._read() as conn:
            result = conn.execution_options(yield_per=2000).execute(
                sa.select(*columns).order_by(DECISIONS.c.seq))
            for row in result.mappings():
                checked += 1
                seq = int(row["seq"])
                if record_hash(row) != row["hash"]:
                    result.close()
                    return _bad(checked, row, "hash mismatch: record was edited "
                                "(its contents no longer match its hash)")
                if row["prev_hash"] != prev_hash:
                    gap = (f"; seq {expected_seq} expected here" if seq != expected_seq else "")
                    result.close()
                    return _bad(checked, row, "prev_hash does not match the previous record: a "
                                f"record was deleted, inserted or reordered{gap}")
                if seq != expected_seq:
                    result.close()
                    return _bad(checked, row, f"seq jumps from {expected_seq - 1} to {seq}: "
                                "records were renumbered")
                prev_hash, expected_seq, last_id = row["hash"], seq + 1, row["decision_id"]
            last_seq = expected_seq - 1

            meta = dict(conn.execute(sa.select(LEDGER_META.c.key, LEDGER_META.c.value)).all())
            head_seq = int(meta.get("head_seq", last_seq))
            head_hash = meta.get("head_hash", prev_hash)
            if last_seq < head_seq:
                return VerifyReport(False, checked, last_seq + 1, None,
                                    f"records from seq {last_seq + 1} to {head_seq} are missing: "
                                    "the ledger head was recorded there, so records were deleted "
                                    "from the end")
            if last_seq > head_seq:
                extra = conn.execute(sa.select(DECISIONS.c.seq, DECISIONS.c.decision_id)
                                     .where(DECISIONS.c.seq == head_seq + 1)).one()
                return VerifyReport(False, checked, int(extra.seq), extra.decision_id,
                                    f"record is past the recorded ledger head (seq {head_seq}): "
                                    "it was inserted outside the ledger")
            if prev_hash != head_hash:
                return VerifyReport(False, checked, last_seq or None, last_id,
                                    f"the chain ends in hash {prev_hash} but the recorded head "
                                    f"is {head_hash}: the last record was replaced")

            problem = self._batch_count_problem(conn)
            if problem is not None:
                return VerifyReport(False, checked, *problem)
        return VerifyReport(True, checked, None, None,
                            f"chain of {checked} records verified; head {prev_hash}")

    @staticmethod
    def _batch_count_problem(conn: Connection) -> tuple[int | None, str | None, str] | None:
        counts = conn.execute(
            sa.select(DECISIONS.c.batch_id, DECISIONS.c.kind, sa.func.count().label("n"),
                      sa.func.min(DECISIONS.c.seq).label("first"))
            .group_by(DECISIONS.c.batch_id, DECISIONS.c.kind)).all()
        held = {(r.batch_id, r.kind): (int(r.n), int(r.first)) for r in counts}
        recorded = {(r.batch_id, r.kind): int(r.rows_scored) for r in conn.execute(
            sa.select(BATCHES.c.batch_id, BATCHES.c.kind, BATCHES.c.rows_scored))}
        problems = []
        for key in held.keys() | recorded.keys():
            n, first = held.get(key, (0, None))
            if key not in recorded:
                problems.append((first, f"decisions of batch {key[0]!r} ({key[1]}) were never "
                                        "recorded as a batch: inserted outside the ledger"))
            elif n != recorded[key]:
                problems.append((first, f"batch {key[0]!r} ({key[1]}) holds {n} decisions but "
                                        f"was recorded with {recorded[key]}: records were "
                                        "deleted or inserted"))
        if not problems:
            return None
        first, reason = min(problems, key=lambda p: (p[0] is None, p[0] or 0))
        decision_id = None
        if first is not None:
            decision_id = conn.execute(sa.select(DECISIONS.c.decision_id)
                                       .where(DECISIONS.c.seq == first)).scalar_one()
        return first, decision_id, reason

    # -- reading --

    def decisions(self, batch_id: str | None = None, kind: str | None = None
                  ) -> list[dict[str, Any]]:
        """Decisions in ledger order, with the explanation parsed back into a dict."""
        query = sa.select(DECISIONS).order_by(DECISIONS.c.seq)
        if batch_id is not None:
            query = query.where(DECISIONS.c.batch_id == batch_id)
        if kind is not None:
            query = query.where(DECISIONS.c.kind == kind)
        with self._read() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        for row in rows:
            row["explanation"] = json.loads(row["explanation"])
        return rows

    def batches(self) -> list[dict[str, Any]]:
        query = sa.select(BATCHES).order_by(BATCHES.c.created_at, BATCHES.c.batch_id,
                                            BATCHES.c.kind)
        with self._read() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def quarantined(self, batch_id: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(QUARANTINE).order_by(QUARANTINE.c.batch_id, QUARANTINE.c.kind,
                                               QUARANTINE.c.row_number)
        if batch_id is not None:
            query = query.where(QUARANTINE.c.batch_id == batch_id)
        with self._read() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def head_hash(self) -> str:
        with self._read() as conn:
            return self._head(conn)[1]

    def count(self) -> int:
        with self._read() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(DECISIONS)).scalar_one()


def _bad(checked: int, row: Mapping[str, Any], reason: str) -> VerifyReport:
    return VerifyReport(False, checked, int(row["seq"]), row["decision_id"], reason)

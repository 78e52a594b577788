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

Schema version 2 adds, per decision, the scored row's ``inputs`` (canonical input fields, full
precision features, the exact query vector: what a replay needs). ``inputs`` is hashed into the
record when present, so version-1 records, which have none, keep their hashes and still verify.
It also adds analysts' reviews in ``feedback``, an append-only table with its own hash chain: a
review names the decision and that decision's hash, so it is bound to exactly what was reviewed,
while the decision chain keeps one gap-free record per automated decision (batch counts and
``seq`` gaps stay evidence of deletion). Opening an older ledger applies :data:`MIGRATIONS` in
order, under the same lock as appends, and records each step in ``ledger_meta``.

:meth:`Ledger.verify` can check a created_at range (including the link into it from the record
before), and compares the chains with :class:`Anchor` s — day heads kept outside the database —
which a ledger rebuilt from scratch with recomputed hashes cannot match.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring
from numbers import Real
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from pipeline.settings import WORKDIR_ENV

DEFAULT_DB_ENV = "FINSENTINEL_DB"
DEFAULT_WORKDIR = Path("finsentinel-work")
DEFAULT_DB_FILE = "ledger.sqlite"
SCHEMA_VERSION = "3"
GENESIS_HASH = "0" * 64
DECISION_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://finsentinel/ledger/decision")
BUSY_TIMEOUT_S = 30.0
# pg_advisory_xact_lock key shared by every ledger writer in a database ("FSLEDGER" in ASCII).
PG_LOCK_KEY = 0x46534C4544474552
INSERT_CHUNK = 5000
# Ids per IN (...) list in one read query (PostgreSQL allows 65,535 parameters a statement).
ID_CHUNK = 10_000

# Fields hashed into each record, in the order the canonical JSON sorts them anyway.
HASHED_FIELDS = ("batch_id", "created_at", "decision", "decision_id", "explanation",
                 "index_version", "input_hash", "kind", "model_version", "prev_hash", "score",
                 "subject_id", "threshold")
# Hashed only when not null (schema v2): version-1 records have none and keep their hashes.
OPTIONAL_HASHED_FIELDS = ("inputs", "subject_time")
FEEDBACK_HASHED_FIELDS = ("comment", "created_at", "decision_hash", "decision_id", "feedback_id",
                          "kind", "label", "prev_hash", "reviewer", "subject_id")
# What a reviewer may say about a decision, by decision kind (others: REVIEW_LABELS_OTHER).
REVIEW_LABELS = {"fraud": ("confirmed-fraud", "false-positive")}
REVIEW_LABELS_OTHER = ("confirmed", "incorrect")
MAX_COMMENT_CHARS = 10_000
# What Ledger.batch_outcomes reads of each decision: enough to tell a re-run's decisions apart.
OUTCOME_FIELDS = ("subject_id", "decision", "score", "threshold", "index_version",
                  "model_version")

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
    sa.Column("inputs", sa.Text, nullable=True),  # schema v2; null in version-1 records
    # Schema v3: when the subject happened (a transaction's time, an article's publication),
    # ISO-8601 UTC like created_at; null in older records.
    sa.Column("subject_time", sa.Text, nullable=True),
    sa.UniqueConstraint("kind", "batch_id", "subject_id", name="uq_decisions_kind_batch_subject"),
    # The dashboard's day queues (see READ_INDEXES).
    sa.Index("ix_decisions_kind_created_at", "kind", "created_at"),
    sa.Index("ix_decisions_kind_subject_time", "kind", "subject_time"),
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


def _feedback_table_v2(metadata: sa.MetaData) -> sa.Table:
    """The feedback table as schema version 2 defines it (migration 1 -> 2 creates this shape;
    a later change to it needs its own migration step)."""
    return sa.Table(
        "feedback", metadata,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("feedback_id", sa.Text, nullable=False, unique=True),
        sa.Column("decision_id", sa.Text, nullable=False, index=True),
        sa.Column("decision_hash", sa.CHAR(64), nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("subject_id", sa.Text, nullable=False, index=True),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False, index=True),
        sa.Column("prev_hash", sa.CHAR(64), nullable=False),
        sa.Column("hash", sa.CHAR(64), nullable=False),
    )


FEEDBACK = _feedback_table_v2(METADATA)

# Read-side indexes (the dashboard's paged queries). Not part of the schema version: adding one
# changes no record and older releases read the ledger unchanged, so opening a ledger creates any
# that are missing (under the write lock, once) instead of bumping SCHEMA_VERSION.
READ_INDEXES: tuple[sa.Index, ...] = tuple(
    i for i in DECISIONS.indexes
    if i.name in ("ix_decisions_kind_created_at", "ix_decisions_kind_subject_time"))


# --- migrations ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    """One schema step, from ``version`` to ``version + 1``; ``apply`` runs inside the open
    transaction that holds the ledger's write lock, so it is atomic and runs once."""

    version: str
    description: str
    apply: Callable[[Connection], None]


def _migrate_1_to_2(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE decisions ADD COLUMN inputs TEXT"))
    _feedback_table_v2(sa.MetaData()).create(conn)
    conn.execute(LEDGER_META.insert(), [{"key": "feedback_head_seq", "value": "0"},
                                        {"key": "feedback_head_hash", "value": GENESIS_HASH}])


def _migrate_2_to_3(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE decisions ADD COLUMN subject_time TEXT"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration("1", "decisions.inputs (replay inputs, hashed when present); feedback hash chain",
              _migrate_1_to_2),
    Migration("2", "decisions.subject_time (when the transaction or article happened, UTC; "
                   "hashed when present)", _migrate_2_to_3),
)


# --- records ------------------------------------------------------------------------------

def _check_text(name: str, value: Any, where: str = "") -> str:
    """Non-empty str without NUL (PostgreSQL text cannot hold NUL; SQLite would, silently)
    and without lone surrogates (neither database can store them)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{prefix}{name} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise ValueError(f"{prefix}{name} contains a NUL character, which cannot be stored")
    _check_utf8(name, value, where)
    return value


def _check_utf8(name: str, text: str, where: str = "", verb: str = "contains") -> None:
    """Refuse text that has no UTF-8 form: a lone surrogate (bytes decoded with
    surrogateescape, a surrogate pair cut in half), which neither database can store and the
    record hash cannot be made of."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} {verb} a lone surrogate "
                         f"({text[exc.start]!r} at position {exc.start}), which cannot be "
                         "stored as UTF-8") from None


def _finite_float(name: str, value: Any, where: str) -> float:
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, Real)):
        raise ValueError(f"{where}: {name} must be a real number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int (or Fraction) beyond the largest float
        number = math.inf if value > 0 else -math.inf
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


def _object_text(name: str, text: Any, where: str) -> str:
    """A producer's ready-made JSON object text, as it will be stored and hashed."""
    if not (isinstance(text, str) and text.startswith("{") and "\x00" not in text):
        raise ValueError(f"{where}: encoded {name} must be a JSON object's text")
    _check_utf8(f"encoded {name}", text, where)
    return text


def explanation_json(explanation: Mapping[str, Any], where: str = "explanation") -> str:
    if not isinstance(explanation, Mapping):
        raise ValueError(f"{where}: explanation must be a dict, got {type(explanation).__name__}")
    try:
        text = canonical_json(dict(explanation))
    except ValueError as exc:  # allow_nan=False
        raise ValueError(f"{where}: explanation contains NaN or infinity ({exc}); "
                         "replace it with null or a finite number") from exc
    except TypeError as exc:
        raise ValueError(f"{where}: explanation is not JSON-serialisable ({exc})") from exc
    _check_utf8("explanation", text, where)
    return text


def inputs_json(inputs: Mapping[str, Any], where: str = "inputs") -> str:
    if not isinstance(inputs, Mapping):
        raise ValueError(f"{where}: inputs must be a dict, got {type(inputs).__name__}")
    try:
        text = canonical_json(dict(inputs))
    except ValueError as exc:
        raise ValueError(f"{where}: inputs contain NaN or infinity ({exc}); record them as "
                         "null") from exc
    except TypeError as exc:
        raise ValueError(f"{where}: inputs are not JSON-serialisable ({exc})") from exc
    _check_utf8("inputs", text, where, verb="contain")
    return text


def decision_id_for(kind: str, batch_id: str, subject_id: str) -> str:
    """Deterministic id, so re-running a batch produces the same ids: the text of
    ``uuid.uuid5(DECISION_NAMESPACE, "kind:batch_id:subject_id")``, made here without a UUID
    object (it is made once per decision)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{kind}:{batch_id}:{subject_id}"
                                    .encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NAMESPACE_BYTES = DECISION_NAMESPACE.bytes
# The hashed fields in canonical (sorted) order, each with its JSON key text.
_MATERIAL = tuple((name, encode_basestring(name) + ":", name in OPTIONAL_HASHED_FIELDS,
                   name in ("score", "threshold"))
                  for name in sorted(HASHED_FIELDS + OPTIONAL_HASHED_FIELDS))


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the hashed fields (floats by repr, as Python reads them
    back from either backend; the explanation as its stored canonical JSON text).

    The JSON is written field by field (the text :func:`canonical_json` makes of the same
    fields, which any other value type falls back to): it is made for every record written
    and every record verified."""
    parts = []
    for name, key, optional, is_float in _MATERIAL:
        value = record.get(name) if optional else record[name]
        if value is None and optional:
            continue
        if is_float:
            number = float(value)
            if not math.isfinite(number):
                return _canonical_record_hash(record)  # raises, as canonical_json does
            parts.append(key + float.__repr__(number))
        elif type(value) is str:
            parts.append(key + encode_basestring(value))
        else:
            return _canonical_record_hash(record)
    return hashlib.sha256(("{" + ",".join(parts) + "}").encode("utf-8")).hexdigest()


def _canonical_record_hash(record: Mapping[str, Any]) -> str:
    """:func:`record_hash` through :func:`canonical_json`: its definition."""
    material = {name: record[name] for name in HASHED_FIELDS}
    material["score"] = float(material["score"])
    material["threshold"] = float(material["threshold"])
    for name in OPTIONAL_HASHED_FIELDS:
        if record.get(name) is not None:
            material[name] = record[name]
    return hashlib.sha256(canonical_json(material).encode("utf-8")).hexdigest()


def feedback_hash(record: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a review's fields (all but ``seq`` and ``hash``)."""
    material = {name: record[name] for name in FEEDBACK_HASHED_FIELDS}
    return hashlib.sha256(canonical_json(material).encode("utf-8")).hexdigest()


def review_labels(kind: str) -> tuple[str, ...]:
    return REVIEW_LABELS.get(kind, REVIEW_LABELS_OTHER)


@dataclass(frozen=True)
class Decision:
    """One automated decision about one subject (a transaction, an article) in one batch.

    ``explanation`` and ``inputs`` are dicts; a producer that already holds them as JSON
    texts (the fraud scorer makes them column-wise, see pipeline.scoring) passes ``encoded``
    instead and ``explanation=None``."""

    batch_id: str
    kind: str
    subject_id: str
    score: float
    threshold: float
    decision: str
    model_version: str
    index_version: str
    input_hash: str
    explanation: dict | None
    decision_id: str = ""
    # What a replay needs (schema v2): the scored row's fields, features and query vector.
    inputs: dict | None = None
    # When the subject happened (naive: UTC); the dashboard's days are these days.
    subject_time: datetime | None = None
    # (explanation JSON, inputs JSON or None) as made by the producer.
    encoded: tuple[str, str | None] | None = field(default=None, repr=False, compare=False)
    # The JSON of explanation and inputs, made once here: it is what the ledger records and
    # hashes, so a dict changed after the Decision was made changes nothing.
    recorded_json: tuple[str, str | None] = field(default=("", None), init=False,
                                                  repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"decision for subject {self.subject_id!r}"
        for name in ("batch_id", "kind", "subject_id", "decision", "model_version",
                     "index_version", "input_hash"):
            _check_text(name, getattr(self, name), where)
        object.__setattr__(self, "score", _finite_float("score", self.score, where))
        object.__setattr__(self, "threshold", _finite_float("threshold", self.threshold, where))
        if self.encoded is not None:
            explanation, inputs = self.encoded
            recorded = (_object_text("explanation", explanation, where),
                        None if inputs is None else _object_text("inputs", inputs, where))
        elif self.explanation is None:
            raise ValueError(f"{where}: an explanation is required (a dict, or encoded text)")
        else:
            recorded = (explanation_json(self.explanation, where),
                        None if self.inputs is None else inputs_json(self.inputs, where))
        object.__setattr__(self, "recorded_json", recorded)
        if self.subject_time is not None and not isinstance(self.subject_time, datetime):
            raise ValueError(f"{where}: subject_time must be a datetime, got "
                             f"{type(self.subject_time).__name__}")
        if self.decision_id:
            _check_text("decision_id", self.decision_id, where)
        else:
            object.__setattr__(self, "decision_id",
                               decision_id_for(self.kind, self.batch_id, self.subject_id))


@dataclass(frozen=True)
class DecisionStream:
    """A batch's decisions made a chunk at a time while the ledger writes them (a large batch
    never holds every decision in memory). ``chunks`` is called once per write attempt, so a
    retried transaction makes them again."""

    count: int
    chunks: Callable[[], Iterable[Sequence[Decision]]]


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
        _check_utf8("raw", self.raw, where)


@dataclass(frozen=True)
class BatchReceipt:
    batch_id: str
    added: int
    already_present: int
    quarantined: int
    head_hash: str


@dataclass(frozen=True)
class VerifyReport:
    """``chain`` names where the first problem is: "decisions", "feedback" or "anchors"; for a
    feedback record ``first_bad_decision_id`` holds its feedback id."""

    ok: bool
    checked: int
    first_bad_seq: int | None
    first_bad_decision_id: str | None
    reason: str
    chain: str = "decisions"
    feedback_checked: int = 0


@dataclass(frozen=True)
class FeedbackReceipt:
    feedback_id: str
    seq: int
    decision_id: str
    kind: str
    subject_id: str
    label: str
    reviewer: str
    created_at: str
    hash: str


@dataclass(frozen=True)
class Anchor:
    """A chain's head at the end of one UTC day: kept outside the database (an export), it
    lets :meth:`Ledger.verify` tell a ledger rebuilt with recomputed hashes from the original."""

    chain: str  # "decisions" | "feedback"
    day: str  # YYYY-MM-DD (UTC, from created_at)
    last_seq: int
    head_hash: str
    records: int  # records of that day
    # Decision anchors: a digest of every batch row and quarantined row recorded up to the
    # anchor's record (see Ledger._batch_digests). Those tables are not chained, so this is
    # what lets the anchors catch an edit to them; None in anchors written before it existed.
    batches: str | None = None


# --- connection handling ------------------------------------------------------------------

def resolve_db_url(url: str | None = None, *, workdir: Path | None = None) -> str:
    """explicit url > $FINSENTINEL_DB > sqlite:///<workdir, else $FINSENTINEL_WORKDIR, else
    ./finsentinel-work>/ledger.sqlite (the directory is created): the scheduled jobs, which put
    everything else under $FINSENTINEL_WORKDIR, and the dashboard then share one ledger
    whatever folder each was started from. Plain ``postgresql://``/``postgres://`` URLs are
    rewritten to the psycopg 3 driver."""
    chosen = url or os.environ.get(DEFAULT_DB_ENV) or None
    if chosen is None:
        path = _default_db_file(workdir)
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path.resolve()}"
    for scheme in ("postgresql://", "postgres://"):
        if chosen.startswith(scheme):
            return "postgresql+psycopg://" + chosen[len(scheme):]
    return chosen


def missing_sqlite_ledger(url: str | None = None) -> Path | None:
    """The file of the SQLite ledger ``url`` names (resolved as :func:`resolve_db_url` does:
    explicit, $FINSENTINEL_DB, or the default one in $FINSENTINEL_WORKDIR) when it does not
    exist yet; None when it exists or the ledger is not a SQLite file. Creates nothing, so a
    command that reads a ledger can refuse a mistyped path instead of opening an empty one."""
    chosen = url or os.environ.get(DEFAULT_DB_ENV) or None
    if chosen is None:
        path = _default_db_file()
    else:
        try:
            parsed = make_url(chosen)
        except ArgumentError:
            return None  # opening the ledger says what is wrong with it
        if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "",
                                                                             ":memory:"):
            return None
        path = Path(parsed.database)
    return None if path.exists() else path.resolve()


def _default_db_file(workdir: Path | None = None) -> Path:
    directory = Path(workdir) if workdir is not None else Path(
        os.environ.get(WORKDIR_ENV, "").strip() or DEFAULT_WORKDIR)  # blank: unset
    return directory / DEFAULT_DB_FILE


def naming_sqlite_file(file: Path | None, fn: Callable[[], T]) -> T:
    """Call ``fn``; a SQLite error that does not say which file or why (a folder or file that
    cannot be written) is raised as a LedgerError naming ``file`` and the cause."""
    try:
        return fn()
    except OperationalError as exc:
        error = _sqlite_error(file, exc) if file is not None else None
        if error is None:
            raise
        raise error from exc


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


def _sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names; None for another database, in-memory or URI names."""
    parsed = make_url(url)
    database = parsed.database
    if (parsed.get_backend_name() != "sqlite" or not database or database == ":memory:"
            or database.startswith("file:")):
        return None
    return Path(database)


def _not_a_folder(folder: Path) -> Path | None:
    """The nearest of ``folder`` and its parents that exists as something other than a folder
    (a regular file in the way), if any."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def sqlite_write_problem(path: Path) -> str | None:
    """Why SQLite cannot write the ledger file ``path``, found by trying (so it also holds for
    root, whom file modes do not stop): a regular file where a folder of the path should be,
    a folder that cannot be written in (SQLite creates the database and its -wal/-shm files
    beside it), or a read-only database file. None when nothing is found."""
    import tempfile

    folder = path.parent
    blocker = _not_a_folder(folder)
    if blocker is not None:
        return f"{blocker} is a file, not a folder"
    if path.is_dir():
        return "it is a folder, not a database file"
    if path.exists():
        try:
            with open(path, "r+b"):  # opened for writing, nothing written
                pass
        except OSError as exc:
            return f"the file is read-only ({exc.strerror or exc})"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return (f"its folder {folder} is not writable ({exc.strerror or exc}); SQLite "
                "creates the database and its -wal and -shm files in that folder")
    return None


def _sqlite_error(path: Path, exc: BaseException) -> LedgerError | None:
    """A LedgerError naming ``path`` and what is wrong with it, for an error SQLite gave
    without naming the file ("unable to open database file", "attempt to write a readonly
    database"); None when the error is of another kind."""
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    if not any(text in message.lower() for text in ("unable to open database file",
                                                    "readonly database")):
        return None
    problem = sqlite_write_problem(path)
    return LedgerError(f"cannot {'write' if problem else 'open'} the SQLite ledger {path}: "
                       f"{problem or message}"
                       + (f" (SQLite: {message})" if problem else "")
                       + "; give a writable place with --db sqlite:///PATH or "
                       f"${DEFAULT_DB_ENV}")


def _sqlite_engine(url: str) -> Engine:
    path = _sqlite_file(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocker = _not_a_folder(path.parent)
            why = (f"{blocker} is a file, not a folder" if blocker is not None
                   else exc.strerror or str(exc))
            raise LedgerError(f"cannot create the folder {path.parent} of the SQLite ledger "
                              f"{path}: {why}") from exc
        _check_sqlite_header(path)
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

    # SQLAlchemy's pysqlite recipe: stop the driver emitting its own (deferred) BEGIN, so that
    # write transactions can take the write lock up front with BEGIN IMMEDIATE.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 30000")
            # A decision record is about 4 kB (explanation and inputs): on the default 4 kB
            # pages nearly every one spills into overflow pages. Takes effect only when the
            # database is created (before WAL is set); an existing ledger keeps its size.
            cursor.execute("PRAGMA page_size = 16384")
            _use_wal(cursor)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")

    return engine


SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite_header(path: Path) -> None:
    """Refuse a file at the ledger path that is not a SQLite database (a wrong path at a notes
    file, a truncated copy): SQLite would turn a tiny one into an empty ledger, which then
    verifies as an intact chain, and fail on a larger one without naming it. An empty file is
    a database SQLite has not written yet."""
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return  # not there yet (created), or a problem reported where it is met
    if head and head != SQLITE_HEADER:
        raise LedgerError(f"{path} is not a SQLite database (it does not start with SQLite's "
                          f"header; first bytes {head[:8]!r}): is the ledger path right?")


def _use_wal(cursor: Any) -> None:
    """Switch a SQLite database to WAL once. The switch needs the database to itself and
    SQLite answers "locked" at once rather than waiting, so two processes opening a new
    ledger together wait here for each other (up to the busy timeout); whichever switches
    first, the other then finds WAL already set."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() not in ("wal", "memory"):
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as exc:  # sqlite3.OperationalError, without importing the driver
            if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.02 + 0.05 * random.random())


def engine_for(url: str) -> Engine:
    """The engine every table in the ledger's database goes through: on SQLite, WAL (readers
    never block the writer) and write transactions that take the lock up front (see
    :func:`write_transaction`); on PostgreSQL, connections checked before use."""
    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return sa.create_engine(url, pool_pre_ping=True)


@contextmanager
def write_transaction(engine: Engine, *, lock_key: int | None = None) -> Iterator[Connection]:
    """One write transaction on an :func:`engine_for` engine. SQLite takes its write lock at
    BEGIN (BEGIN IMMEDIATE), so two writers queue instead of one failing on a lock upgrade;
    on PostgreSQL, ``lock_key`` serialises writers with a transaction-level advisory lock."""
    dialect = engine.dialect.name
    with engine.connect() as conn:
        if dialect == "sqlite":
            conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            if dialect == "postgresql":
                conn.execute(sa.select(sa.func.set_config(
                    "lock_timeout", f"{int(BUSY_TIMEOUT_S * 1000)}ms", True)))
                if lock_key is not None:
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
                        sa.literal(lock_key, sa.BigInteger))))
            yield conn


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _stamp_after(previous: str | None) -> str:
    """The time stamp of a record appended after one stamped ``previous`` (under the append
    lock): now, but never earlier than, nor equal to, ``previous`` — writers on hosts whose
    clocks disagree (or a clock stepped back) still stamp in chain order, and two batches never
    share a stamp."""
    now = _utc_now()
    if previous is None:
        return now
    try:
        last = datetime.fromisoformat(previous)
        if last.tzinfo is None:
            last = last.replace(tzinfo=UTC)
        if datetime.fromisoformat(now) > last:
            return now
        return (last + timedelta(microseconds=1)).astimezone(UTC).isoformat(
            timespec="microseconds")
    except (ValueError, OverflowError):  # a stamp this code did not write: keep the clock's
        return now


# --- the ledger ---------------------------------------------------------------------------

class Ledger:
    """The decision ledger in one database. Use as a context manager, or call :meth:`close`."""

    def __init__(self, url: str | None = None):
        self.url = resolve_db_url(url)
        self._engine = engine_for(self.url)
        self._dialect = self._engine.dialect.name
        self._file = _sqlite_file(self.url)
        try:
            self._named(lambda: retry_transient(self._init_schema))
        except BaseException:
            self._engine.dispose()
            raise

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._engine.dispose()

    def __repr__(self) -> str:
        from pipeline.privacy import redact_url

        return f"Ledger({redact_url(self.url)!r})"

    def _named(self, fn: Callable[[], T]) -> T:
        return naming_sqlite_file(self._file, fn)

    def _write(self) -> AbstractContextManager[Connection]:
        """One serialised write transaction: no other writer runs until it commits."""
        return write_transaction(self._engine, lock_key=PG_LOCK_KEY)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """One read transaction over a single snapshot (several queries agree with each other)."""
        with self._engine.connect() as conn:
            if self._dialect == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def _init_schema(self) -> None:
        """Create a new ledger, or bring an older one up to :data:`SCHEMA_VERSION`. Under the
        write lock: of several processes opening one old ledger, one migrates, the rest wait and
        find it current."""
        with self._write() as conn:
            version = None
            if sa.inspect(conn).has_table(LEDGER_META.name):
                version = conn.execute(sa.select(LEDGER_META.c.value).where(
                    LEDGER_META.c.key == "schema_version")).scalar_one_or_none()
            if version is None:
                METADATA.create_all(conn)
                conn.execute(LEDGER_META.insert(), [
                    {"key": "schema_version", "value": SCHEMA_VERSION},
                    {"key": "head_seq", "value": "0"},
                    {"key": "head_hash", "value": GENESIS_HASH},
                    {"key": "feedback_head_seq", "value": "0"},
                    {"key": "feedback_head_hash", "value": GENESIS_HASH},
                    {"key": "created_schema_version", "value": SCHEMA_VERSION},
                ])
                return
            steps = {m.version: m for m in MIGRATIONS}
            known = {*steps, SCHEMA_VERSION}
            if version not in known:
                raise LedgerError(f"{self!r}: ledger schema_version is {version!r}, but this "
                                  f"code reads version {SCHEMA_VERSION!r} (and migrates "
                                  f"{', '.join(sorted(steps)) or 'none'}); it was written by "
                                  "another finsentinel release — use a matching one")
            while version != SCHEMA_VERSION:
                step = steps[version]
                step.apply(conn)
                new = str(int(version) + 1)
                conn.execute(LEDGER_META.insert().values(
                    key=f"migration_{version}_to_{new}",
                    value=f"{_utc_now()} {step.description}"))
                conn.execute(LEDGER_META.update().where(LEDGER_META.c.key == "schema_version")
                             .values(value=new))
                version = new
            self._ensure_read_indexes(conn)

    @staticmethod
    def _ensure_read_indexes(conn: Connection) -> None:
        """Create the :data:`READ_INDEXES` an older ledger lacks, noting each in ledger_meta."""
        present = {i["name"] for i in sa.inspect(conn).get_indexes(DECISIONS.name)}
        for index in READ_INDEXES:
            if index.name not in present:
                index.create(conn, checkfirst=True)
                key = f"index_{index.name}"
                conn.execute(LEDGER_META.delete().where(LEDGER_META.c.key == key))
                conn.execute(LEDGER_META.insert().values(key=key, value=f"{_utc_now()} created"))

    def read(self) -> AbstractContextManager[Connection]:
        """One read transaction over a single snapshot, for readers that build their own
        queries over the ledger's tables (the dashboard's paged queries)."""
        return self._read()

    def meta(self) -> dict[str, str]:
        """The ledger_meta table: schema version, chain heads, migrations applied."""
        with self._read() as conn:
            return dict(conn.execute(sa.select(LEDGER_META.c.key, LEDGER_META.c.value)).all())

    # -- writing --

    def record_batch(self, batch_id: str, kind: str, input_hash: str, rows_in: int,
                     decisions: Sequence[Decision] | DecisionStream,
                     quarantined: Sequence[QuarantinedRow] = ()) -> BatchReceipt:
        """Append a batch's decisions and quarantined rows in one transaction.

        Re-recording a batch with the same input hash adds nothing (idempotent re-runs; a
        :class:`DecisionStream` is then never made); with a different input hash it is an
        error, since a batch id must name one input."""
        stream = (decisions if isinstance(decisions, DecisionStream)
                  else DecisionStream(len(decisions), lambda d=list(decisions): [d]))
        quarantined = list(quarantined)
        try:
            _check_text("batch_id", batch_id)
            _check_text("kind", kind)
            _check_text("input_hash", input_hash)
        except ValueError as exc:
            raise LedgerError(str(exc)) from exc
        if rows_in != stream.count + len(quarantined):
            raise LedgerError(
                f"batch {batch_id!r} ({kind}): rows_in={rows_in} but {stream.count} decisions "
                f"+ {len(quarantined)} quarantined rows = {stream.count + len(quarantined)}; "
                "every input row must be either scored or quarantined")
        self._validate_quarantine(batch_id, quarantined)
        try:
            return self._named(lambda: retry_transient(lambda: self._append(
                batch_id, kind, input_hash, rows_in, stream, quarantined)))
        except IntegrityError as exc:
            raise LedgerError(f"batch {batch_id!r} ({kind}) conflicts with records already in "
                              f"the ledger; nothing was written: {exc.orig}") from exc

    @staticmethod
    def _validate(batch_id: str, kind: str, decisions: Sequence[Decision], first: int,
                  seen: set[str]) -> None:
        """Check one chunk of the batch's decisions (numbered from ``first``); ``seen``
        collects the subjects so far."""
        ids = set()
        for i, d in enumerate(decisions, first):
            where = f"batch {batch_id!r} decision #{i} (subject {d.subject_id!r})"
            if d.batch_id != batch_id or d.kind != kind:
                raise LedgerError(f"{where}: belongs to batch {d.batch_id!r} ({d.kind}), "
                                  f"expected {batch_id!r} ({kind})")
            if d.subject_id in seen:
                raise LedgerError(f"{where}: subject_id appears more than once in the batch")
            if d.decision_id in ids:
                raise LedgerError(f"{where}: decision_id {d.decision_id!r} is repeated")
            seen.add(d.subject_id)
            ids.add(d.decision_id)

    @staticmethod
    def _validate_quarantine(batch_id: str, quarantined: list[QuarantinedRow]) -> None:
        row_numbers = [q.row_number for q in quarantined]
        if len(set(row_numbers)) != len(row_numbers):
            repeated = sorted({n for n in row_numbers if row_numbers.count(n) > 1})
            raise LedgerError(f"batch {batch_id!r}: quarantined row numbers {repeated} appear "
                              "more than once (one entry per input row)")

    def _append(self, batch_id: str, kind: str, input_hash: str, rows_in: int,
                stream: DecisionStream, quarantined: list[QuarantinedRow]) -> BatchReceipt:
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

            seq, prev_hash, last_at = self._append_point(conn, _DECISION_CHAIN)
            latest = conn.execute(sa.select(sa.func.max(BATCHES.c.created_at))).scalar()
            now = _stamp_after(max(filter(None, (last_at, latest)), default=None))
            conn.execute(BATCHES.insert().values(
                batch_id=batch_id, kind=kind, input_hash=input_hash, rows_in=rows_in,
                rows_scored=stream.count, rows_quarantined=len(quarantined), created_at=now))
            written, subjects = 0, set()
            for chunk in stream.chunks():
                self._validate(batch_id, kind, chunk, written, subjects)
                rows = []
                for d in chunk:
                    seq += 1
                    explanation, inputs = d.recorded_json
                    row = {"decision_id": d.decision_id, "batch_id": batch_id, "kind": kind,
                           "subject_id": d.subject_id, "score": d.score,
                           "threshold": d.threshold, "decision": d.decision,
                           "model_version": d.model_version, "index_version": d.index_version,
                           "input_hash": d.input_hash, "explanation": explanation,
                           "inputs": inputs, "created_at": now, "prev_hash": prev_hash,
                           "subject_time": _iso_bound(d.subject_time, "subject_time")}
                    row["hash"] = prev_hash = record_hash(row)
                    row["seq"] = seq
                    rows.append(row)
                _insert_decisions(conn, rows)
                written += len(rows)
            if written != stream.count:  # the transaction rolls back: nothing is written
                raise LedgerError(f"batch {batch_id!r} ({kind}): {written} decisions were made "
                                  f"but {stream.count} announced; nothing was written")
            if quarantined:
                conn.execute(QUARANTINE.insert(), [
                    {"batch_id": batch_id, "kind": kind, "row_number": q.row_number,
                     "field": q.field, "reason": q.reason, "raw": q.raw} for q in quarantined])
            for key, value in (("head_seq", str(seq)), ("head_hash", prev_hash)):
                conn.execute(LEDGER_META.update().where(LEDGER_META.c.key == key)
                             .values(value=value))
            return BatchReceipt(batch_id, written, 0, len(quarantined), prev_hash)

    @staticmethod
    def _append_point(conn: Connection, chain: _ChainSpec) -> tuple[int, str, str | None]:
        """(seq, hash, created_at) of the chain's last record, where the next one links on
        (0, genesis, None for an empty chain), checked against the head ledger_meta recorded
        with it. Carrying on from a table whose end was cut off (or extended outside the
        ledger) would renumber over the hole and move the recorded head past it, and the
        ledger would verify again: the evidence is kept instead, and nothing is written."""
        table = chain.table
        last = conn.execute(sa.select(table.c.seq, table.c.hash, table.c.created_at)
                            .order_by(table.c.seq.desc()).limit(1)).first()
        seq, hash_, created_at = ((0, GENESIS_HASH, None) if last is None
                                  else (int(last.seq), last.hash, last.created_at))
        meta = dict(conn.execute(sa.select(LEDGER_META.c.key, LEDGER_META.c.value)
                                 .where(LEDGER_META.c.key.in_(chain.head_keys))).all())
        head_seq, head_hash = (meta.get(key) for key in chain.head_keys)
        if (head_seq is not None and head_seq != str(seq)) or (
                head_hash is not None and head_hash != hash_):
            raise LedgerError(
                f"the {chain.name} chain ends at seq {seq} (hash {hash_[:16]}…) but its recorded "
                f"head is seq {head_seq} (hash {(head_hash or '?')[:16]}…): records were "
                "deleted or added outside the ledger; nothing was written — run "
                "`finsentinel audit verify` and restore the ledger before appending")
        return seq, hash_, created_at

    @staticmethod
    def _head(conn: Connection, table: sa.Table = DECISIONS) -> tuple[int, str]:
        last = conn.execute(sa.select(table.c.seq, table.c.hash)
                            .order_by(table.c.seq.desc()).limit(1)).first()
        return (0, GENESIS_HASH) if last is None else (int(last.seq), last.hash)

    def record_feedback(self, decision_id: str, label: str, comment: str | None,
                        reviewer: str) -> FeedbackReceipt:
        """Append a reviewer's label for one decision to the feedback chain. Reviews are never
        edited: a later review of the same decision supersedes it, and both stay on record."""
        try:
            _check_text("decision_id", decision_id)
            _check_text("reviewer", reviewer, "review")
            _check_text("label", label, "review")
        except ValueError as exc:
            raise LedgerError(str(exc)) from exc
        if not reviewer.strip():  # a review must say who made it
            raise LedgerError(f"review: reviewer must name someone, got {reviewer!r}")
        reviewer = reviewer.strip()
        if comment is not None:
            if not isinstance(comment, str) or "\x00" in comment:
                raise LedgerError("review: comment must be text without NUL characters")
            if len(comment) > MAX_COMMENT_CHARS:
                raise LedgerError(f"review: comment has {len(comment):,} characters; at most "
                                  f"{MAX_COMMENT_CHARS:,} are kept")
            comment = comment if comment.strip() else None
        return self._named(lambda: retry_transient(lambda: self._append_feedback(
            decision_id, label, comment, reviewer)))

    def _append_feedback(self, decision_id: str, label: str, comment: str | None,
                         reviewer: str) -> FeedbackReceipt:
        with self._write() as conn:
            target = conn.execute(
                sa.select(DECISIONS.c.kind, DECISIONS.c.subject_id, DECISIONS.c.hash)
                .where(DECISIONS.c.decision_id == decision_id)).first()
            if target is None:
                raise LedgerError(f"no decision {decision_id!r} in the ledger: nothing to review")
            allowed = review_labels(target.kind)
            if label not in allowed:
                raise LedgerError(f"review of decision {decision_id}: label {label!r} is not "
                                  f"one for a {target.kind} decision; expected one of "
                                  f"{', '.join(allowed)}")
            seq, prev_hash, last_at = self._append_point(conn, _FEEDBACK_CHAIN)
            row = {"feedback_id": str(uuid.uuid4()), "decision_id": decision_id,
                   "decision_hash": target.hash, "kind": target.kind,
                   "subject_id": target.subject_id, "label": label, "comment": comment,
                   "reviewer": reviewer, "created_at": _stamp_after(last_at),
                   "prev_hash": prev_hash}
            row["hash"] = feedback_hash(row)
            row["seq"] = seq + 1
            conn.execute(FEEDBACK.insert().values(**row))
            for key, value in (("feedback_head_seq", str(seq + 1)),
                               ("feedback_head_hash", row["hash"])):
                conn.execute(LEDGER_META.update().where(LEDGER_META.c.key == key)
                             .values(value=value))
            return FeedbackReceipt(row["feedback_id"], seq + 1, decision_id, target.kind,
                                   target.subject_id, label, reviewer, row["created_at"],
                                   row["hash"])

    # -- checking --

    def verify(self, since: datetime | str | None = None, until: datetime | str | None = None,
               anchors: Sequence[Anchor] = ()) -> VerifyReport:
        """Walk the decision chain, then the review chain, and report the first record where
        one breaks; then check each chain's end against its recorded head, each batch's decision
        count, and every given anchor (a ledger rebuilt with recomputed hashes fails there).

        ``since`` (inclusive) and ``until`` (exclusive) limit the walk to records created in
        that range (UTC); the range's first record must still link to the record before it, so a
        break at the boundary is found too."""
        lo, hi = _iso_bound(since, "since"), _iso_bound(until, "until")
        with self._read() as conn:
            meta = dict(conn.execute(sa.select(LEDGER_META.c.key, LEDGER_META.c.value)).all())
            problem, checked, head = self._verify_chain(conn, _DECISION_CHAIN, meta, lo, hi)
            if problem is not None:
                return VerifyReport(False, checked, *problem)
            problem, reviews, _ = self._verify_chain(conn, _FEEDBACK_CHAIN, meta, lo, hi)
            if problem is None:
                problem = self._review_target_problem(conn, lo, hi)
            if problem is not None:
                return VerifyReport(False, checked, *problem, chain="feedback",
                                    feedback_checked=reviews)
            for anchor in sorted(anchors, key=lambda a: (a.chain != "decisions", a.last_seq)):
                problem = self._anchor_problem(conn, anchor)
                if problem is not None:
                    return VerifyReport(False, checked, *problem, chain=anchor.chain,
                                        feedback_checked=reviews)
            problem = self._anchor_batches_problem(conn, anchors)
            if problem is not None:
                return VerifyReport(False, checked, *problem, feedback_checked=reviews)
        scope = "" if lo is None and hi is None else " in range"
        reason = f"chain of {checked} records verified{scope}; head {head}"
        if reviews:
            reason += f"; {reviews} reviews verified"
        if anchors:
            reason += f"; {len(anchors)} anchors match"
        return VerifyReport(True, checked, None, None, reason, feedback_checked=reviews)

    def _verify_chain(self, conn: Connection, chain: _ChainSpec, meta: Mapping[str, str],
                      lo: str | None, hi: str | None
                      ) -> tuple[tuple[int | None, str | None, str] | None, int, str]:
        """(first problem as (seq, id, reason) or None, records checked, last hash walked)."""
        table = chain.table
        columns = chain.columns()
        first_seq, last_wanted = 1, None
        if lo is not None:
            first_seq = conn.execute(sa.select(sa.func.min(table.c.seq))
                                     .where(table.c.created_at >= lo)).scalar()
            if first_seq is None:  # nothing from lo on: the range starts past the chain's end
                # (or where its end was cut off): walk nothing, still check the end and head
                first_seq = (conn.execute(sa.select(sa.func.max(table.c.seq))).scalar() or 0) + 1
        # A range that reaches past the last record is checked to the chain's end and head.
        if hi is not None and conn.execute(sa.select(table.c.seq).where(
                table.c.created_at >= hi).limit(1)).first() is not None:
            last_wanted = conn.execute(sa.select(sa.func.max(table.c.seq))
                                       .where(table.c.created_at < hi)).scalar()
            if last_wanted is None or last_wanted < first_seq:
                # An empty stretch inside the chain: nothing to walk, but a batch recorded in
                # it must still hold its decisions.
                problem = None
                if chain.name == "decisions":
                    problem = self._batch_count_problem(
                        conn, (first_seq, first_seq - 1, lo, hi))
                return problem, 0, GENESIS_HASH
        prev_hash = GENESIS_HASH
        if first_seq > 1:  # the link into the range
            before = conn.execute(sa.select(*columns).where(table.c.seq == first_seq - 1)
                                  ).mappings().first()
            if before is None:
                first_id = conn.execute(sa.select(table.c[chain.id_column])
                                        .where(table.c.seq == first_seq)).scalar_one()
                return ((first_seq, first_id,
                         f"seq {first_seq - 1}, the record this range's first record links to, "
                         "is missing: a record was deleted (or records were renumbered)"),
                        0, GENESIS_HASH)
            if chain.hash_fn(before) != before["hash"]:
                return ((first_seq - 1, before[chain.id_column],
                         "hash mismatch: record was edited (its contents no longer match its "
                         "hash); it is the record this range's first record links to"),
                        0, GENESIS_HASH)
            prev_hash = before["hash"]

        query = sa.select(*columns).where(table.c.seq >= first_seq).order_by(table.c.seq)
        if last_wanted is not None:
            query = query.where(table.c.seq <= last_wanted)
        checked, expected_seq, last_id = 0, first_seq, None
        result = conn.execution_options(yield_per=2000).execute(query)
        for row in result.mappings():
            checked += 1
            seq = int(row["seq"])
            where = (seq, row[chain.id_column])
            problem = None
            if chain.hash_fn(row) != row["hash"]:
                problem = "hash mismatch: record was edited (its contents no longer match its hash)"
            elif row["prev_hash"] != prev_hash:
                gap = f"; seq {expected_seq} expected here" if seq != expected_seq else ""
                problem = ("prev_hash does not match the previous record: a record was deleted, "
                           f"inserted or reordered{gap}")
            elif seq != expected_seq:
                problem = f"seq jumps from {expected_seq - 1} to {seq}: records were renumbered"
            if problem is not None:
                result.close()
                return (*where, problem), checked, prev_hash
            prev_hash, expected_seq, last_id = row["hash"], seq + 1, row[chain.id_column]
        last_seq = expected_seq - 1

        if last_wanted is None:  # the walk reached the end: check it against the recorded head
            head_seq = int(meta.get(chain.head_keys[0], last_seq))
            head_hash = meta.get(chain.head_keys[1], prev_hash)
            if last_seq < head_seq:
                return ((last_seq + 1, None,
                         f"records from seq {last_seq + 1} to {head_seq} are missing: the ledger "
                         "head was recorded there, so records were deleted from the end"),
                        checked, prev_hash)
            if last_seq > head_seq:
                extra = conn.execute(sa.select(table.c.seq, table.c[chain.id_column])
                                     .where(table.c.seq == head_seq + 1)).one()
                return ((int(extra.seq), extra[1],
                         f"record is past the recorded ledger head (seq {head_seq}): it was "
                         "inserted outside the ledger"), checked, prev_hash)
            if prev_hash != head_hash:
                return ((last_seq or None, last_id,
                         f"the chain ends in hash {prev_hash} but the recorded head is "
                         f"{head_hash}: the last record was replaced"), checked, prev_hash)

        if chain.name == "decisions":
            seq_range = None if lo is None and hi is None else (first_seq, last_seq, lo, hi)
            problem = self._batch_count_problem(conn, seq_range)
            if problem is not None:
                return problem, checked, prev_hash
        return None, checked, prev_hash

    @staticmethod
    def _batch_count_problem(conn: Connection,
                             seq_range: tuple[int, int, str | None, str | None] | None = None
                             ) -> tuple[int | None, str | None, str] | None:
        """A batch whose decisions or quarantined rows differ from the counts it was recorded
        with, or whose counts do not add up (rows in = scored + quarantined). Quarantined rows
        are not chained: their batch's counts are what vouches for them. With a range: only
        batches with a record in it or recorded in it."""
        counts = conn.execute(
            sa.select(DECISIONS.c.batch_id, DECISIONS.c.kind, sa.func.count().label("n"),
                      sa.func.min(DECISIONS.c.seq).label("first"),
                      sa.func.max(DECISIONS.c.seq).label("last"))
            .group_by(DECISIONS.c.batch_id, DECISIONS.c.kind)).all()
        held = {(r.batch_id, r.kind): (int(r.n), int(r.first)) for r in counts}
        set_aside = {(r.batch_id, r.kind): int(r.n) for r in conn.execute(
            sa.select(QUARANTINE.c.batch_id, QUARANTINE.c.kind, sa.func.count().label("n"))
            .group_by(QUARANTINE.c.batch_id, QUARANTINE.c.kind))}
        batches = conn.execute(sa.select(
            BATCHES.c.batch_id, BATCHES.c.kind, BATCHES.c.rows_in, BATCHES.c.rows_scored,
            BATCHES.c.rows_quarantined, BATCHES.c.created_at)).all()
        recorded = {(r.batch_id, r.kind): r for r in batches}
        keys = held.keys() | recorded.keys() | set_aside.keys()
        if seq_range is not None:
            first_seq, last_seq, lo, hi = seq_range
            keys = {(r.batch_id, r.kind) for r in counts
                    if r.first <= last_seq and r.last >= first_seq}
            keys |= {(r.batch_id, r.kind) for r in batches
                     if (lo is None or r.created_at >= lo) and (hi is None or r.created_at < hi)}
        problems = []
        for key in keys:
            n, first = held.get(key, (0, None))
            quarantined = set_aside.get(key, 0)
            batch = recorded.get(key)
            name = f"batch {key[0]!r} ({key[1]})"
            if batch is None:
                what = "decisions" if n else "quarantined rows"
                problems.append((first, f"{what} of {name} were never recorded as a batch: "
                                        "inserted outside the ledger"))
            elif n != batch.rows_scored:
                problems.append((first, f"{name} holds {n} decisions but was recorded with "
                                        f"{batch.rows_scored}: records were deleted or inserted"))
            elif quarantined != batch.rows_quarantined:
                problems.append((first, f"{name} holds {quarantined} quarantined rows but was "
                                        f"recorded with {batch.rows_quarantined}: quarantined "
                                        "rows were deleted or inserted"))
            elif batch.rows_in != batch.rows_scored + batch.rows_quarantined:
                problems.append((first, f"{name} was recorded with {batch.rows_in} rows in but "
                                        f"{batch.rows_scored} scored + {batch.rows_quarantined} "
                                        "quarantined: its counts were edited"))
        if not problems:
            return None
        first, reason = min(problems, key=lambda p: (p[0] is None, p[0] or 0))
        decision_id = None
        if first is not None:
            decision_id = conn.execute(sa.select(DECISIONS.c.decision_id)
                                       .where(DECISIONS.c.seq == first)).scalar_one()
        return first, decision_id, reason

    @staticmethod
    def _review_target_problem(conn: Connection, lo: str | None, hi: str | None
                               ) -> tuple[int | None, str | None, str] | None:
        """A review must point at a decision that still has the hash it was reviewed with."""
        query = (sa.select(FEEDBACK.c.seq, FEEDBACK.c.feedback_id, FEEDBACK.c.decision_id,
                           FEEDBACK.c.decision_hash, DECISIONS.c.hash)
                 .join_from(FEEDBACK, DECISIONS,
                            DECISIONS.c.decision_id == FEEDBACK.c.decision_id, isouter=True)
                 .where(sa.or_(DECISIONS.c.hash.is_(None),
                               DECISIONS.c.hash != FEEDBACK.c.decision_hash))
                 .order_by(FEEDBACK.c.seq).limit(1))
        if lo is not None:
            query = query.where(FEEDBACK.c.created_at >= lo)
        if hi is not None:
            query = query.where(FEEDBACK.c.created_at < hi)
        bad = conn.execute(query).first()
        if bad is None:
            return None
        what = ("is not in the ledger" if bad.hash is None
                else "no longer has the hash it was reviewed with")
        return (int(bad.seq), bad.feedback_id,
                f"the review's decision {bad.decision_id} {what}: decisions were changed")

    @staticmethod
    def _anchor_problem(conn: Connection, anchor: Anchor
                        ) -> tuple[int | None, str | None, str] | None:
        chain = _CHAINS.get(anchor.chain)
        if chain is None:
            raise LedgerError(f"anchor of {anchor.day}: unknown chain {anchor.chain!r} "
                              f"(expected {' or '.join(_CHAINS)})")
        row = conn.execute(sa.select(*chain.columns()).where(chain.table.c.seq == anchor.last_seq)
                           ).mappings().first()
        what = f"anchor of {anchor.day} ({anchor.chain} seq {anchor.last_seq}, head " \
               f"{anchor.head_hash[:16]}…)"
        if row is None:
            return (anchor.last_seq, None, f"{what}: the ledger has no such record any more: "
                    "records were deleted, or the ledger was rebuilt")
        if row["hash"] != anchor.head_hash:
            return (anchor.last_seq, row[chain.id_column],
                    f"{what}: that record now has hash {row['hash'][:16]}…: the ledger was "
                    "rewritten or rebuilt after the anchor was taken")
        if chain.hash_fn(row) != row["hash"]:
            return (anchor.last_seq, row[chain.id_column], f"{what}: hash mismatch: record "
                    "was edited (its contents no longer match its hash)")
        return None

    @staticmethod
    def _batch_digests(conn: Connection, stamps: Sequence[str]) -> dict[str, str]:
        """For each created_at stamp, a running sha256 over every batch row recorded at or
        before it (in created_at order) with its quarantined rows: what a decision anchor
        carries. Batches stamped after an anchor's record are stamped strictly later (see
        :func:`_stamp_after`), so recording more never changes an earlier anchor's digest."""
        held: dict[tuple[str, str], list[list[Any]]] = {}
        for q in conn.execute(sa.select(QUARANTINE).order_by(
                QUARANTINE.c.batch_id, QUARANTINE.c.kind, QUARANTINE.c.row_number)):
            held.setdefault((q.batch_id, q.kind), []).append(
                [int(q.row_number), q.field, q.reason, q.raw])
        batches = conn.execute(sa.select(BATCHES).order_by(
            BATCHES.c.created_at, BATCHES.c.batch_id, BATCHES.c.kind)).mappings().all()
        out, digest, i = {}, GENESIS_HASH, 0
        for stamp in sorted(set(stamps)):
            while i < len(batches) and batches[i]["created_at"] <= stamp:
                b = batches[i]
                material = {**{k: b[k] for k in ("batch_id", "kind", "input_hash",
                                                 "created_at")},
                            **{k: int(b[k]) for k in ("rows_in", "rows_scored",
                                                      "rows_quarantined")},
                            "quarantine": held.get((b["batch_id"], b["kind"]), [])}
                digest = hashlib.sha256((digest + canonical_json(material)).encode("utf-8")
                                        ).hexdigest()
                i += 1
            out[stamp] = digest
        return out

    def _anchor_batches_problem(self, conn: Connection, anchors: Sequence[Anchor]
                                ) -> tuple[int | None, str | None, str] | None:
        """The first decision anchor whose batch digest the ledger no longer matches (each
        anchor's record was already found intact by :meth:`_anchor_problem`)."""
        wanted = sorted((a for a in anchors if a.chain == "decisions" and a.batches),
                        key=lambda a: a.last_seq)
        if not wanted:
            return None
        stamps = {}
        seqs = [a.last_seq for a in wanted]
        for start in range(0, len(seqs), 1000):
            stamps |= dict(conn.execute(
                sa.select(DECISIONS.c.seq, DECISIONS.c.created_at)
                .where(DECISIONS.c.seq.in_(seqs[start:start + 1000]))).all())
        digests = self._batch_digests(conn, list(stamps.values()))
        for anchor in wanted:
            if digests[stamps[anchor.last_seq]] != anchor.batches:
                decision_id = conn.execute(sa.select(DECISIONS.c.decision_id)
                                           .where(DECISIONS.c.seq == anchor.last_seq)
                                           ).scalar_one()
                return (anchor.last_seq, decision_id,
                        f"anchor of {anchor.day} (decisions seq {anchor.last_seq}): the batches "
                        "or quarantined rows recorded up to it were changed since the anchor "
                        "was taken (a batch row, its counts or time, or a quarantined row was "
                        "edited, deleted or inserted)")
        return None

    def anchors(self, since: datetime | str | None = None, until: datetime | str | None = None
                ) -> list[Anchor]:
        """Each chain's head at the end of each UTC day with records (created_at in range)."""
        lo, hi = _iso_bound(since, "since"), _iso_bound(until, "until")
        out = []
        with self._read() as conn:
            for chain in _CHAINS.values():
                table = chain.table
                day = sa.func.substr(table.c.created_at, 1, 10)
                query = (sa.select(day.label("day"), sa.func.max(table.c.seq).label("last_seq"),
                                   sa.func.count().label("n")).group_by(day).order_by(day))
                if lo is not None:
                    query = query.where(table.c.created_at >= lo)
                if hi is not None:
                    query = query.where(table.c.created_at < hi)
                days = conn.execute(query).all()
                heads = {}
                wanted = [int(d.last_seq) for d in days]
                for start in range(0, len(wanted), 1000):
                    heads |= {int(r.seq): r for r in conn.execute(
                        sa.select(table.c.seq, table.c.hash, table.c.created_at)
                        .where(table.c.seq.in_(wanted[start:start + 1000])))}
                digests = (self._batch_digests(conn, [r.created_at for r in heads.values()])
                           if chain is _DECISION_CHAIN and heads else {})
                out += [Anchor(chain.name, d.day, int(d.last_seq), heads[int(d.last_seq)].hash,
                               int(d.n), digests.get(heads[int(d.last_seq)].created_at))
                        for d in days]
        return out

    # -- reading --

    def decisions(self, batch_id: str | None = None, kind: str | None = None, *,
                  since: datetime | str | None = None, until: datetime | str | None = None,
                  decision_ids: Sequence[str] | None = None, parse: bool = True
                  ) -> list[dict[str, Any]]:
        """Decisions in ledger order, with the explanation and inputs parsed back into dicts
        (inputs None for records without them; ``parse=False``: the JSON texts exactly as
        recorded and hashed). since/until: created_at, until exclusive."""
        query = sa.select(DECISIONS).order_by(DECISIONS.c.seq)
        if batch_id is not None:
            query = query.where(DECISIONS.c.batch_id == batch_id)
        if kind is not None:
            query = query.where(DECISIONS.c.kind == kind)
        query = _created_between(query, DECISIONS.c.created_at, since, until)
        if decision_ids is None:
            pieces = [query]
        else:  # PostgreSQL takes at most 65,535 bind parameters in one statement
            wanted = list(dict.fromkeys(decision_ids))
            pieces = [query.where(DECISIONS.c.decision_id.in_(wanted[start:start + ID_CHUNK]))
                      for start in range(0, len(wanted), ID_CHUNK)] or [
                          query.where(DECISIONS.c.decision_id.in_([]))]
        with self._read() as conn:  # one snapshot for every piece
            rows = [dict(r) for piece in pieces for r in conn.execute(piece).mappings()]
        if len(pieces) > 1:
            rows.sort(key=itemgetter("seq"))
        for row in rows if parse else ():
            row["explanation"] = json.loads(row["explanation"])
            row["inputs"] = None if row["inputs"] is None else json.loads(row["inputs"])
        return rows

    def batch_outcomes(self, batch_id: str, kind: str, *, explanation: bool = False,
                       chunk_rows: int = 50_000) -> Iterator[list[tuple[Any, ...]]]:
        """The recorded outcome of every decision of one batch, as tuples of
        :data:`OUTCOME_FIELDS` (plus the explanation's JSON text with ``explanation``),
        ``chunk_rows`` at a time, from one indexed query in one snapshot: what a re-run of the
        batch is compared with, without reading every record whole."""
        columns = [DECISIONS.c[name] for name in OUTCOME_FIELDS]
        if explanation:
            columns.append(DECISIONS.c.explanation)
        query = sa.select(*columns).where(DECISIONS.c.kind == kind,
                                          DECISIONS.c.batch_id == batch_id)
        with self._read() as conn:
            result = conn.execution_options(yield_per=chunk_rows).execute(query)
            for rows in result.partitions():
                yield [tuple(row) for row in rows]

    def decision(self, decision_id: str) -> dict[str, Any] | None:
        found = self.decisions(decision_ids=[decision_id])
        return found[0] if found else None

    def feedback(self, decision_id: str | None = None, kind: str | None = None, *,
                 since: datetime | str | None = None, until: datetime | str | None = None
                 ) -> list[dict[str, Any]]:
        """Reviews in the order they were recorded (the last one per decision is current)."""
        query = sa.select(FEEDBACK).order_by(FEEDBACK.c.seq)
        if decision_id is not None:
            query = query.where(FEEDBACK.c.decision_id == decision_id)
        if kind is not None:
            query = query.where(FEEDBACK.c.kind == kind)
        query = _created_between(query, FEEDBACK.c.created_at, since, until)
        with self._read() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

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


@dataclass(frozen=True)
class _ChainSpec:
    """One hash chain in the ledger: its table, hashed fields, hash function and head keys."""

    name: str
    table: sa.Table
    fields: tuple[str, ...]
    id_column: str
    hash_fn: Callable[[Mapping[str, Any]], str]
    head_keys: tuple[str, str]

    def columns(self) -> list[sa.Column]:
        names = dict.fromkeys(("seq", "hash", self.id_column, *self.fields))
        return [self.table.c[n] for n in names]


_DECISION_CHAIN = _ChainSpec("decisions", DECISIONS, HASHED_FIELDS + OPTIONAL_HASHED_FIELDS,
                             "decision_id", record_hash, ("head_seq", "head_hash"))
_FEEDBACK_CHAIN = _ChainSpec("feedback", FEEDBACK, FEEDBACK_HASHED_FIELDS, "feedback_id",
                             feedback_hash, ("feedback_head_seq", "feedback_head_hash"))
_CHAINS = {c.name: c for c in (_DECISION_CHAIN, _FEEDBACK_CHAIN)}


# The Core insert compiled once for SQLite: its text (qmark placeholders) and their order,
# which PostgreSQL's COPY of the same rows uses too.
_SQLITE_INSERT_COMPILED = DECISIONS.insert().compile(
    dialect=sqlite_dialect.dialect(), column_keys=[c.name for c in DECISIONS.columns])
_SQLITE_INSERT = str(_SQLITE_INSERT_COMPILED)
_DECISION_ORDER = tuple(_SQLITE_INSERT_COMPILED.positiontup)
_DECISION_VALUES = itemgetter(*_DECISION_ORDER)
_COPY_DECISIONS = f"COPY {DECISIONS.name} ({', '.join(_DECISION_ORDER)}) FROM STDIN"


def _insert_decisions(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert decision rows (dicts of every column). On SQLite straight through the driver's
    executemany, which saves SQLAlchemy's per-row parameter processing (a tenth of a
    write's time), INSERT_CHUNK rows at a time; on PostgreSQL through psycopg (3) with one
    COPY; elsewhere as a Core insert, INSERT_CHUNK rows at a time."""
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        _copy_decisions(conn, rows)
        return
    sqlite = conn.dialect.name == "sqlite"
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start:start + INSERT_CHUNK]
        if sqlite:
            conn.exec_driver_sql(_SQLITE_INSERT, [_DECISION_VALUES(row) for row in chunk])
        else:
            conn.execute(DECISIONS.insert(), chunk)


def _copy_decisions(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """COPY the rows in the connection's open transaction; psycopg's errors are raised as
    SQLAlchemy's (a conflict reads as IntegrityError, a lost connection is retried)."""
    import psycopg

    dbapi = conn.connection.driver_connection
    try:
        with dbapi.cursor() as cursor, cursor.copy(_COPY_DECISIONS) as copy:
            for row in rows:
                copy.write_row(_DECISION_VALUES(row))
    except psycopg.Error as exc:
        raise sa.exc.DBAPIError.instance(
            _COPY_DECISIONS, None, exc, psycopg.Error, dialect=conn.dialect,
            connection_invalidated=conn.dialect.is_disconnect(exc, dbapi, None)) from exc


def _created_between(query: sa.Select, column: sa.ColumnElement, since: datetime | str | None,
                     until: datetime | str | None) -> sa.Select:
    """Restrict ``query`` to since <= column < until (either bound optional)."""
    lo, hi = _iso_bound(since, "since"), _iso_bound(until, "until")
    if lo is not None:
        query = query.where(column >= lo)
    if hi is not None:
        query = query.where(column < hi)
    return query


def _iso_bound(value: datetime | str | None, name: str) -> str | None:
    """A time bound as the ledger writes created_at (ISO-8601 UTC, microseconds), so that text
    comparison orders it; naive times are UTC."""
    if value is None:
        return None
    if type(value) is datetime and value.tzinfo is None:  # the common case, made per record
        return value.isoformat(timespec="microseconds") + "+00:00"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{name}: expected an ISO-8601 time, got {value!r}") from exc
    if not isinstance(value, datetime):
        raise ValueError(f"{name}: expected a datetime, got {type(value).__name__}")
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")

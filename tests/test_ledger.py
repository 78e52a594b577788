"""The audit ledger on SQLite and PostgreSQL: chain, idempotency, tamper evidence, concurrency."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from pipeline import ledger as ledger_mod
from pipeline.ledger import (
    DEFAULT_DB_ENV,
    Decision,
    Ledger,
    LedgerError,
    QuarantinedRow,
    resolve_db_url,
    retry_transient,
)

REPO = Path(__file__).resolve().parents[1]
ZEROS = "0" * 64


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture
def raw(db_url):
    """A plain SQLAlchemy engine on the same database, for tampering behind the ledger's back."""
    engine = sa.create_engine(resolve_db_url(db_url))
    yield engine
    engine.dispose()


def make_decisions(batch_id: str, n: int, *, kind: str = "fraud", start: int = 0
                   ) -> list[Decision]:
    out = []
    for i in range(start, start + n):
        score = (i * 37 % 100) / 100 + 0.001
        out.append(Decision(
            batch_id=batch_id, kind=kind, subject_id=f"tx-{i}", score=score, threshold=0.5,
            decision="alert" if score >= 0.5 else "pass", model_version="enc@abc123",
            index_version="idx-v1", input_hash=hashlib.sha256(f"row{i}".encode()).hexdigest(),
            explanation={"neighbours": [i, i + 1], "similarity": score / 2, "why": f"row {i}"},
        ))
    return out


def reference_hash(record: dict) -> str:
    """The documented record hash, written out independently of the ledger module: sha256 of the
    canonical JSON of every field except seq and hash; the explanation as its canonical text."""
    canon = {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False}
    fields = {k: record[k] for k in ("decision_id", "batch_id", "kind", "subject_id", "score",
                                     "threshold", "decision", "model_version", "index_version",
                                     "input_hash", "created_at", "prev_hash")}
    explanation = record["explanation"]
    fields["explanation"] = (explanation if isinstance(explanation, str)
                             else json.dumps(explanation, **canon))
    return hashlib.sha256(json.dumps(fields, **canon).encode("utf-8")).hexdigest()


def record_two_batches(ledger: Ledger) -> None:
    """seq 1-5 are batch b1, seq 6-8 batch b2."""
    ledger.record_batch("b1", "fraud", "in-1", 6, make_decisions("b1", 5),
                        [QuarantinedRow(5, "amount", "not a number", '{"amount":"x"}')])
    ledger.record_batch("b2", "fraud", "in-2", 3, make_decisions("b2", 3, start=10))


def rows_by_seq(engine: sa.Engine) -> dict[int, dict]:
    with engine.connect() as conn:
        return {r["seq"]: dict(r) for r in conn.execute(
            sa.text("SELECT * FROM decisions ORDER BY seq")).mappings()}


INSERT_SQL = sa.text(
    "INSERT INTO decisions (seq, decision_id, batch_id, kind, subject_id, score, threshold, "
    "decision, model_version, index_version, input_hash, explanation, created_at, prev_hash, "
    "hash) VALUES (:seq, :decision_id, :batch_id, :kind, :subject_id, :score, :threshold, "
    ":decision, :model_version, :index_version, :input_hash, :explanation, :created_at, "
    ":prev_hash, :hash)")


def forged_after(previous: dict, seq: int, subject: str) -> dict:
    """A record an informed forger would write: correctly hashed and chained to ``previous``."""
    record = {**previous, "seq": seq, "decision_id": str(uuid.uuid4()), "subject_id": subject,
              "score": 0.01, "decision": "pass", "prev_hash": previous["hash"]}
    record["hash"] = reference_hash(record)
    return record


# --- chain --------------------------------------------------------------------------------

def test_chain_links_and_verifies_after_several_batches(db_url):
    with Ledger(db_url) as ledger:
        assert ledger.count() == 0 and ledger.head_hash() == ZEROS
        assert ledger.verify().ok
        receipts = [
            ledger.record_batch("b1", "fraud", "in-1", 3, make_decisions("b1", 3)),
            ledger.record_batch("b2", "fraud", "in-2", 5, make_decisions("b2", 4, start=3),
                                [QuarantinedRow(7, "tx_time", "unparseable", '{"t":"?"}')]),
            ledger.record_batch("b3", "fraud", "in-3", 2, make_decisions("b3", 2, start=7)),
        ]
        rows = ledger.decisions()
        report = ledger.verify()

    assert [(r.added, r.already_present, r.quarantined) for r in receipts] == [
        (3, 0, 0), (4, 0, 1), (2, 0, 0)]
    assert report.ok and report.checked == 9 and report.first_bad_seq is None
    assert [r["seq"] for r in rows] == list(range(1, 10))
    assert [r["subject_id"] for r in rows] == [f"tx-{i}" for i in range(9)]
    # Every hash is the documented one, and every record links to the one before it.
    previous = ZEROS
    for row in rows:
        assert row["prev_hash"] == previous
        assert row["hash"] == reference_hash(row)
        previous = row["hash"]
    assert receipts[-1].head_hash == previous
    assert receipts[0].head_hash == rows[2]["hash"]
    # Decision ids are uuid5 over kind:batch:subject.
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "https://finsentinel/ledger/decision")
    assert rows[0]["decision_id"] == str(uuid.uuid5(namespace, "fraud:b1:tx-0"))
    # created_at is ISO-8601 UTC with microseconds.
    stamp = rows[0]["created_at"]
    assert stamp.endswith("+00:00") and len(stamp.split(".")[1]) == len("123456+00:00")


def test_batches_and_quarantine_are_recorded(db_url):
    with Ledger(db_url) as ledger:
        q = [QuarantinedRow(2, "amount", "negative", '{"amount":-1}'),
             QuarantinedRow(0, "customer_id", "missing", '{"customer_id":null}')]
        ledger.record_batch("b1", "fraud", "in-1", 5, make_decisions("b1", 3), q)
        batches = ledger.batches()
        quarantined = ledger.quarantined("b1")
        assert ledger.quarantined("other") == []
    assert len(batches) == 1
    b = batches[0]
    assert (b["batch_id"], b["kind"], b["input_hash"], b["rows_in"], b["rows_scored"],
            b["rows_quarantined"]) == ("b1", "fraud", "in-1", 5, 3, 2)
    assert [(r["row_number"], r["field"], r["reason"], r["raw"]) for r in quarantined] == [
        (0, "customer_id", "missing", '{"customer_id":null}'),
        (2, "amount", "negative", '{"amount":-1}')]


def test_rerecording_the_same_batch_adds_nothing(db_url):
    q = [QuarantinedRow(4, "amount", "bad", "{}")]
    with Ledger(db_url) as ledger:
        first = ledger.record_batch("b1", "fraud", "in-1", 5, make_decisions("b1", 4), q)
        head = ledger.head_hash()
    # A re-run is typically a new process: use a new Ledger on the same database.
    with Ledger(db_url) as ledger:
        again = ledger.record_batch("b1", "fraud", "in-1", 5, make_decisions("b1", 4), q)
        assert ledger.count() == 4
        assert ledger.head_hash() == head
        assert ledger.verify().ok
        assert len(ledger.quarantined()) == 1 and len(ledger.batches()) == 1
    assert (first.added, first.already_present) == (4, 0)
    assert (again.added, again.already_present, again.quarantined) == (0, 4, 1)
    assert again.head_hash == first.head_hash == head


def test_same_batch_id_with_different_input_is_refused(db_url):
    with Ledger(db_url) as ledger:
        ledger.record_batch("b1", "fraud", "hash-one", 2, make_decisions("b1", 2))
        with pytest.raises(LedgerError) as err:
            ledger.record_batch("b1", "fraud", "hash-two", 3, make_decisions("b1", 3))
        message = str(err.value)
        assert "'b1'" in message and "hash-one" in message and "hash-two" in message
        assert ledger.count() == 2
        # The same batch id under another kind is a different batch.
        ledger.record_batch("b1", "sentiment", "hash-two", 1, make_decisions("b1", 1,
                                                                             kind="sentiment"))
        assert ledger.count() == 3 and ledger.verify().ok


def test_rows_in_must_equal_decisions_plus_quarantined(db_url):
    with Ledger(db_url) as ledger:
        with pytest.raises(LedgerError, match=r"rows_in=5 but 3 decisions \+ 1 quarantined"):
            ledger.record_batch("b1", "fraud", "in", 5, make_decisions("b1", 3),
                                [QuarantinedRow(3, "amount", "bad", "{}")])
        assert ledger.count() == 0 and ledger.batches() == [] and ledger.quarantined() == []
        receipt = ledger.record_batch("b1", "fraud", "in", 4, make_decisions("b1", 3),
                                      [QuarantinedRow(3, "amount", "bad", "{}")])
        assert receipt.added == 3 and receipt.quarantined == 1


def test_bad_batch_contents_are_refused_with_a_named_row(db_url):
    with Ledger(db_url) as ledger:
        with pytest.raises(LedgerError, match=r"decision #1 \(subject 'tx-0'\).*belongs to batch"):
            ledger.record_batch("b1", "fraud", "in", 2,
                                make_decisions("b1", 1) + make_decisions("other", 1))
        with pytest.raises(LedgerError, match="subject_id appears more than once"):
            ledger.record_batch("b1", "fraud", "in", 2, make_decisions("b1", 1) * 2)
        with pytest.raises(LedgerError, match=r"row numbers \[3\]"):
            ledger.record_batch("b1", "fraud", "in", 3, make_decisions("b1", 1),
                                [QuarantinedRow(3, "a", "x", "{}")] * 2)
        assert ledger.count() == 0 and ledger.batches() == []


def test_a_failing_batch_leaves_nothing_behind(db_url):
    """The second batch reuses a decision id; the unique constraint fails part-way through the
    transaction, after the batch row was inserted, and all of it must roll back."""
    with Ledger(db_url) as ledger:
        record_two_batches(ledger)
        head, count = ledger.head_hash(), ledger.count()
        clash = ledger.decisions("b1")[0]["decision_id"]
        fresh = make_decisions("b3", 3, start=20)
        bad = [*fresh[:2], dataclasses.replace(fresh[2], decision_id=clash)]
        with pytest.raises(LedgerError, match="nothing was written"):
            ledger.record_batch("b3", "fraud", "in-3", 4, bad,
                                [QuarantinedRow(9, "amount", "bad", "{}")])
        assert ledger.count() == count and ledger.head_hash() == head
        assert [b["batch_id"] for b in ledger.batches()] == ["b1", "b2"]
        assert {q["batch_id"] for q in ledger.quarantined()} == {"b1"}
        assert ledger.verify().ok
        # The batch id is still free for a correct run.
        assert ledger.record_batch("b3", "fraud", "in-3", 3, fresh).added == 3


# --- values -------------------------------------------------------------------------------

def test_scores_and_explanations_round_trip_exactly(db_url):
    tricky = [0.1 + 0.2, 5e-324, 1.7976931348623157e308, 1 / 3, 123456789.00000001, -0.0]
    explanation = {
        "neighbours": [{"id": "tx-9", "similarity": 0.1 + 0.2, "fraud": True}],
        "nested": {"empty": [], "none": None, "int": 2**53 + 1, "neg": -7},
        "text": "Zürich café — ¥, \"quoted\", back\\slash, tab\t, nul-free",
        "numpy": {"f32": np.float32(0.25), "i64": np.int64(7), "arr": np.array([1.5, 2.0])},
    }
    expected = json.loads(json.dumps({**explanation, "numpy": {
        "f32": 0.25, "i64": 7, "arr": [1.5, 2.0]}}))
    decisions = [Decision("b1", "fraud", f"s{i}", s, 1 / 7, "pass", "m", "v", "h", explanation)
                 for i, s in enumerate(tricky)]
    with Ledger(db_url) as ledger:
        ledger.record_batch("b1", "fraud", "in", len(tricky), decisions)
        rows = ledger.decisions(batch_id="b1", kind="fraud")
        report = ledger.verify()
    assert report.ok, report.reason
    scores = [r["score"] for r in rows]
    # -0.0 is stored as 0.0 (SQLite cannot keep the sign); everything else bit-exact.
    assert [s.hex() for s in scores] == [s.hex() for s in tricky[:-1]] + [(0.0).hex()]
    assert all(r["threshold"] == 1 / 7 for r in rows)
    assert all(r["explanation"] == expected for r in rows)
    assert rows[0]["explanation"]["neighbours"][0]["similarity"] == 0.1 + 0.2


def test_nan_and_infinity_are_refused_clearly(db_url):
    good = make_decisions("b1", 1)[0]
    with pytest.raises(ValueError, match=r"subject 'tx-0'.*score must be finite, got nan"):
        dataclasses.replace(good, score=math.nan)
    with pytest.raises(ValueError, match="threshold must be finite, got inf"):
        dataclasses.replace(good, threshold=math.inf)
    with pytest.raises(ValueError, match="explanation contains NaN"):
        dataclasses.replace(good, explanation={"similarity": [0.5, math.nan]})
    with pytest.raises(ValueError, match="decision must be a non-empty string"):
        dataclasses.replace(good, decision="")
    # A Decision records its explanation as it was made: a NaN slipped into the dict later
    # changes nothing that is written or hashed.
    sneaky = make_decisions("b1", 2)
    original = json.loads(json.dumps(sneaky[1].explanation))
    sneaky[1].explanation["similarity"] = float("nan")
    with Ledger(db_url) as ledger:
        assert ledger.record_batch("b1", "fraud", "in", 2, sneaky).added == 2
        assert ledger.decision(sneaky[1].decision_id)["explanation"] == original
        assert ledger.verify().ok


HOSTILE = [
    "b'); DROP TABLE decisions; --",
    "x' OR '1'='1",
    "\"; DELETE FROM batches; SELECT \"",
    "Robert'); UPDATE ledger_meta SET value='0' WHERE key='schema_version'; --",
]


def test_sql_injection_strings_are_stored_verbatim(db_url):
    with Ledger(db_url) as ledger:
        ledger.record_batch("plain", "fraud", "in-0", 2, make_decisions("plain", 2))
        for n, text in enumerate(HOSTILE):
            decision = Decision(batch_id=text, kind="fraud", subject_id=text, score=0.7,
                                threshold=0.5, decision=text, model_version=text,
                                index_version=text, input_hash=text, explanation={text: text})
            ledger.record_batch(text, "fraud", text, 2, [decision],
                                [QuarantinedRow(1, text, text, json.dumps({"v": text}))])
            got = ledger.decisions(batch_id=text)
            assert len(got) == 1
            row = got[0]
            assert all(row[f] == text for f in ("batch_id", "subject_id", "decision",
                                                 "model_version", "index_version", "input_hash"))
            assert row["explanation"] == {text: text}
            assert ledger.quarantined(text)[0]["reason"] == text
            assert ledger.count() == 2 + n + 1
        assert ledger.verify().ok
        assert [b["batch_id"] for b in ledger.batches()][0] == "plain"
    with Ledger(db_url) as ledger:  # schema_version untouched, tables intact
        assert ledger.count() == 2 + len(HOSTILE)


# --- tamper evidence ----------------------------------------------------------------------

def verify_after(db_url, raw, *statements):
    with Ledger(db_url) as ledger:
        record_two_batches(ledger)
        rows = rows_by_seq(raw)
        assert ledger.verify().ok
        with raw.begin() as conn:
            for statement in statements:
                sql, params = statement(rows) if callable(statement) else statement
                conn.execute(sa.text(sql) if isinstance(sql, str) else sql, params)
        return ledger.verify(), rows


def test_edited_record_is_detected(db_url, raw):
    report, rows = verify_after(db_url, raw,
                                ("UPDATE decisions SET score = :s WHERE seq = 3", {"s": 0.02}))
    assert not report.ok
    assert (report.first_bad_seq, report.first_bad_decision_id) == (3, rows[3]["decision_id"])
    assert "hash mismatch: record was edited" in report.reason
    assert report.checked == 3


def test_edited_explanation_is_detected(db_url, raw):
    report, _ = verify_after(db_url, raw, ("UPDATE decisions SET explanation = :e WHERE seq = 7",
                                           {"e": '{"why":"nothing to see"}'}))
    assert (report.ok, report.first_bad_seq) == (False, 7)
    assert "edited" in report.reason


def test_edit_with_a_recomputed_hash_breaks_the_next_link(db_url, raw):
    def forge(rows):
        record = {**rows[3], "decision": "pass", "score": 0.01}
        record["hash"] = reference_hash(record)
        return ("UPDATE decisions SET decision = :decision, score = :score, hash = :hash "
                "WHERE seq = 3", record)

    report, rows = verify_after(db_url, raw, forge)
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert (report.first_bad_decision_id) == rows[4]["decision_id"]
    assert "prev_hash does not match the previous record" in report.reason


def test_deleted_record_is_detected(db_url, raw):
    report, rows = verify_after(db_url, raw, ("DELETE FROM decisions WHERE seq = 4", {}))
    assert (report.ok, report.first_bad_seq) == (False, 5)
    assert report.first_bad_decision_id == rows[5]["decision_id"]
    assert "a record was deleted, inserted or reordered" in report.reason
    assert "seq 4 expected" in report.reason


def test_deleted_tail_is_detected(db_url, raw):
    report, _ = verify_after(db_url, raw, ("DELETE FROM decisions WHERE seq >= 7", {}))
    assert (report.ok, report.first_bad_seq, report.checked) == (False, 7, 6)
    assert "deleted from the end" in report.reason


def test_deleted_tail_with_a_forged_head_is_still_detected(db_url, raw):
    """Deleting batch b2's records and rewriting the recorded head: the chain and head agree,
    but batch b2 was recorded with 3 scored rows."""
    report, rows = verify_after(
        db_url, raw,
        ("DELETE FROM decisions WHERE seq >= 6", {}),
        ("UPDATE ledger_meta SET value = :v WHERE key = 'head_seq'", {"v": "5"}),
        lambda rows: ("UPDATE ledger_meta SET value = :v WHERE key = 'head_hash'",
                      {"v": rows[5]["hash"]}))
    assert not report.ok and report.first_bad_seq is None
    assert "batch 'b2' (fraud) holds 0 decisions but was recorded with 3" in report.reason


@pytest.mark.parametrize(("statements", "expected"), [
    ([("DELETE FROM quarantine WHERE batch_id = 'b1'", {})],
     "batch 'b1' (fraud) holds 0 quarantined rows but was recorded with 1"),
    ([("INSERT INTO quarantine (batch_id, kind, row_number, field, reason, raw) VALUES "
       "('b2', 'fraud', 9, 'amount', 'x', '{}')", {})],
     "batch 'b2' (fraud) holds 1 quarantined rows but was recorded with 0"),
    ([("INSERT INTO quarantine (batch_id, kind, row_number, field, reason, raw) VALUES "
       "('nowhere', 'fraud', 1, 'amount', 'x', '{}')", {})],
     "quarantined rows of batch 'nowhere' (fraud) were never recorded as a batch"),
    ([("DELETE FROM quarantine WHERE batch_id = 'b1'", {}),
      ("UPDATE batches SET rows_quarantined = 0 WHERE batch_id = 'b1'", {})],
     "batch 'b1' (fraud) was recorded with 6 rows in but 5 scored + 0 quarantined"),
], ids=["deleted", "inserted", "orphan", "counts-edited"])
def test_quarantined_rows_deleted_or_inserted_are_detected(db_url, raw, statements, expected):
    """Rows in = rows scored + rows quarantined is what the ledger promises auditors; the
    quarantined rows are not chained, so verify checks them against their batch's counts
    (deleting one used to verify OK)."""
    report, _ = verify_after(db_url, raw, *statements)
    assert not report.ok
    assert expected in report.reason


def test_inserted_record_is_detected(db_url, raw):
    """Make room after seq 3 and insert a correctly chained forgery there: the forgery itself
    checks out, but the record after it no longer links."""
    report, rows = verify_after(
        db_url, raw,
        ("UPDATE decisions SET seq = seq + 100 WHERE seq >= 4", {}),
        lambda rows: (INSERT_SQL, forged_after(rows[3], 4, "tx-forged")))
    assert (report.ok, report.first_bad_seq) == (False, 104)
    assert report.first_bad_decision_id == rows[4]["decision_id"]
    assert "prev_hash does not match the previous record" in report.reason


def test_record_appended_outside_the_ledger_is_detected(db_url, raw):
    def append(rows):
        forged = forged_after(rows[8], 9, "tx-forged")
        return INSERT_SQL, forged

    report, _ = verify_after(db_url, raw, append)
    assert (report.ok, report.first_bad_seq) == (False, 9)
    assert "inserted outside the ledger" in report.reason


def test_reordered_records_are_detected(db_url, raw):
    """Swap the contents of seq 2 and seq 3 (via a spare seq, as the PK is checked per row)."""
    report, rows = verify_after(
        db_url, raw,
        ("UPDATE decisions SET seq = -1 WHERE seq = 2", {}),
        ("UPDATE decisions SET seq = 2 WHERE seq = 3", {}),
        ("UPDATE decisions SET seq = 3 WHERE seq = -1", {}))
    assert (report.ok, report.first_bad_seq) == (False, 2)
    assert report.first_bad_decision_id == rows[3]["decision_id"]
    assert "prev_hash does not match the previous record" in report.reason


def test_appending_after_verify_keeps_a_clean_ledger_clean(db_url):
    with Ledger(db_url) as ledger:
        record_two_batches(ledger)
        ledger.record_batch("b3", "fraud", "in-3", 1, make_decisions("b3", 1, start=40))
        report = ledger.verify()
    assert report.ok and report.checked == 9


# --- concurrency --------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import pipeline.ledger
    from pipeline.ledger import Decision, Ledger

    # No retries: the lock alone (BEGIN IMMEDIATE + busy timeout / advisory lock) must keep
    # concurrent appends from failing.
    pipeline.ledger.retry_transient = lambda fn, **_: fn()
    url, tag, go, batches, size = sys.argv[1:6]
    while not Path(go).exists():
        time.sleep(0.002)
    with Ledger(url) as ledger:
        for b in range(int(batches)):
            batch = f"{tag}-{b}"
            decisions = [Decision(batch, "fraud", f"{batch}-{i}", i / 10, 0.5, "pass", "m", "v",
                                  "h", {"worker": tag, "i": i}) for i in range(int(size))]
            ledger.record_batch(batch, "fraud", f"in-{batch}", int(size), decisions)
""")


def test_two_processes_appending_concurrently_keep_a_linear_chain(db_url, tmp_path):
    n_batches, size = 12, 15
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop(DEFAULT_DB_ENV, None)
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, db_url, tag, str(go),
                                 str(n_batches), str(size)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for tag in ("A", "B")]
    time.sleep(0.2)
    go.touch()  # both workers open the (not yet created) ledger and append at the same time
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err

    with Ledger(db_url) as ledger:
        report = ledger.verify()
        rows = ledger.decisions()
        batches = ledger.batches()
    assert report.ok, report.reason
    assert report.checked == len(rows) == 2 * n_batches * size
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    expected = {f"{t}-{b}-{i}" for t in "AB" for b in range(n_batches) for i in range(size)}
    assert {r["subject_id"] for r in rows} == expected
    assert len(batches) == 2 * n_batches
    # Each batch was appended as one uninterrupted run of seqs.
    for batch in {r["batch_id"] for r in rows}:
        seqs = [r["seq"] for r in rows if r["batch_id"] == batch]
        assert seqs == list(range(seqs[0], seqs[0] + size)), batch


def test_an_append_waits_for_a_concurrent_writer_instead_of_failing(db_url, raw):
    """Another connection holds the ledger's write lock for a moment; record_batch must wait
    for it (busy timeout / advisory lock) and then succeed."""
    with Ledger(db_url) as ledger:
        holding = threading.Event()

        def hold_lock():
            if raw.dialect.name == "sqlite":
                conn = sqlite3.connect(make_url(db_url).database, isolation_level=None)
                conn.execute("BEGIN IMMEDIATE")
                holding.set()
                time.sleep(0.5)
                conn.execute("COMMIT")
                conn.close()
            else:
                with raw.begin() as conn:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"),
                                 {"k": ledger_mod.PG_LOCK_KEY})
                    holding.set()
                    time.sleep(0.5)

        thread = threading.Thread(target=hold_lock)
        thread.start()
        assert holding.wait(5)
        started = time.monotonic()
        receipt = ledger.record_batch("b1", "fraud", "in", 2, make_decisions("b1", 2))
        waited = time.monotonic() - started
        thread.join(5)
        assert receipt.added == 2 and ledger.verify().ok
    assert waited >= 0.3


# --- configuration and helpers ------------------------------------------------------------

def test_resolve_db_url_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DEFAULT_DB_ENV, raising=False)
    monkeypatch.delenv("FINSENTINEL_WORKDIR", raising=False)
    default = resolve_db_url()
    assert default == f"sqlite:///{tmp_path.resolve() / 'finsentinel-work' / 'ledger.sqlite'}"
    assert (tmp_path / "finsentinel-work").is_dir()
    work = tmp_path / "nested" / "work"
    assert resolve_db_url(workdir=work) == f"sqlite:///{work.resolve() / 'ledger.sqlite'}"
    assert work.is_dir()
    # The scheduled jobs' $FINSENTINEL_WORKDIR holds the default ledger too, whatever the
    # folder a job or the dashboard starts in.
    srv = tmp_path / "srv"
    monkeypatch.setenv("FINSENTINEL_WORKDIR", str(srv))
    assert resolve_db_url() == f"sqlite:///{srv.resolve() / 'ledger.sqlite'}"
    assert resolve_db_url(workdir=work) == f"sqlite:///{work.resolve() / 'ledger.sqlite'}"

    monkeypatch.setenv(DEFAULT_DB_ENV, "sqlite:////from/env.sqlite")
    assert resolve_db_url() == "sqlite:////from/env.sqlite"
    assert resolve_db_url(workdir=work) == "sqlite:////from/env.sqlite"
    assert resolve_db_url("sqlite:////explicit.sqlite") == "sqlite:////explicit.sqlite"

    monkeypatch.setenv(DEFAULT_DB_ENV, "postgres://u:p@db:5432/ledger")
    assert resolve_db_url() == "postgresql+psycopg://u:p@db:5432/ledger"
    assert resolve_db_url("postgresql://h/x?sslmode=require") == (
        "postgresql+psycopg://h/x?sslmode=require")
    assert resolve_db_url("postgresql+psycopg://h/x") == "postgresql+psycopg://h/x"
    monkeypatch.setenv(DEFAULT_DB_ENV, "")
    assert resolve_db_url(workdir=work).endswith("/nested/work/ledger.sqlite")


def test_ledger_uses_env_url_and_creates_the_directory(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "dir" / "l.sqlite"
    monkeypatch.setenv(DEFAULT_DB_ENV, f"sqlite:///{path}")
    with Ledger() as ledger:
        ledger.record_batch("b1", "fraud", "in", 1, make_decisions("b1", 1))
    assert path.exists()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # 16 kB pages: a ~4 kB decision record fits in its page instead of overflowing.
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
        assert conn.execute("SELECT count(*) FROM decisions").fetchone()[0] == 1


def test_an_existing_ledger_keeps_its_page_size(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # made by an earlier version, on 4 kB pages
        conn.execute("PRAGMA page_size = 4096")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE other (x)")
    with Ledger(f"sqlite:///{path}") as ledger:
        ledger.record_batch("b1", "fraud", "in", 2, make_decisions("b1", 2))
        assert ledger.verify().ok
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert conn.execute("SELECT count(*) FROM decisions").fetchone()[0] == 2


def test_a_new_sqlite_ledger_in_a_read_only_folder_is_named(tmp_path, read_only):
    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(folder)
    path = folder / "ledger.sqlite"
    with pytest.raises(LedgerError) as caught:
        Ledger(f"sqlite:///{path}")
    message = str(caught.value)
    assert str(path) in message and f"folder {folder} is not writable" in message, message
    assert not path.exists()


def test_an_existing_sqlite_ledger_in_a_folder_made_read_only_is_named(tmp_path, read_only):
    path = tmp_path / "ro" / "ledger.sqlite"
    with Ledger(f"sqlite:///{path}") as ledger:
        ledger.record_batch("b1", "fraud", "in", 2, make_decisions("b1", 2))
    read_only(path.parent)
    with pytest.raises(LedgerError) as caught:
        Ledger(f"sqlite:///{path}")
    message = str(caught.value)
    assert str(path) in message and f"folder {path.parent} is not writable" in message, message


def test_a_read_only_sqlite_ledger_file_reads_but_refuses_writes_naming_it(tmp_path, read_only):
    path = tmp_path / "ledger.sqlite"
    with Ledger(f"sqlite:///{path}") as ledger:
        ledger.record_batch("b1", "fraud", "in", 2, make_decisions("b1", 2))
    read_only(path)
    with Ledger(f"sqlite:///{path}") as ledger:
        assert ledger.count() == 2 and ledger.verify().ok  # an auditor's read-only copy
        with pytest.raises(LedgerError) as caught:
            ledger.record_batch("b2", "fraud", "in2", 1, make_decisions("b2", 1))
        message = str(caught.value)
        assert str(path) in message and "the file is read-only" in message, message
        with pytest.raises(LedgerError, match="the file is read-only"):
            ledger.record_feedback(ledger.decisions()[0]["decision_id"], "false-positive",
                                   None, "alice")
        assert ledger.count() == 2


def test_a_sqlite_ledger_under_a_regular_file_is_named(tmp_path):
    """Works as root too: no permission involved, the path itself is impossible."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    for path in (blocker / "ledger.sqlite", blocker / "deeper" / "ledger.sqlite"):
        with pytest.raises(LedgerError) as caught:
            Ledger(f"sqlite:///{path}")
        message = str(caught.value)
        assert str(path) in message and f"{blocker} is a file, not a folder" in message, message
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("content", [b"x", b"id,amount\n1,2\n" * 40])
def test_a_file_that_is_not_a_sqlite_database_is_named_and_left_alone(tmp_path, content):
    """A wrong --db path at a notes file or a truncated copy: SQLite silently makes a tiny
    file into an empty database (which then verifies as an intact, empty chain) and fails on
    a larger one without naming it."""
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(content)
    with pytest.raises(LedgerError) as caught:
        Ledger(f"sqlite:///{path}")
    message = str(caught.value)
    assert str(path) in message and "not a SQLite database" in message, message
    assert path.read_bytes() == content


def test_schema_version_mismatch_is_refused(db_url, raw):
    Ledger(db_url).close()
    with raw.begin() as conn:
        conn.execute(sa.text("UPDATE ledger_meta SET value = :v WHERE key = 'schema_version'"),
                     {"v": "99"})
    with pytest.raises(LedgerError, match=r"schema_version is '99'.*version '3'"):
        Ledger(db_url)


def locked() -> OperationalError:
    return OperationalError("INSERT ...", {}, Exception("database is locked"))


def test_retry_transient_retries_only_transient_errors():
    calls, delays = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise locked()
        return "done"

    assert retry_transient(flaky, sleep=delays.append) == "done"
    assert len(calls) == 3 and len(delays) == 2 and delays[1] > delays[0] * 0.5

    calls.clear()

    def broken():
        calls.append(1)
        raise OperationalError("SELECT", {}, Exception("no such table: decisions"))

    with pytest.raises(OperationalError, match="no such table"):
        retry_transient(broken, sleep=delays.append)
    assert len(calls) == 1

    calls.clear()

    def always_locked():
        calls.append(1)
        raise locked()

    with pytest.raises(OperationalError, match="locked"):
        retry_transient(always_locked, attempts=4, sleep=lambda _: None)
    assert len(calls) == 4


def test_a_streamed_batch_is_written_whole_or_not_at_all(db_url):
    """A DecisionStream's chunks are made while the ledger writes them, in one transaction: a
    stream that makes fewer decisions than it announced leaves nothing behind, and a re-run of
    a recorded batch does not make its decisions again."""
    from pipeline.ledger import DecisionStream

    def chunks_of(n: int, size: int):
        def chunks():
            for start in range(0, n, size):
                yield [Decision(batch_id="s", kind="fraud", subject_id=f"tx-{i}", score=0.25,
                                threshold=0.5, decision="pass", model_version="m",
                                index_version="i@1", input_hash=f"h{i}", explanation=None,
                                encoded=(f'{{"row":{i}}}', None))
                       for i in range(start, min(start + size, n))]
        return chunks

    with Ledger(db_url) as ledger:
        with pytest.raises(LedgerError, match="8 decisions were made but 10 announced"):
            ledger.record_batch("s", "fraud", "in", 10, DecisionStream(10, chunks_of(8, 3)))
        assert ledger.count() == 0 and ledger.batches() == []
        receipt = ledger.record_batch("s", "fraud", "in", 10, DecisionStream(10, chunks_of(10, 3)))
        assert receipt.added == 10 and ledger.verify().ok
        assert [d["explanation"] for d in ledger.decisions()] == [{"row": i} for i in range(10)]

        def never():
            raise AssertionError("a recorded batch's decisions were made again")
        again = ledger.record_batch("s", "fraud", "in", 10, DecisionStream(10, never))
        assert (again.added, again.already_present) == (0, 10)
        with pytest.raises(LedgerError, match="appears more than once"):
            ledger.record_batch("t", "fraud", "in", 4, DecisionStream(4, lambda: [
                [Decision(batch_id="t", kind="fraud", subject_id=s, score=0.1, threshold=0.5,
                          decision="pass", model_version="m", index_version="i@1",
                          input_hash="h", explanation={})] for s in ("a", "b", "c", "a")]))
        assert ledger.count() == 10
        with pytest.raises(ValueError, match="JSON object"):
            Decision(batch_id="t", kind="fraud", subject_id="x", score=0.1, threshold=0.5,
                     decision="pass", model_version="m", index_version="i@1", input_hash="h",
                     explanation=None, encoded=("not json", None))


# --- the record hash and the decision id, made field by field -----------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # quotes, backslashes, controls, ...
_NUMBER = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**6, 10**6)


@settings(max_examples=300, deadline=None)
@given(texts=st.fixed_dictionaries({name: _TEXT for name in (
           "batch_id", "created_at", "decision", "decision_id", "explanation", "index_version",
           "input_hash", "kind", "model_version", "prev_hash", "subject_id")}),
       score=_NUMBER, threshold=_NUMBER,
       inputs=st.none() | _TEXT, subject_time=st.none() | _TEXT)
def test_record_hash_is_the_canonical_json_of_the_fields(texts, score, threshold, inputs,
                                                         subject_time):
    """record_hash writes the JSON itself (it runs per record); it must be the text that
    json.dumps(sort_keys=True, compact, ensure_ascii=False) makes of the same fields, with
    the optional fields (schema v2/v3) only when present."""
    record = {**texts, "score": score, "threshold": threshold, "inputs": inputs,
              "subject_time": subject_time, "seq": 1, "hash": "h"}
    material = {**texts, "score": float(score), "threshold": float(threshold)}
    material |= {k: v for k, v in (("inputs", inputs), ("subject_time", subject_time))
                 if v is not None}
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False)
    assert ledger_mod.record_hash(record) == hashlib.sha256(canonical.encode()).hexdigest()


def test_record_hash_of_other_value_types_and_non_finite_scores():
    """A value the fast path does not write (a number where text belongs, as a tampered row
    may hold) is hashed by canonical_json, and a NaN score is refused as before."""
    base = {name: "x" for name in ledger_mod.HASHED_FIELDS} | {"score": 0.5, "threshold": 0.5}
    odd = base | {"subject_id": 17, "inputs": {"a": [1, 2]}}
    material = {k: odd[k] for k in ledger_mod.HASHED_FIELDS} | {"inputs": {"a": [1, 2]}}
    expected = hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":"))
                              .encode()).hexdigest()
    assert ledger_mod.record_hash(odd) == expected
    with pytest.raises(ValueError):
        ledger_mod.record_hash(base | {"score": float("nan")})


@settings(max_examples=200, deadline=None)
@given(kind=_TEXT, batch_id=_TEXT, subject_id=_TEXT)
def test_decision_id_is_uuid5_of_kind_batch_and_subject(kind, batch_id, subject_id):
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "https://finsentinel/ledger/decision")
    assert ledger_mod.decision_id_for(kind, batch_id, subject_id) == str(
        uuid.uuid5(namespace, f"{kind}:{batch_id}:{subject_id}"))


# --- head tracking and time stamps (regressions) ------------------------------------------

def test_an_append_after_the_tail_was_deleted_does_not_hide_the_deletion(db_url, raw):
    """Batch b2 (seq 6-8) is deleted whole, batch row included: verify names the records
    missing below the recorded head. The next append must not carry on from the truncated
    table (renumbering seq 6.. and moving the head over the hole), which would leave a ledger
    that verifies: it is refused, and the evidence stays."""
    with Ledger(db_url) as ledger:
        record_two_batches(ledger)
        with raw.begin() as conn:
            conn.execute(sa.text("DELETE FROM decisions WHERE batch_id = 'b2'"))
            conn.execute(sa.text("DELETE FROM batches WHERE batch_id = 'b2'"))
        assert "deleted from the end" in ledger.verify().reason
        with pytest.raises(LedgerError, match="recorded head"):
            ledger.record_batch("b3", "fraud", "in-3", 2, make_decisions("b3", 2, start=40))
        report = ledger.verify()
        assert not report.ok and "deleted from the end" in report.reason
        assert ledger.count() == 5 and ledger.meta()["head_seq"] == "8"


def test_an_append_after_a_record_was_added_outside_the_ledger_does_not_adopt_it(db_url, raw):
    with Ledger(db_url) as ledger:
        record_two_batches(ledger)
        rows = rows_by_seq(raw)
        with raw.begin() as conn:
            conn.execute(INSERT_SQL, forged_after(rows[8], 9, "tx-forged"))
        with pytest.raises(LedgerError, match="recorded head"):
            ledger.record_batch("b3", "fraud", "in-3", 2, make_decisions("b3", 2, start=40))
        report = ledger.verify()
        assert (report.ok, report.first_bad_seq) == (False, 9)
        assert "inserted outside the ledger" in report.reason


def test_a_review_after_the_review_tail_was_deleted_does_not_hide_the_deletion(db_url, raw):
    with Ledger(db_url) as ledger:
        record_two_batches(ledger)
        first = ledger.decisions()[0]["decision_id"]
        for label in ("confirmed-fraud", "false-positive"):
            ledger.record_feedback(first, label, None, "ana")
        with raw.begin() as conn:
            conn.execute(sa.text("DELETE FROM feedback WHERE seq = 2"))
        with pytest.raises(LedgerError, match="recorded head"):
            ledger.record_feedback(first, "confirmed-fraud", None, "bo")
        report = ledger.verify()
        assert not report.ok and report.chain == "feedback"


def test_created_at_follows_the_chain_when_a_writer_clock_is_behind(db_url, monkeypatch):
    """Writers on two hosts (or one whose clock was stepped back) append in turn under the
    lock: a batch recorded after another must not carry an earlier created_at, or the
    ledger's time order (batches(), day anchors, range verification, the news store's
    'classified by a later batch') disagrees with its chain order. Equal clocks too: each
    batch is strictly later than the one before."""
    ahead = "2999-01-01T00:00:00.000000+00:00"
    with Ledger(db_url) as ledger:
        monkeypatch.setattr(ledger_mod, "_utc_now", lambda: ahead)
        ledger.record_batch("b1", "fraud", "in-1", 2, make_decisions("b1", 2))
        ledger.record_batch("b2", "fraud", "in-2", 2, make_decisions("b2", 2, start=10))
        first = ledger.decisions()[0]["decision_id"]
        ledger.record_feedback(first, "confirmed-fraud", None, "ana")
        monkeypatch.undo()  # the next writer's clock is centuries behind
        ledger.record_batch("b3", "fraud", "in-3", 2, make_decisions("b3", 2, start=20))
        ledger.record_batch("b4", "fraud", "in-4", 1, [],
                            [QuarantinedRow(0, "amount", "amount: bad", "{}")])
        ledger.record_feedback(first, "false-positive", None, "bo")
        rows = ledger.decisions()
        batches = {b["batch_id"]: b["created_at"] for b in ledger.batches()}
        reviews = [r["created_at"] for r in ledger.feedback()]
        assert ledger.verify().ok
        assert [a.last_seq for a in ledger.anchors() if a.chain == "decisions"] == [6]
    stamps = [r["created_at"] for r in rows]
    assert stamps == sorted(stamps)
    order = [batches[b] for b in ("b1", "b2", "b3", "b4")]
    assert order == sorted(order) and len(set(order)) == 4, order
    assert reviews == sorted(reviews) and len(set(reviews)) == 2


@pytest.mark.parametrize(("change", "expected"), [
    ({"subject_id": "tx-\ud800"}, "subject_id contains a lone surrogate"),
    ({"model_version": "m\udcff"}, "model_version contains a lone surrogate"),
    ({"explanation": {"why": "bad \udcff byte"}}, "explanation contains a lone surrogate"),
    ({"inputs": {"\ud83d": 1}}, "inputs contain a lone surrogate"),
    ({"explanation": None, "encoded": ('{"w":"\udcff"}', None)}, "explanation .* surrogate"),
    ({"score": 10**400}, "score must be finite"),
    ({"threshold": -(10**400)}, "threshold must be finite"),
])
def test_text_that_cannot_be_stored_is_refused_when_the_decision_is_made(change, expected):
    """Text with a lone surrogate (bytes decoded with surrogateescape, a pair cut in half)
    cannot be written as UTF-8 by either database: like a NUL, it is refused with the field
    named when the Decision is made, not as a bare UnicodeEncodeError from the middle of a
    batch's transaction. An int too large for a float is 'not finite', not an
    OverflowError."""
    fields = dict(batch_id="b", kind="fraud", subject_id="tx", score=0.1, threshold=0.5,
                  decision="pass", model_version="m", index_version="i@1", input_hash="h",
                  explanation={})
    with pytest.raises(ValueError, match=expected):
        Decision(**{**fields, **change})


def test_a_quarantined_row_with_a_lone_surrogate_is_refused_up_front(db_url):
    with pytest.raises(ValueError, match="reason contains a lone surrogate"):
        QuarantinedRow(0, "amount", "amount: not a number '\udcff'", "{}")
    with pytest.raises(ValueError, match="raw .* surrogate"):
        QuarantinedRow(0, "amount", "amount: bad", '{"amount": "\udcff"}')
    with Ledger(db_url) as ledger:  # escaped in the JSON, it is stored as it is
        ledger.record_batch("q", "fraud", "in", 1, [],
                            [QuarantinedRow(0, "amount", "amount: bad", '{"a":"\\udcff"}')])
        assert ledger.quarantined()[0]["raw"] == '{"a":"\\udcff"}' and ledger.verify().ok


def test_decisions_by_a_long_list_of_ids_is_not_limited_by_bind_parameters(db_url):
    """PostgreSQL takes at most 65,535 parameters in one statement (SQLite builds allow
    32,766 or 250,000): a long list of decision ids is read in pieces, in one snapshot, and
    still comes back in ledger order with nothing repeated."""
    with Ledger(db_url) as ledger:
        record_two_batches(ledger)
        recorded = [d["decision_id"] for d in ledger.decisions()]
        wanted = [str(uuid.uuid4()) for _ in range(70_000)]
        wanted[10] = recorded[6]
        wanted[-1] = recorded[1]
        wanted[40_000] = recorded[4]
        wanted.append(recorded[4])
        found = ledger.decisions(decision_ids=wanted)
    assert [d["decision_id"] for d in found] == [recorded[1], recorded[4], recorded[6]]
    assert isinstance(found[0]["explanation"], dict)

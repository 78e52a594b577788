"""Audit trail: range verification and anchors, replay, exports with pseudonyms, HTML case
reports, analyst reviews as labels, schema migrations — on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from pipeline import artifacts, audit, jobs, schema
from pipeline import ledger as ledger_mod
from pipeline.index import FraudIndex
from pipeline.ingest import read_transactions
from pipeline.ledger import Decision, Ledger, LedgerError, resolve_db_url
from pipeline.scoring import ScoringConfig
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig

REPO = Path(__file__).resolve().parents[1]
KEY = "test-pseudonym-key-0123456789"
INJECTION = '<script>alert("x")</script><img src=x onerror=alert(1)> " onclick="y'


# --- shared data: three periods of synthetic card traffic ending in the near future -----------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """History (14 days, labelled), batch1 (the 7 days up to today) and batch2 (transactions
    after now + 1 h, so after any review made during the tests). Card and terminal ids are
    made distinctive so that a raw id in an export cannot hide among other numbers."""
    work = tmp_path_factory.mktemp("audit")
    start = datetime.combine(date.today() - timedelta(days=21), datetime.min.time())
    data = generate(SyntheticConfig(n_customers=120, n_terminals=240, n_days=28, seed=5,
                                    start_date=start.date()))
    data = data.with_columns(
        ("card-" + pl.col(schema.CUSTOMER_ID) + "-Zq").alias(schema.CUSTOMER_ID),
        ("term-" + pl.col(schema.TERMINAL_ID) + "-Xk").alias(schema.TERMINAL_ID))
    now = datetime.now(UTC).replace(tzinfo=None)
    tx = pl.col(schema.TX_TIME)
    history = data.filter(tx < start + timedelta(days=14))
    batch1 = data.filter((tx >= start + timedelta(days=14)) & (tx < start + timedelta(days=21)))
    batch2 = data.filter(tx > now + timedelta(hours=1))
    unlabelled = [schema.IS_FRAUD, schema.FRAUD_SCENARIO]
    history.write_parquet(work / "history.parquet")
    batch1.drop(unlabelled).write_parquet(work / "batch1.parquet")
    batch2.drop(unlabelled).write_parquet(work / "batch2.parquet")
    pl.concat([history, batch1]).write_parquet(work / "history2.parquet")
    root = work / "idx"
    jobs.build_index(read_transactions(work / "history.parquet", require_labels=True), "cards",
                     root=root, encoder=None, vector_config=VectorConfig(text_dim=0))
    return {"work": work, "root": root, "history": history, "batch1": batch1, "batch2": batch2,
            "ids": set(data[schema.CUSTOMER_ID]) | set(data[schema.TERMINAL_ID])}


@pytest.fixture(autouse=True)
def pseudonym_key(monkeypatch):
    monkeypatch.setenv("FINSENTINEL_PSEUDONYM_KEY", KEY)


@pytest.fixture
def raw(db_url):
    """A plain engine on the same database, for tampering behind the ledger's back."""
    engine = sa.create_engine(resolve_db_url(db_url))
    yield engine
    engine.dispose()


def score_into(ledger: Ledger, world, name: str = "batch1", batch_id: str = "week-1",
               index: FraudIndex | None = None, **config) -> jobs.ScoreReport:
    index = index or FraudIndex.load("cards", world["root"])
    output = world["work"] / f"scores-{hashlib.sha256(batch_id.encode()).hexdigest()[:12]}.parquet"
    return jobs.score_file(world["work"] / f"{name}.parquet", index, output, ledger=ledger,
                           batch_id=batch_id, config=ScoringConfig(**config))


def utc_today() -> str:
    return datetime.now(UTC).date().isoformat()


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def small_decisions(batch_id: str, n: int, start: int = 0, kind: str = "fraud"
                    ) -> list[Decision]:
    """Ledger records without an index (for chain tests): real Decisions with inputs."""
    out = []
    for i in range(start, start + n):
        score = (i * 37 % 100) / 100
        out.append(Decision(
            batch_id=batch_id, kind=kind, subject_id=f"tx-{i}", score=score, threshold=0.5,
            decision="alert" if score >= 0.5 else "pass", model_version="numeric-only",
            index_version="cards@v1", input_hash=hashlib.sha256(f"{i}".encode()).hexdigest(),
            explanation={"neighbours": [{"transaction_id": f"n{i}", "similarity": 0.5}]},
            inputs={"transaction": {"customer_id": f"card-{i}-Zq", "terminal_id": f"term-{i}-Xk",
                                    "amount": 10.0 + i / 3}}))
    return out


def three_batches(ledger: Ledger) -> list[str]:
    """seq 1-4 batch a, 5-7 batch b, 8-10 batch c, each with its own created_at; returns the
    three created_at stamps."""
    stamps = []
    for batch_id, n, start in (("a", 4, 0), ("b", 3, 10), ("c", 3, 20)):
        ledger.record_batch(batch_id, "fraud", f"in-{batch_id}", n,
                            small_decisions(batch_id, n, start))
        stamps.append(ledger.decisions(batch_id=batch_id)[0]["created_at"])
        time.sleep(0.002)
    return stamps


# --- range verification ---------------------------------------------------------------------

RANGE_CASES = {
    # (statements, range verify ok?, first bad seq, words in the reason)
    "clean": ([], True, None, ""),
    "edit inside": (["UPDATE decisions SET score = 0.99 WHERE seq = 6"], False, 6, "edited"),
    "edit the record linked into": (["UPDATE decisions SET score = 0.99 WHERE seq = 4"], False, 4,
                                    "the record this range's first record links to"),
    "delete the record linked into": (["DELETE FROM decisions WHERE seq = 4"], False, 5,
                                      "seq 4, the record this range's first record links to, "
                                      "is missing"),
    "delete the first of the range": (["DELETE FROM decisions WHERE seq = 5"], False, 6,
                                      "seq 5, the record this range's first record links to"),
    "reorder inside": (["UPDATE decisions SET seq = -1 WHERE seq = 6",
                        "UPDATE decisions SET seq = 6 WHERE seq = 7",
                        "UPDATE decisions SET seq = 7 WHERE seq = -1"], False, 6, "prev_hash"),
    "edit after": (["UPDATE decisions SET score = 0.99 WHERE seq = 9"], True, None, ""),
}


@pytest.mark.parametrize("case", list(RANGE_CASES))
def test_range_verification_checks_the_range_and_the_link_into_it(db_url, raw, case):
    statements, ok, bad_seq, words = RANGE_CASES[case]
    with Ledger(db_url) as ledger:
        stamps = three_batches(ledger)
    with raw.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    with Ledger(db_url) as ledger:
        ranged = ledger.verify(since=stamps[1], until=stamps[2])  # batch b: seq 5-7
        full = ledger.verify()
    assert (ranged.ok, ranged.first_bad_seq) == (ok, bad_seq), ranged
    assert words in ranged.reason
    if ok:
        assert ranged.checked == (3 if case != "delete the first of the range" else 2)
    # The whole-ledger check sees every tampering, the ones outside the range included.
    assert full.ok == (case == "clean")


def test_range_without_records_and_bad_bounds(db_url):
    with Ledger(db_url) as ledger:
        three_batches(ledger)
        empty = ledger.verify(since="2000-01-01", until="2000-01-02")
        assert empty.ok and empty.checked == 0
        with pytest.raises(ValueError, match="since: expected an ISO-8601 time"):
            ledger.verify(since="last tuesday")


def test_a_range_emptied_by_deletion_does_not_verify(db_url, raw):
    """A range whose records were all deleted is not an empty, clean range: deleted from the
    end of the chain, the head says so; deleted in the middle, their batch's count does."""
    with Ledger(db_url) as ledger:
        stamps = three_batches(ledger)
        clean = ledger.verify(since=stamps[2])
        assert (clean.ok, clean.checked) == (True, 3)
        future = ledger.verify(since="2999-01-01")
        assert (future.ok, future.checked) == (True, 0)
    with raw.begin() as conn:  # batch c (seq 8-10), the end of the chain
        conn.execute(sa.text("DELETE FROM decisions WHERE seq >= 8"))
    with Ledger(db_url) as ledger:
        for since, until in ((stamps[2], None), ("2999-01-01", None),
                             (stamps[2], "2999-01-01")):
            report = ledger.verify(since=since, until=until)
            assert (report.ok, report.first_bad_seq) == (False, 8), (since, until, report)
            assert "records from seq 8 to 10 are missing" in report.reason
    with raw.begin() as conn:  # also its batch row: the head still tells
        conn.execute(sa.text("DELETE FROM batches WHERE batch_id = 'c'"))
    with Ledger(db_url) as ledger:
        report = ledger.verify(since=stamps[1], until="2999-01-01")
        assert (report.ok, report.checked, report.first_bad_seq) == (False, 3, 8)


def test_an_empty_stretch_left_by_deleting_a_batch_does_not_verify(db_url, raw):
    with Ledger(db_url) as ledger:
        stamps = three_batches(ledger)
    with raw.begin() as conn:  # batch b (seq 5-7): records on both sides remain
        conn.execute(sa.text("DELETE FROM decisions WHERE batch_id = 'b'"))
    with Ledger(db_url) as ledger:
        report = ledger.verify(since=stamps[1], until=stamps[2])
        assert not report.ok
        assert "batch 'b' (fraud) holds 0 decisions but was recorded with 3" in report.reason
        assert not ledger.verify().ok


def test_time_range_reads_both_ends_inclusively():
    since, until = audit.time_range("2024-05-01", "2024-05-31")
    assert (since, until) == (datetime(2024, 5, 1), datetime(2024, 6, 1))
    since, until = audit.time_range("2024-05-01T10:00", "2024-05-01T12:00:00+02:00")
    assert until == datetime(2024, 5, 1, 10, 0, 0, 1)  # 10:00 UTC, inclusive
    assert audit.month_range("2024-12") == (datetime(2024, 12, 1), datetime(2025, 1, 1))
    assert audit.previous_month(date(2025, 1, 15)) == "2024-12"
    with pytest.raises(ValueError, match="--to .* is before --from"):
        audit.time_range("2024-05-02", "2024-05-01")
    with pytest.raises(ValueError, match="month: expected YYYY-MM"):
        audit.month_range("2024-13")


def test_every_date_only_spelling_covers_its_whole_day():
    """ISO 8601's other date-only forms (basic 20240501, week date 2024-W18-3) are dates
    too: --to covers the whole day, not its first microsecond."""
    whole_may_first = (datetime(2024, 5, 1), datetime(2024, 5, 2))
    for spelling in ("2024-05-01", "20240501", "2024-W18-3", " 20240501 "):
        assert audit.time_range(spelling, spelling) == whole_may_first, spelling
    assert audit.time_range(None, "20240531") == (None, datetime(2024, 6, 1))
    # Times stay inclusive to the microsecond.
    assert audit.time_range(None, "20240501T1200")[1] == datetime(2024, 5, 1, 12, 0, 0, 1)


# --- reviews --------------------------------------------------------------------------------

def test_reviews_are_chained_bound_to_the_decision_and_checked_per_kind(db_url):
    with Ledger(db_url) as ledger:
        ledger.record_batch("a", "fraud", "in-a", 3, small_decisions("a", 3))
        ledger.record_batch("s", "sentiment", "in-s", 1, small_decisions("s", 1, kind="sentiment"))
        fraud, sentiment = ledger.decisions(kind="fraud"), ledger.decisions(kind="sentiment")
        first = ledger.record_feedback(fraud[0]["decision_id"], "confirmed-fraud", "card stolen",
                                       "ana")
        second = ledger.record_feedback(fraud[0]["decision_id"], "false-positive", "  ", " bo ")
        ledger.record_feedback(sentiment[0]["decision_id"], "incorrect", "sarcasm", "ana")
        with pytest.raises(LedgerError, match="expected one of confirmed, incorrect"):
            ledger.record_feedback(sentiment[0]["decision_id"], "confirmed-fraud", None, "ana")
        with pytest.raises(LedgerError, match="expected one of confirmed-fraud, false-positive"):
            ledger.record_feedback(fraud[1]["decision_id"], "fraud!", None, "ana")
        with pytest.raises(LedgerError, match="no decision 'nope'"):
            ledger.record_feedback("nope", "confirmed-fraud", None, "ana")
        with pytest.raises(LedgerError, match="reviewer must be a non-empty string"):
            ledger.record_feedback(fraud[1]["decision_id"], "confirmed-fraud", None, "")
        with pytest.raises(LedgerError, match="reviewer must name someone"):
            ledger.record_feedback(fraud[1]["decision_id"], "confirmed-fraud", None, " \t ")
        reviews = ledger.feedback()
        report = ledger.verify()
        labels = audit.feedback_labels(ledger)

    assert [r["seq"] for r in reviews] == [1, 2, 3]
    assert [r["prev_hash"] for r in reviews] == ["0" * 64, first.hash, second.hash]
    assert reviews[0]["decision_hash"] == fraud[0]["hash"]
    assert reviews[1]["comment"] is None  # a blank comment is no comment
    assert [r["reviewer"] for r in reviews] == ["ana", "bo", "ana"]  # names as typed, trimmed
    assert report.ok and report.feedback_checked == 3
    # The latest fraud review per transaction is the label; sentiment reviews are not labels.
    assert labels.frame.select(schema.TRANSACTION_ID, schema.IS_FRAUD).rows() == [("tx-0", 0)]
    assert labels.frame["label_time"][0] == datetime.fromisoformat(
        reviews[1]["created_at"]).replace(tzinfo=None)
    assert (labels.feedback_head_seq, labels.feedback_head_hash) == (3, reviews[2]["hash"])


REVIEW_TAMPERING = {
    "edited label": (["UPDATE feedback SET label = 'confirmed-fraud' WHERE seq = 2"], 2,
                     "edited"),
    "deleted review": (["DELETE FROM feedback WHERE seq = 2"], 3, "deleted, inserted or reordered"),
    "deleted last review": (["DELETE FROM feedback WHERE seq = 3"], 3, "deleted from the end"),
    "reordered": (["UPDATE feedback SET seq = -1 WHERE seq = 1",
                   "UPDATE feedback SET seq = 1 WHERE seq = 2",
                   "UPDATE feedback SET seq = 2 WHERE seq = -1"], 1, "prev_hash"),
}


@pytest.mark.parametrize("case", list(REVIEW_TAMPERING))
def test_tampered_reviews_are_detected(db_url, raw, case):
    statements, bad_seq, words = REVIEW_TAMPERING[case]
    with Ledger(db_url) as ledger:
        ledger.record_batch("a", "fraud", "in-a", 3, small_decisions("a", 3))
        for d, label in zip(ledger.decisions(), ["confirmed-fraud", "false-positive",
                                                 "confirmed-fraud"], strict=True):
            ledger.record_feedback(d["decision_id"], label, "checked", "ana")
    with raw.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    with Ledger(db_url) as ledger:
        report = ledger.verify()
    assert (report.ok, report.chain, report.first_bad_seq) == (False, "feedback", bad_seq)
    assert words in report.reason


# --- anchors --------------------------------------------------------------------------------

def forge_rebuild(raw: sa.Engine, change_seq: int) -> None:
    """What a forger with database access and the hash algorithm would do: change one decision
    and recompute every later hash of both chains and the recorded heads, so the chains verify."""
    with raw.begin() as conn:
        rows = [dict(r) for r in conn.execute(sa.text("SELECT * FROM decisions ORDER BY seq"))
                .mappings()]
        prev, new_hash = "0" * 64, {}
        for row in rows:
            if row["seq"] == change_seq:
                row["score"] = 0.001
                row["decision"] = "pass"
            row["prev_hash"] = prev
            row["hash"] = prev = ledger_mod.record_hash(row)
            new_hash[row["decision_id"]] = row["hash"]
            conn.execute(sa.text("UPDATE decisions SET score = :score, decision = :decision, "
                                 "prev_hash = :prev_hash, hash = :hash WHERE seq = :seq"), row)
        conn.execute(sa.text("UPDATE ledger_meta SET value = :v WHERE key = 'head_hash'"),
                     {"v": prev})
        reviews = [dict(r) for r in conn.execute(sa.text("SELECT * FROM feedback ORDER BY seq"))
                   .mappings()]
        prev = "0" * 64
        for review in reviews:
            review["decision_hash"] = new_hash[review["decision_id"]]
            review["prev_hash"] = prev
            review["hash"] = prev = ledger_mod.feedback_hash(review)
            conn.execute(sa.text("UPDATE feedback SET decision_hash = :decision_hash, "
                                 "prev_hash = :prev_hash, hash = :hash WHERE seq = :seq"), review)
        conn.execute(sa.text("UPDATE ledger_meta SET value = :v WHERE key = "
                             "'feedback_head_hash'"), {"v": prev})


def test_anchors_catch_a_ledger_rebuilt_with_recomputed_hashes(db_url, raw, tmp_path):
    with Ledger(db_url) as ledger:
        three_batches(ledger)
        ledger.record_feedback(ledger.decisions()[1]["decision_id"], "confirmed-fraud", "x", "ana")
        found = ledger.anchors()
        path = audit.write_anchors(tmp_path / "anchors.json", found)
        assert ledger.verify(anchors=audit.read_anchors(path)).ok

    today = utc_today()
    heads = {(a.chain, a.day): (a.last_seq, a.records) for a in found}
    assert heads == {("decisions", today): (10, 10), ("feedback", today): (1, 1)}

    forge_rebuild(raw, change_seq=2)
    with Ledger(db_url) as ledger:
        assert ledger.decisions()[1]["decision"] == "pass"
        assert ledger.verify().ok  # the forgery is internally consistent ...
        report = ledger.verify(anchors=audit.read_anchors(path))  # ... but not with the anchors
    assert not report.ok and report.chain == "decisions" and report.first_bad_seq == 10
    assert f"anchor of {today}" in report.reason and "rewritten or rebuilt" in report.reason


@pytest.mark.parametrize("statements", [
    ["UPDATE quarantine SET raw = '{\"amount\":\"12.00\"}' WHERE batch_id = 'q'"],
    ["UPDATE quarantine SET reason = 'amount: fine' WHERE batch_id = 'q'"],
    ["DELETE FROM quarantine WHERE batch_id = 'q' AND row_number = 1",
     "UPDATE batches SET rows_in = rows_in - 1, rows_quarantined = rows_quarantined - 1 "
     "WHERE batch_id = 'q'"],
    ["DELETE FROM quarantine WHERE batch_id = 'empty'",
     "DELETE FROM batches WHERE batch_id = 'empty'"],
    ["UPDATE batches SET created_at = '2001-01-01T00:00:00.000000+00:00' WHERE batch_id = 'q'"],
    ["UPDATE batches SET input_hash = 'other' WHERE batch_id = 'a'"],
], ids=["raw-edited", "reason-edited", "row-and-counts-deleted", "all-quarantined-batch-deleted",
        "batch-time-edited", "batch-input-hash-edited"])
def test_anchors_catch_edits_to_batches_and_quarantined_rows(db_url, raw, tmp_path,
                                                               statements):
    """Batches and quarantined rows are not in the hash chain: an edit that keeps their counts
    consistent (or removes a batch that scored nothing) verifies without anchors. The decision
    anchors carry a digest of every batch and quarantined row recorded up to them, so with the
    anchors kept outside the database the edit is found."""
    from pipeline.ledger import QuarantinedRow

    with Ledger(db_url) as ledger:
        ledger.record_batch("a", "fraud", "in-a", 4, small_decisions("a", 4))
        ledger.record_batch("empty", "fraud", "in-empty", 1, [],
                            [QuarantinedRow(0, "amount", "amount: not a number", '{"a":1}')])
        ledger.record_batch("q", "fraud", "in-q", 5, small_decisions("q", 3, 10), [
            QuarantinedRow(1, "amount", "amount: not a number", '{"amount":"x"}'),
            QuarantinedRow(4, "tx_time", "tx_time: not a time", '{"tx_time":"y"}')])
        path = audit.write_anchors(tmp_path / "anchors.json", ledger.anchors())
        assert ledger.verify(anchors=audit.read_anchors(path)).ok
    with raw.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    with Ledger(db_url) as ledger:
        assert ledger.verify().ok  # not chained: consistent counts are all verify can check
        report = ledger.verify(anchors=audit.read_anchors(path))
    assert not report.ok and report.chain == "decisions" and report.first_bad_seq == 7
    assert "batches or quarantined rows" in report.reason


def test_batch_digests_in_anchors_survive_later_appends_and_old_anchor_files(db_url, tmp_path):
    """Recording more batches (one that scores nothing included) never changes an earlier
    anchor's digest; an anchor file written before the digest existed still verifies."""
    from pipeline.ledger import QuarantinedRow

    with Ledger(db_url) as ledger:
        ledger.record_batch("a", "fraud", "in-a", 5, small_decisions("a", 4),
                            [QuarantinedRow(4, "amount", "amount: bad", "{}")])
        path = audit.write_anchors(tmp_path / "anchors.json", ledger.anchors())
        ledger.record_batch("empty", "fraud", "in-e", 1, [],
                            [QuarantinedRow(0, "amount", "amount: bad", "{}")])
        ledger.record_batch("b", "fraud", "in-b", 2, small_decisions("b", 2, 10))
        anchors = audit.read_anchors(path)
        assert anchors[0].batches is not None
        assert ledger.verify(anchors=anchors + ledger.anchors()).ok
        old = json.loads(path.read_text())
        for a in old["anchors"]:
            del a["batches"]
        path.write_text(json.dumps(old))
        assert audit.read_anchors(path)[0].batches is None
        assert ledger.verify(anchors=audit.read_anchors(path)).ok


def test_anchor_files_are_checked(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not an anchor file"):
        audit.read_anchors(bad)
    bad.write_text(json.dumps({"format": audit.ANCHOR_FORMAT, "anchors": [{"chain": "x"}]}))
    with pytest.raises(ValueError, match="anchor entry malformed"):
        audit.read_anchors(bad)


# --- migrations -----------------------------------------------------------------------------

def v1_metadata() -> sa.MetaData:
    """The schema-version-1 tables, frozen as release 0.1.0 created them."""
    md = sa.MetaData()
    sa.Table("ledger_meta", md, sa.Column("key", sa.Text, primary_key=True),
             sa.Column("value", sa.Text, nullable=False))
    sa.Table("batches", md, sa.Column("batch_id", sa.Text, primary_key=True),
             sa.Column("kind", sa.Text, primary_key=True),
             sa.Column("input_hash", sa.Text, nullable=False),
             sa.Column("rows_in", sa.Integer, nullable=False),
             sa.Column("rows_scored", sa.Integer, nullable=False),
             sa.Column("rows_quarantined", sa.Integer, nullable=False),
             sa.Column("created_at", sa.Text, nullable=False))
    sa.Table("decisions", md,
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
             sa.UniqueConstraint("kind", "batch_id", "subject_id",
                                 name="uq_decisions_kind_batch_subject"))
    sa.Table("quarantine", md, sa.Column("batch_id", sa.Text, primary_key=True),
             sa.Column("kind", sa.Text, primary_key=True),
             sa.Column("row_number", sa.Integer, primary_key=True, autoincrement=False),
             sa.Column("field", sa.Text, nullable=False),
             sa.Column("reason", sa.Text, nullable=False),
             sa.Column("raw", sa.Text, nullable=False))
    return md


def v1_hash(record: dict) -> str:
    """Version 1's documented record hash, written out independently of the ledger module."""
    canon = {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False}
    fields = {k: record[k] for k in ("decision_id", "batch_id", "kind", "subject_id", "score",
                                     "threshold", "decision", "model_version", "index_version",
                                     "input_hash", "explanation", "created_at", "prev_hash")}
    return hashlib.sha256(json.dumps(fields, **canon).encode("utf-8")).hexdigest()


def write_v1_ledger(engine: sa.Engine, n: int = 4) -> list[dict]:
    md = v1_metadata()
    rows, prev = [], "0" * 64
    for i in range(n):
        row = {"seq": i + 1, "decision_id": f"v1-{i}", "batch_id": "old", "kind": "fraud",
               "subject_id": f"old-tx-{i}", "score": 0.125 * i, "threshold": 0.5,
               "decision": "pass", "model_version": "numeric-only", "index_version": "cards@v0",
               "input_hash": f"{i:064x}", "explanation": json.dumps({"k": 20, "why": i}),
               "created_at": f"2024-01-0{i + 1}T10:00:00.000000+00:00", "prev_hash": prev}
        row["hash"] = prev = v1_hash(row)
        rows.append(row)
    with engine.begin() as conn:
        md.create_all(conn)
        conn.execute(md.tables["decisions"].insert(), rows)
        conn.execute(md.tables["batches"].insert().values(
            batch_id="old", kind="fraud", input_hash="in-old", rows_in=n, rows_scored=n,
            rows_quarantined=0, created_at=rows[0]["created_at"]))
        conn.execute(md.tables["ledger_meta"].insert(), [
            {"key": "schema_version", "value": "1"}, {"key": "head_seq", "value": str(n)},
            {"key": "head_hash", "value": prev}])
    return rows


def test_a_version_1_ledger_opens_migrates_verifies_and_accepts_new_records(db_url, raw):
    old = write_v1_ledger(raw)
    with Ledger(db_url) as ledger:
        meta = ledger.meta()
        assert meta["schema_version"] == ledger_mod.SCHEMA_VERSION == "3"
        assert "decisions.subject_time" in meta["migration_2_to_3"]
        assert "decisions.inputs" in meta["migration_1_to_2"]
        assert ledger.verify().ok
        kept = ledger.decisions()
        assert [(d["hash"], d["inputs"]) for d in kept] == [(r["hash"], None) for r in old]
        ledger.record_batch("new", "fraud", "in-new", 2, small_decisions("new", 2))
        ledger.record_feedback("v1-1", "confirmed-fraud", "old decision, new review", "ana")
        report = ledger.verify()
        new = ledger.decisions(batch_id="new")
    assert report.ok and report.checked == 6 and report.feedback_checked == 1
    assert new[0]["prev_hash"] == old[-1]["hash"] and new[0]["seq"] == 5
    assert new[0]["inputs"]["transaction"]["customer_id"] == "card-0-Zq"
    with Ledger(db_url) as again:  # opening a current ledger changes nothing
        assert again.meta() == {**meta, "head_seq": "6", "head_hash": new[-1]["hash"],
                                "feedback_head_seq": "1",
                                "feedback_head_hash": again.feedback()[0]["hash"]}


def test_inputs_are_hashed_into_new_records(db_url, raw):
    with Ledger(db_url) as ledger:
        ledger.record_batch("a", "fraud", "in-a", 2, small_decisions("a", 2))
    with raw.begin() as conn:  # dropping the inputs must not pass as an old-style record
        conn.execute(sa.text("UPDATE decisions SET inputs = NULL WHERE seq = 2"))
    with Ledger(db_url) as ledger:
        report = ledger.verify()
    assert (report.ok, report.first_bad_seq) == (False, 2) and "edited" in report.reason


def test_subject_times_are_hashed_into_new_records(db_url, raw):
    """A decision's subject time (the transaction's own time, which the dashboard's days
    follow) is part of its record: changing or dropping it breaks the chain there."""
    when = datetime(2018, 5, 30, 23, 59, 59, 250000)
    decisions = [Decision(batch_id="t", kind="fraud", subject_id=f"tx-{i}", score=0.1,
                          threshold=0.5, decision="pass", model_version="m", index_version="i@1",
                          input_hash=f"h{i}", explanation={"i": i},
                          subject_time=when + timedelta(hours=i)) for i in range(3)]
    with Ledger(db_url) as ledger:
        ledger.record_batch("t", "fraud", "in-t", 3, decisions)
        stored = [d["subject_time"] for d in ledger.decisions()]
    assert stored == ["2018-05-30T23:59:59.250000+00:00", "2018-05-31T00:59:59.250000+00:00",
                      "2018-05-31T01:59:59.250000+00:00"]
    for seq, change in ((2, "'2018-05-30T00:00:00.000000+00:00'"), (3, "NULL")):
        with raw.begin() as conn:
            conn.execute(sa.text(f"UPDATE decisions SET subject_time = {change} "
                                 "WHERE seq = :s"), {"s": seq})
        with Ledger(db_url) as ledger:
            report = ledger.verify()
        assert (report.ok, report.first_bad_seq) == (False, 2)
    with pytest.raises(ValueError, match="subject_time must be a datetime"):
        Decision(batch_id="t", kind="fraud", subject_id="x", score=0.1, threshold=0.5,
                 decision="pass", model_version="m", index_version="i@1", input_hash="h",
                 explanation={}, subject_time="2018-05-30")


def test_a_version_2_ledger_gains_subject_times_and_keeps_verifying(db_url, raw):
    """Schema 2 -> 3 adds the subject-time column: older records keep their hashes (no
    subject time), new ones carry it."""
    with Ledger(db_url) as ledger:
        ledger.record_batch("old", "fraud", "in-old", 2, small_decisions("old", 2))
    with raw.begin() as conn:  # what version 2 looked like
        conn.execute(sa.text("DROP INDEX ix_decisions_kind_subject_time"))
        conn.execute(sa.text("ALTER TABLE decisions DROP COLUMN subject_time"))
        conn.execute(sa.text("UPDATE ledger_meta SET value = '2' WHERE key = 'schema_version'"))
    with Ledger(db_url) as ledger:
        meta = ledger.meta()
        ledger.record_batch("new", "fraud", "in-new", 1, [Decision(
            batch_id="new", kind="fraud", subject_id="n", score=0.2, threshold=0.5,
            decision="pass", model_version="m", index_version="i@1", input_hash="h",
            explanation={}, subject_time=datetime(2018, 6, 1, 12))])
        assert ledger.verify().ok
        records = ledger.decisions()
    assert meta["schema_version"] == "3" and "subject_time" in meta["migration_2_to_3"]
    assert [d["subject_time"] for d in records] == [None, None,
                                                    "2018-06-01T12:00:00.000000+00:00"]


def test_concurrent_openings_of_a_version_1_ledger_migrate_it_once(db_url, raw):
    old = write_v1_ledger(raw)
    errors, barrier = [], threading.Barrier(4)

    def open_it():
        try:
            barrier.wait()
            with Ledger(db_url) as ledger:
                assert ledger.meta()["schema_version"] == "3"
        except Exception as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with Ledger(db_url) as ledger:
        assert ledger.verify().ok and ledger.count() == len(old)
        assert "migration_1_to_2" in ledger.meta()


# --- replay ---------------------------------------------------------------------------------

def test_a_batch_searched_and_written_in_chunks_is_the_batch_scored_whole(db_url, world,
                                                                          monkeypatch):
    """A large file is searched SEARCH_ROWS queries at a time and its explanations made and
    written TEXT_ROWS at a time (memory bounded by a chunk): the records are those of scoring
    it in one piece, one transaction writes them all, and each decision replays against its
    own search call."""
    from pipeline import scoring

    with Ledger(db_url) as ledger:
        score_into(ledger, world, batch_id="whole", alerts_per_day=5)
        whole = ledger.decisions(batch_id="whole")
        monkeypatch.setattr(scoring, "SEARCH_ROWS", 500)
        monkeypatch.setattr(scoring, "TEXT_ROWS", 170)
        seen = []
        report = jobs.score_file(
            world["work"] / "batch1.parquet", FraudIndex.load("cards", world["root"]),
            world["work"] / "chunked.parquet", ledger=ledger, batch_id="chunked",
            config=ScoringConfig(alerts_per_day=5), progress=lambda *step: seen.append(step))
        chunked = ledger.decisions(batch_id="chunked")
        assert ledger.verify().ok
        last = chunked[-1]
        replayed = audit.replay(ledger, last["decision_id"], root=world["root"])
    n = world["batch1"].height
    assert n > 1000 and report.rows_scored == report.ledger_added == len(chunked) == n
    # Progress: each search call, then each chunk written, up to every row.
    assert seen == ([("nearest neighbours", min(s + 500, n), n) for s in range(0, n, 500)]
                    + [("explaining and recording", min(s + 170, n), n)
                       for s in range(0, n, 170)])
    calls = [d["inputs"]["search"] for d in chunked]
    assert [c["rows"] for c in calls[::500]] == [min(500, n - s) for s in range(0, n, 500)]
    assert {c["calls"] for c in calls} == {-(-n // 500)}
    assert [c["row"] for c in calls] == [i % 500 for i in range(n)]
    assert len({c["call"] for c in calls}) == -(-n // 500)
    for a, b in zip(whole, chunked, strict=True):
        assert a["subject_id"] == b["subject_id"] and a["input_hash"] == b["input_hash"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-9)
        assert (a["threshold"], a["decision"]) == (b["threshold"], b["decision"])
        assert a["explanation"]["neighbours"] == b["explanation"]["neighbours"]
        assert a["explanation"]["features"] == b["explanation"]["features"]
        assert {k: v for k, v in a["inputs"].items() if k != "search"} == \
            {k: v for k, v in b["inputs"].items() if k != "search"}
    # The day's alert threshold was ranked over the whole batch, across the calls: a replay
    # of one call keeps the recorded threshold rather than ranking the call alone.
    assert replayed.ok, replayed.reason
    assert replayed.rows_searched == n - 500 * ((n - 1) // 500)
    assert replayed.replayed_threshold == last["threshold"]


def test_replay_reproduces_recorded_scores_and_catches_a_changed_score(db_url, raw, world):
    with Ledger(db_url) as ledger:
        report = score_into(ledger, world, alerts_per_day=5)
        decisions = ledger.decisions()
        alert = next(d for d in decisions if d["decision"] == "alert")
        picks = [decisions[0], decisions[len(decisions) // 2], decisions[-1], alert]
        results = [audit.replay(ledger, d["decision_id"], root=world["root"]) for d in picks]
    assert report.rows_scored == len(decisions) == world["batch1"].height
    for d, r in zip(picks, results, strict=True):
        assert r.ok, r.reason
        assert abs(r.replayed_score - d["score"]) <= audit.SCORE_TOLERANCE
        assert r.replayed_threshold == d["threshold"] and r.replayed_decision == d["decision"]
        assert r.rows_searched == len(decisions) and r.neighbours_match
        recorded = d["explanation"]["neighbours"]
        assert [n["transaction_id"] for n in r.neighbours[:len(recorded)]] == [
            n["transaction_id"] for n in recorded]
        assert r.neighbours[0]["similarity"] == pytest.approx(recorded[0]["similarity"],
                                                              abs=1e-6)
    # The per-day threshold (alerts_per_day) was recomputed: the day's 5th highest score.
    day = alert["inputs"]["transaction"]["tx_time"][:10]
    same_day = sorted((d["score"] for d in decisions
                       if d["inputs"]["transaction"]["tx_time"][:10] == day), reverse=True)
    assert results[3].replayed_threshold == same_day[4]

    with raw.begin() as conn:
        conn.execute(sa.text("UPDATE decisions SET score = score + 0.01 WHERE decision_id = :d"),
                     {"d": picks[1]["decision_id"]})
    with Ledger(db_url) as ledger:
        changed = audit.replay(ledger, picks[1]["decision_id"], root=world["root"])
        assert not ledger.verify().ok
    assert not changed.ok and "differs from the recorded" in changed.reason
    assert changed.replayed_score == results[1].replayed_score


@pytest.fixture(scope="module")
def text_world(world, tmp_path_factory):
    """An index with the MiniLM text part, and 300 of batch1's transactions to score."""
    from pipeline.encoder import TextEncoder

    work = tmp_path_factory.mktemp("audit-text")
    encoder = TextEncoder(device="cpu", cache_dir=work / "cache")
    jobs.build_index(read_transactions(world["work"] / "history.parquet", require_labels=True),
                     "cards", root=work / "idx", encoder=encoder,
                     vector_config=VectorConfig(text_dim=4))
    world["batch1"].drop(schema.IS_FRAUD, schema.FRAUD_SCENARIO).head(300).write_parquet(
        work / "small.parquet")
    return {"work": work, "encoder": encoder}


def test_replay_with_text_names_each_missing_or_changed_artefact(text_world, tmp_path):
    from pipeline.encoder import TextEncoder

    root = tmp_path / "idx"
    shutil.copytree(text_world["work"] / "idx", root)
    encoder = text_world["encoder"]
    index = FraudIndex.load("cards", root, encoder=encoder)
    with Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}") as ledger:
        jobs.score_file(text_world["work"] / "small.parquet", index, tmp_path / "s.parquet",
                        ledger=ledger, batch_id="small")
        target = ledger.decisions()[7]

        def replay(enc=encoder):
            return audit.replay(ledger, target["decision_id"], root=root, encoder=enc)

        good = replay()
        assert good.ok, good.reason
        assert good.model_version.startswith("all-MiniLM-L6-v2@")
        assert good.vector_max_difference <= audit.VECTOR_TOLERANCE

        other = TextEncoder(device="cpu")
        other._weights_hash = "f" * 64  # an encoder with other weights
        assert "was built with encoder" in replay(other).reason

        version_dir = root / "cards" / index.manifest["version"]
        meta_file = version_dir / "meta.parquet"
        meta_file.write_bytes(meta_file.read_bytes() + b"\0")
        changed = replay()
        assert not changed.ok and "meta.parquet" in changed.reason
        assert "does not match the manifest" in changed.reason

        shutil.rmtree(version_dir)
        missing = replay()
        assert not missing.ok
        assert f"index version {target['index_version']} is missing" in missing.reason
        assert artifacts.KEEP_VERSIONS_ENV in missing.reason

        elsewhere = audit.replay(ledger, target["decision_id"], root=tmp_path / "wrong",
                                 encoder=encoder)  # a mistyped --root: nothing was pruned
        assert not elsewhere.ok and "no index 'cards' under" in elsewhere.reason
        assert "--root" in elsewhere.reason and "KEEP" not in elsewhere.reason

        with pytest.raises(LedgerError, match="no decision 'nope'"):
            audit.replay(ledger, "nope", root=root)


def _drop_recorded_precision(path: Path) -> None:
    """Rewrite every decision's inputs without the ``encoder`` entry: a record made before the
    encoder's precision was recorded (behind the ledger's back, as an older version wrote)."""
    import sqlite3

    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT decision_id, inputs FROM decisions").fetchall()
        for decision_id, text in rows:
            inputs = json.loads(text)
            inputs.pop("encoder", None)
            conn.execute("UPDATE decisions SET inputs = ? WHERE decision_id = ?",
                         (ledger_mod.canonical_json(inputs), decision_id))


@pytest.mark.parametrize("scorer", ["knn", "knn-stacked"])
def test_a_decision_scored_in_fp16_replays_on_a_cpu_in_fp32(world, text_world, tmp_path,
                                                             scorer):
    """A GPU scores with the encoder in fp16; an auditor replays on a CPU in fp32. Simulated
    honestly on the CPU: the scoring encoder is forced to fp16 (the same weights, the vectors
    of fp16 arithmetic), the replaying one is the normal fp32 CPU encoder."""
    from pipeline.encoder import TextEncoder

    root = tmp_path / "idx"
    if scorer == "knn":
        shutil.copytree(text_world["work"] / "idx", root)
    else:
        jobs.build_index(read_transactions(world["work"] / "history.parquet",
                                           require_labels=True), "cards", root=root,
                         encoder=text_world["encoder"], vector_config=VectorConfig(text_dim=4),
                         scorer="knn-stacked")
    fp16 = TextEncoder(device="cpu", precision="fp16", cache_dir=text_world["work"] / "cache")
    fp32 = text_world["encoder"]
    scale = FraudIndex.load("cards", root, encoder=fp32).vectorizer.text_scale_
    db = tmp_path / "l.sqlite"
    with Ledger(f"sqlite:///{db}") as ledger:
        for batch_id, encoder in (("gpu", fp16), ("cpu", fp32)):
            jobs.score_file(text_world["work"] / "small.parquet",
                            FraudIndex.load("cards", root, encoder=encoder),
                            tmp_path / f"{batch_id}.parquet", ledger=ledger, batch_id=batch_id)
        gpu = ledger.decisions(batch_id="gpu")
        cpu = ledger.decisions(batch_id="cpu")
        # The precision that made the vector is on record, beside the device it ran on.
        assert [d["inputs"]["encoder"] for d in gpu] == [
            {"device": "cpu", "precision": "fp16"}] * len(gpu)
        assert {d["inputs"]["encoder"]["precision"] for d in cpu} == {"fp32"}
        assert ledger.verify().ok  # the new entry is hashed as canonical JSON, like the rest
        assert gpu[0]["model_version"] == cpu[0]["model_version"]  # the same weights
        picks = [gpu[0], gpu[7], max(gpu, key=lambda d: d["score"])]
        replays = [audit.replay(ledger, d["decision_id"], root=root, encoder=fp32)
                   for d in picks]
        same_on_cpu = audit.replay(ledger, cpu[7]["decision_id"], root=root, encoder=fp32)

    for d, r in zip(picks, replays, strict=True):
        assert r.ok, r.reason
        assert (r.recorded_precision, r.replay_precision) == ("fp16", "fp32")
        # fp16 moved the text part of the vector beyond the fp32 tolerance: really simulated.
        assert audit.VECTOR_TOLERANCE < r.vector_max_difference <= r.vector_tolerance
        assert r.vector_tolerance == pytest.approx(audit.FP16_EMBEDDING_TOLERANCE * scale)
        assert abs(r.replayed_score - d["score"]) <= audit.SCORE_TOLERANCE
        assert r.replayed_decision == d["decision"] and r.neighbours_match
        assert "recorded in fp16" in r.reason and "rebuilt in fp32" in r.reason
        assert "recorded query vectors" in r.reason
    # fp32 decisions keep the tight tolerance.
    assert same_on_cpu.ok, same_on_cpu.reason
    assert (same_on_cpu.recorded_precision, same_on_cpu.replay_precision) == ("fp32", "fp32")
    assert same_on_cpu.vector_tolerance == audit.VECTOR_TOLERANCE
    assert same_on_cpu.vector_max_difference <= audit.VECTOR_TOLERANCE

    # Records made before the precision was recorded are taken as fp32, as before: an fp32 one
    # still replays; an fp16 one is not reproduced, and the reason says what may explain it.
    _drop_recorded_precision(db)
    with Ledger(f"sqlite:///{db}") as ledger:
        old_cpu = audit.replay(ledger, cpu[7]["decision_id"], root=root, encoder=fp32)
        old_gpu = audit.replay(ledger, gpu[7]["decision_id"], root=root, encoder=fp32)
    assert old_cpu.ok, old_cpu.reason
    assert old_cpu.recorded_precision is None
    assert old_cpu.vector_tolerance == audit.VECTOR_TOLERANCE
    assert "not recorded" in old_cpu.reason
    assert not old_gpu.ok and old_gpu.vector_max_difference > audit.VECTOR_TOLERANCE
    assert "does not record the encoder's precision" in old_gpu.reason
    assert "fp16" in old_gpu.reason


def test_an_old_record_replayed_in_fp16_does_not_claim_an_fp32_check(text_world, tmp_path):
    """A record without its encoder precision (an older version wrote it), replayed by an
    encoder in fp16 (a GPU's default): the fp16 tolerance applies, as the docs say for either
    side in fp16, and the reason must not say it was checked as fp32."""
    from pipeline.encoder import TextEncoder

    root = tmp_path / "idx"
    shutil.copytree(text_world["work"] / "idx", root)
    db = tmp_path / "l.sqlite"
    with Ledger(f"sqlite:///{db}") as ledger:
        jobs.score_file(text_world["work"] / "small.parquet",
                        FraudIndex.load("cards", root, encoder=text_world["encoder"]),
                        tmp_path / "s.parquet", ledger=ledger, batch_id="cpu")
        target = ledger.decisions(batch_id="cpu")[7]
    _drop_recorded_precision(db)
    fp16 = TextEncoder(device="cpu", precision="fp16", cache_dir=text_world["work"] / "cache")
    with Ledger(f"sqlite:///{db}") as ledger:
        result = audit.replay(ledger, target["decision_id"], root=root, encoder=fp16)
    assert result.ok, result.reason
    assert (result.recorded_precision, result.replay_precision) == (None, "fp16")
    assert result.vector_tolerance > audit.VECTOR_TOLERANCE  # the fp16 tolerance applied
    assert "checked as fp32" not in result.reason, result.reason
    assert "not recorded" in result.reason


def test_old_records_without_inputs_say_why_they_cannot_be_replayed(db_url, raw, world):
    write_v1_ledger(raw, n=1)
    with Ledger(db_url) as ledger:
        result = audit.replay(ledger, "v1-0", root=world["root"])
    assert not result.ok and "recorded without its inputs" in result.reason


def test_keep_versions_policy_is_configurable(monkeypatch):
    monkeypatch.delenv(artifacts.KEEP_VERSIONS_ENV, raising=False)
    assert artifacts.keep_versions() == artifacts.KEEP_VERSIONS >= 30
    monkeypatch.setenv(artifacts.KEEP_VERSIONS_ENV, "0")
    assert artifacts.keep_versions() == 0
    monkeypatch.setenv(artifacts.KEEP_VERSIONS_ENV, "three")
    with pytest.raises(artifacts.ArtifactError, match="whole number >= 0"):
        artifacts.keep_versions()


# --- exports --------------------------------------------------------------------------------

def pseudonym(value: str) -> str:
    """Written out independently: HMAC-SHA256 under the test key, 16 hex digits, prefix p_."""
    return "p_" + hmac.new(KEY.encode(), value.encode(), hashlib.sha256).hexdigest()[:16]


def expected_rows(ledger: Ledger) -> list[dict]:
    """What an export must hold, derived from the ledger's own records."""
    out = []
    reviews: dict[str, list[dict]] = {}
    for r in ledger.feedback():
        reviews.setdefault(r["decision_id"], []).append(r)
    for d in ledger.decisions():
        inputs = json.loads(json.dumps(d["inputs"]))
        tx = inputs["transaction"]
        raw_ids = (tx["customer_id"], tx["terminal_id"])
        tx["customer_id"], tx["terminal_id"] = (pseudonym(v) for v in raw_ids)
        last = reviews.get(d["decision_id"], [{}])[-1]
        out.append({
            **{k: d[k] for k in ("seq", "decision_id", "batch_id", "kind", "subject_id", "score",
                                 "threshold", "decision", "model_version", "index_version",
                                 "input_hash", "created_at", "subject_time", "prev_hash",
                                 "hash")},
            "customer_id": tx["customer_id"], "terminal_id": tx["terminal_id"],
            "tx_time": tx["tx_time"], "amount": tx["amount"],
            "explanation": d["explanation"], "inputs": inputs,
            "review_label": last.get("label"), "reviewer": last.get("reviewer"),
            "reviewed_at": last.get("created_at"), "review_comment": last.get("comment"),
            "reviews": len(reviews.get(d["decision_id"], [])),
        })
    return out


def test_exports_read_back_equal_and_hold_no_raw_card_or_terminal_id(db_url, world, tmp_path):
    with Ledger(db_url) as ledger:
        score_into(ledger, world)
        decisions = ledger.decisions()
        ledger.record_feedback(decisions[3]["decision_id"], "confirmed-fraud",
                               "customer confirmed, line 1\nline 2, with \"quotes\"", "ana")
        ledger.record_feedback(decisions[5]["decision_id"], "false-positive", None, "bo")
        expected = expected_rows(ledger)
        files = {}
        for fmt in ("csv", "jsonl", "parquet"):
            files[fmt] = audit.export(ledger, tmp_path / f"x.{fmt}", fmt,
                                      *audit.time_range(utc_today(), None))
        cases = [d["decision_id"] for d in decisions[:40]]
        files["html"] = audit.export(ledger, tmp_path / "x.html", "html", decision_ids=cases)
        nothing = audit.export(ledger, tmp_path / "none.csv", "csv",
                               *audit.time_range("2000-01-01", "2000-01-31"))
        revealed = audit.export(ledger, tmp_path / "raw.jsonl", "jsonl", reveal=True)

    assert [r.rows for r in files.values()] == [len(decisions)] * 3 + [40]
    assert all(r.verified for r in files.values())
    for fmt in ("csv", "jsonl", "parquet"):
        back = audit.read_export(tmp_path / f"x.{fmt}").to_dicts()
        for row in back:
            row["explanation"] = json.loads(row["explanation"])
            row["inputs"] = json.loads(row["inputs"])
        assert back == expected, fmt
    assert nothing.rows == 0 and audit.read_export(tmp_path / "none.csv").height == 0

    # No raw card or terminal id anywhere, in any format (parquet: in any cell).
    raw_ids = world["ids"]
    texts = {fmt: (tmp_path / f"x.{fmt}").read_text() for fmt in ("csv", "jsonl", "html")}
    texts["anchors"] = Path(files["csv"].anchors_path).read_text()
    texts["parquet"] = "\n".join(str(v) for row in pl.read_parquet(tmp_path / "x.parquet").rows()
                                 for v in row)
    for fmt, text in texts.items():
        assert not [i for i in raw_ids if i in text], fmt
    assert pseudonym(decisions[0]["inputs"]["transaction"]["customer_id"]) in texts["html"]
    # ... while --reveal shows them, so the check above can fail.
    shown = (tmp_path / "raw.jsonl").read_text()
    assert revealed.rows == len(decisions) and not revealed.pseudonymised
    assert decisions[0]["inputs"]["transaction"]["customer_id"] in shown
    # With --reveal every exported record's hash can be recomputed from the export.
    for row in audit.read_export(tmp_path / "raw.jsonl").iter_rows(named=True):
        assert ledger_mod.record_hash(row) == row["hash"]


def test_export_without_a_pseudonym_key_stops_before_writing(db_url, monkeypatch, tmp_path):
    monkeypatch.delenv("FINSENTINEL_PSEUDONYM_KEY")
    out = tmp_path / "exports"
    with Ledger(db_url) as ledger:
        ledger.record_batch("a", "fraud", "in-a", 1, small_decisions("a", 1))
        with pytest.raises(ValueError, match=r"FINSENTINEL_PSEUDONYM_KEY is not set.*--reveal"):
            audit.export(ledger, out / "x.csv", "csv")
        monkeypatch.setenv("FINSENTINEL_PSEUDONYM_KEY", "short")
        with pytest.raises(ValueError, match="shorter than 16 characters"):
            audit.export(ledger, out / "x.csv", "csv")
        with pytest.raises(ValueError, match="--format: expected one of csv, jsonl"):
            audit.export(ledger, out / "x.xml", "xml", reveal=True)
    assert not out.exists()


class Tags(HTMLParser):
    """Every start tag with its attributes, as a browser's tokenizer sees them."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "b",
                "a", "span", "div", "section", "table", "tr", "th", "td", "svg", "rect", "line",
                "text"}


def test_html_case_report_is_self_contained_and_escapes_every_text(world, tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}") as ledger:
        score_into(ledger, world, batch_id=f"week-1 {INJECTION}", threshold=0.2)
        decisions = ledger.decisions()
        alerts = [d for d in decisions if d["decision"] == "alert"][:2]
        ledger.record_feedback(alerts[0]["decision_id"], "confirmed-fraud", INJECTION,
                               f"ana {INJECTION}")
        picked = [decisions[0]["decision_id"]] + [d["decision_id"] for d in alerts]
        report = audit.export(ledger, tmp_path / "case.html", "html", decision_ids=picked)
    page = (tmp_path / "case.html").read_text()

    assert report.rows == 3 and page.count('<section class="case"') == 3
    assert page.startswith("<!DOCTYPE html>")
    tags = Tags(page).tags
    assert {t for t, _ in tags} <= ALLOWED_TAGS  # no script, img, link, iframe, object ...
    attributes = [(name, value) for _, attrs in tags for name, value in attrs.items()]
    assert not [a for a in attributes if a[0].startswith("on") or a[0] in ("src", "style")]
    assert all(value.startswith("#d") for name, value in attributes if name == "href")
    style = page[page.index("<style>"):page.index("</style>")]
    assert "url(" not in style and "@import" not in style
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert INJECTION not in page
    assert page.count("<svg") == 6  # a score gauge and a feature chart per case
    case = page[page.index(f'id="d{alerts[0]["seq"]}"'):]
    case = case[:case.index("</section>")]
    explanation = alerts[0]["explanation"]
    for n in explanation["neighbours"]:
        assert f"<td>{n['transaction_id']}</td>" in case
    amount = explanation["features"]["amount"]
    assert f"{amount['value']:,.4f}".rstrip("0").rstrip(".") in case
    assert "confirmed-fraud" in case and alerts[0]["hash"] in case
    assert f"{alerts[0]['score']:.4f}" in case and f"{alerts[0]['threshold']:.4f}" in case


# --- analyst feedback reaches the next index -------------------------------------------------

def test_reviews_relabel_the_next_index_and_the_neighbours_of_later_scores(db_url, world,
                                                                         tmp_path):
    truth = dict(world["batch1"].select(schema.TRANSACTION_ID, schema.IS_FRAUD).iter_rows())
    with Ledger(db_url) as ledger:
        score_into(ledger, world)
        decisions = ledger.decisions()
        genuine = [d for d in decisions if truth[d["subject_id"]] == 0][:80]
        fraud = next(d for d in decisions if truth[d["subject_id"]] == 1)
        for d in genuine:
            ledger.record_feedback(d["decision_id"], "confirmed-fraud", "chargeback", "ana")
        ledger.record_feedback(fraud["decision_id"], "confirmed-fraud", None, "bo")
        ledger.record_feedback(fraud["decision_id"], "false-positive", "card holder", "ana")
        labels = audit.feedback_labels(ledger)
        reviewed_at = {r["subject_id"]: r["created_at"] for r in ledger.feedback()}

    history = read_transactions(world["work"] / "history2.parquet", require_labels=True)
    with_reviews = jobs.build_index(history, "next", root=tmp_path, encoder=None,
                                    vector_config=VectorConfig(text_dim=0), feedback=labels)
    assert with_reviews.feedback_applied == len(genuine) + 1
    with_idx = FraudIndex.load("next", tmp_path)
    jobs.build_index(history, "plain", root=tmp_path, encoder=None,
                     vector_config=VectorConfig(text_dim=0))
    plain_idx = FraudIndex.load("plain", tmp_path)
    assert with_idx.manifest["feedback"]["feedback_head_seq"] == len(genuine) + 2

    def meta(index):
        return {r[schema.TRANSACTION_ID]: r for r in index.meta.iter_rows(named=True)}

    new, old = meta(with_idx), meta(plain_idx)
    relabelled = {d["subject_id"] for d in genuine}
    for tx in relabelled:
        assert (old[tx][schema.IS_FRAUD], new[tx][schema.IS_FRAUD]) == (0, 1)
        assert new[tx]["label_time"] == datetime.fromisoformat(reviewed_at[tx]).replace(
            tzinfo=None)
        assert old[tx]["label_time"] == old[tx][schema.TX_TIME] + timedelta(days=7)
    subject = fraud["subject_id"]
    assert (old[subject][schema.IS_FRAUD], new[subject][schema.IS_FRAUD]) == (1, 0)
    assert with_idx.manifest["fraud_count"] == plain_idx.manifest["fraud_count"] + len(genuine) - 1

    # Later transactions (after the reviews) now see the reviewed ones as fraud neighbours.
    with Ledger(f"sqlite:///{tmp_path / 'later.sqlite'}") as later:
        score_into(later, world, "batch2", "after-reviews", index=with_idx)
        score_into(later, world, "batch2", "without-reviews", index=plain_idx)
        after = {d["subject_id"]: d for d in later.decisions(batch_id="after-reviews")}
        before = {d["subject_id"]: d for d in later.decisions(batch_id="without-reviews")}
    hits = [(tx, n) for tx, d in after.items() for n in d["explanation"]["neighbours"]
            if n["transaction_id"] in relabelled]
    assert hits and all(n["is_fraud"] == 1 for _, n in hits)
    for tx, n in hits:
        same = [m for m in before[tx]["explanation"]["neighbours"]
                if m["transaction_id"] == n["transaction_id"]]
        assert all(m["is_fraud"] == 0 for m in same)  # where it was a neighbour, it was genuine
    moved = [tx for tx, _ in hits]
    assert sum(after[t]["score"] for t in moved) > sum(before[t]["score"] for t in moved)


# --- the monthly Prefect flow ---------------------------------------------------------------

def test_monthly_export_flow_writes_the_month_and_fails_on_a_broken_ledger(prefect_harness,
                                                                         tmp_path):
    from flows.export_audit import export_audit

    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    with Ledger(url) as ledger:
        three_batches(ledger)
        month = ledger.decisions()[0]["created_at"][:7]
        expected = audit.export_frame(audit.export_rows(ledger))
    report = export_audit(month=month, format="parquet", out_dir=str(tmp_path / "out"), db=url)
    assert report.rows == 10 and report.verified and report.anchors == 1
    assert Path(report.path).name == f"ledger-{month}.parquet"
    assert audit.read_export(report.path).equals(expected)
    assert audit.read_anchors(report.anchors_path)[0].head_hash == expected["hash"][-1]
    earlier = export_audit(month="2000-01", format="csv", out_dir=str(tmp_path / "out"), db=url)
    assert earlier.rows == 0

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE decisions SET decision = 'pass' WHERE seq = 3"))
    engine.dispose()
    with pytest.raises(LedgerError, match="does not verify"):
        export_audit(month=month, format="jsonl", out_dir=str(tmp_path / "out"), db=url)


# --- the command line -----------------------------------------------------------------------

def cli(*args: str, env: dict[str, str] | None = None):
    """Run the CLI in-process (as `finsentinel ...` would); returns exit code, stdout, stderr."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, list(args), env={"FINSENTINEL_PSEUDONYM_KEY": KEY,
                                                      "COLUMNS": "200", **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, flat(result.stdout), flat(result.stderr)


def test_cli_review_build_verify_anchor_export_and_replay(world, tmp_path):
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    env = {"FINSENTINEL_DB": url, "FINSENTINEL_INDEXES": str(world["root"]),
           "FINSENTINEL_REVIEWER": "dana"}
    with Ledger(url) as ledger:
        score_into(ledger, world)
        target = ledger.decisions()[10]
    code, stdout, stderr = cli("audit", "review", target["decision_id"], "--label",
                               "confirmed-fraud", "--comment", "confirmed with the bank", env=env)
    assert code == 0, stderr
    assert "confirmed-fraud by dana" in stdout

    code, _, stderr = cli("index", "build", "--input", str(world["work"] / "history2.parquet"),
                          "--name", "reviewed", "--text-dim", "0", "--root",
                          str(tmp_path / "idx"), "--db", url)
    assert code == 0, stderr
    assert "1 history rows relabelled" in stderr
    built = FraudIndex.load("reviewed", tmp_path / "idx")
    assert built.meta.filter(pl.col(schema.TRANSACTION_ID) == target["subject_id"])[
        schema.IS_FRAUD].to_list() == [1]

    code, stdout, stderr = cli("audit", "replay", target["decision_id"], "--json", env=env)
    assert code == 0, stderr
    assert json.loads(stdout)["score_difference"] == 0.0

    anchors = tmp_path / "anchors.json"
    code, stdout, _ = cli("audit", "anchor", "--out", str(anchors), env=env)
    assert code == 0 and "2 day anchors" in stdout
    today = utc_today()
    code, stdout, stderr = cli("audit", "verify", "--from", today, "--to", today, "--anchors",
                               str(anchors), env=env)
    assert code == 0, stderr
    assert "1 reviews, 2 anchors matched, chain intact" in stdout

    code, _, stderr = cli("audit", "export", "--from", today, "--to", today, "--format", "csv",
                          "--out", str(tmp_path / "month.csv"), env=env)
    assert code == 0, stderr
    exported = audit.read_export(tmp_path / "month.csv")
    assert exported.height == world["batch1"].height
    assert exported.filter(pl.col("decision_id") == target["decision_id"])[
        "review_label"].to_list() == ["confirmed-fraud"]

    forge_rebuild(sa.create_engine(url), change_seq=10)
    code, stdout, _ = cli("audit", "verify", "--anchors", str(anchors), env=env)
    assert code == 1 and "rewritten or rebuilt" in stdout


def test_cli_review_refuses_a_blank_reviewer(tmp_path):
    """A review is only worth its reviewer's name: a blank --reviewer is refused, not recorded
    anonymously; surrounding spaces are not part of the name."""
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    with Ledger(url) as ledger:
        ledger.record_batch("a", "fraud", "in-a", 2, small_decisions("a", 2))
        target = ledger.decisions()[0]["decision_id"]
    for blank in ("", "   ", "\t"):
        code, _, stderr = cli("audit", "review", target, "--label", "false-positive",
                              "--reviewer", blank, "--db", url)
        assert code == 2 and "--reviewer" in stderr, (blank, stderr)
    code, stdout, stderr = cli("audit", "review", target, "--label", "false-positive",
                               "--reviewer", "  dana ", "--db", url)
    assert code == 0, stderr
    with Ledger(url) as ledger:
        assert [r["reviewer"] for r in ledger.feedback()] == ["dana"]


def test_cli_errors_name_the_missing_key_without_a_traceback(tmp_path):
    """Through the real entry point (main), which turns expected errors into exit code 2."""
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    with Ledger(url) as ledger:
        ledger.record_batch("a", "fraud", "in-a", 1, small_decisions("a", 1))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "audit", "export", "--format", "csv", "--out",
         str(tmp_path / "x.csv"), "--db", url], capture_output=True, text=True, cwd=REPO,
        timeout=300, env={**os.environ, "FINSENTINEL_PSEUDONYM_KEY": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "FINSENTINEL_PSEUDONYM_KEY is not set" in flat(result.stderr)
    assert not (tmp_path / "x.csv").exists()


# --- auditors' edge cases (review) ------------------------------------------------------------

def test_monthly_export_flow_refuses_a_missing_ledger_file(prefect_harness, tmp_path):
    """A mistyped ledger path must not be opened as a new, empty ledger that then exports an
    empty month and reports it as verified (the CLI refuses it too)."""
    from flows.export_audit import export_audit

    missing = tmp_path / "no-such" / "ledger.sqlite"
    with pytest.raises(LedgerError, match="no ledger at"):
        export_audit(month="2024-05", format="csv", out_dir=str(tmp_path / "out"),
                     db=f"sqlite:///{missing}")
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_a_re_export_checks_the_anchors_it_would_replace(db_url, raw, tmp_path):
    """The anchors beside an export are what catches a rebuilt ledger: exporting the same
    period again over a rebuilt ledger must fail against them and keep them (and the export),
    not replace them with the forged chain's heads and report the ledger verified."""
    out = tmp_path / "ledger-month.csv"
    anchors = tmp_path / "ledger-month.csv.anchors.json"
    with Ledger(db_url) as ledger:
        three_batches(ledger)
        first = audit.export(ledger, out, "csv")
        assert first.verified
        again = audit.export(ledger, out, "csv")  # an unchanged ledger re-exports fine
        assert again.verified and again.rows == 10
    kept_export, kept_anchors = out.read_bytes(), anchors.read_bytes()
    forge_rebuild(raw, change_seq=2)
    with Ledger(db_url) as ledger:
        assert ledger.verify().ok  # without the anchors the forgery passes ...
        with pytest.raises(LedgerError, match="does not verify.*rewritten or rebuilt"):
            audit.export(ledger, out, "csv")  # ... with the anchors beside the export it fails
    assert out.read_bytes() == kept_export and anchors.read_bytes() == kept_anchors


def test_an_export_is_not_loaded_whole_into_memory(db_url, monkeypatch, tmp_path):
    """A month can hold millions of decisions: the export streams them from the database a
    chunk at a time (never the whole period as one list), each record exactly once across
    chunk and batch boundaries, in ledger order, identical in every format."""
    with Ledger(db_url) as ledger:
        three_batches(ledger)  # batches of 4, 3, 3
        ledger.record_feedback(ledger.decisions()[4]["decision_id"], "false-positive",
                               "ünïcödé, \"quoted\"\nsecond line ✓", "zoë")
        expected = audit.export_frame(audit.export_rows(ledger))
        monkeypatch.setattr(audit, "EXPORT_CHUNK_ROWS", 3, raising=False)

        def whole(*_a, **_k):
            raise AssertionError("the export read the whole period at once")

        monkeypatch.setattr(Ledger, "decisions", whole)
        for fmt in ("csv", "jsonl", "parquet"):
            report = audit.export(ledger, tmp_path / f"x.{fmt}", fmt)
            assert report.rows == 10 and report.verified
            back = audit.read_export(tmp_path / f"x.{fmt}")
            assert back["seq"].to_list() == list(range(1, 11)), fmt
            assert back.equals(expected), fmt
        alerts = audit.export(ledger, tmp_path / "alerts.jsonl", "jsonl", alerts_only=True)
        assert alerts.rows == expected.filter(pl.col("decision") == "alert").height


def test_cli_anchor_and_export_of_a_broken_or_rebuilt_ledger_exit_1(tmp_path):
    """`audit anchor` must not replace the anchors of a file with the heads of a rebuilt
    ledger (nor anchor a broken chain), and `audit export` of a ledger that does not verify
    is a failed check (exit 1), as the monthly flow's run fails, not a success with a
    warning."""
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    with Ledger(url) as ledger:
        three_batches(ledger)
    anchors = tmp_path / "anchors.json"
    code, stdout, _ = cli("audit", "anchor", "--out", str(anchors), "--db", url)
    assert code == 0 and "1 day anchors" in stdout
    code, _, _ = cli("audit", "anchor", "--out", str(anchors), "--db", url)  # unchanged: fine
    assert code == 0
    kept = anchors.read_bytes()

    forge_rebuild(sa.create_engine(url), change_seq=2)
    code, stdout, stderr = cli("audit", "anchor", "--out", str(anchors), "--db", url)
    assert code == 1, (stdout, stderr)
    assert "rewritten or rebuilt" in stdout + stderr
    assert anchors.read_bytes() == kept

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE decisions SET decision = 'pass' WHERE seq = 3"))
    engine.dispose()
    code, stdout, stderr = cli("audit", "anchor", "--out", str(tmp_path / "new.json"),
                               "--db", url)
    assert code == 1 and not (tmp_path / "new.json").exists()
    assert "seq=3" in stdout + stderr
    code, stdout, stderr = cli("audit", "export", "--format", "jsonl", "--out",
                               str(tmp_path / "x.jsonl"), "--db", url)
    assert code == 1, (stdout, stderr)
    assert "does not verify" in stdout + stderr
    assert audit.read_export(tmp_path / "x.jsonl").height == 10  # written, stating so


@pytest.mark.parametrize("where", ["empty sqlite file",
                                   pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_audit_commands_refuse_a_database_without_a_ledger(where, tmp_path, request):
    """A database that holds no ledger (an empty file, a PostgreSQL database or schema that
    was mistyped) is refused as a missing SQLite file is: opening it would create an empty
    ledger and `audit verify` would call it an intact chain."""
    if where == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        (tmp_path / "empty.sqlite").touch()
        url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    for args in (["audit", "verify"], ["audit", "anchor", "--out", str(tmp_path / "a.json")],
                 ["audit", "export", "--format", "csv", "--out", str(tmp_path / "x.csv")]):
        code, stdout, stderr = cli(*args, "--db", url)
        assert code == 2, (args, stdout, stderr)
        assert "no ledger" in stderr and "intact" not in stdout, (args, stdout, stderr)
    engine = sa.create_engine(resolve_db_url(url))
    try:
        assert not sa.inspect(engine).get_table_names()  # nothing was created
    finally:
        engine.dispose()
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "x.csv").exists()


def test_an_export_holds_the_quarantined_rows_of_its_batches_beside_it(db_url, tmp_path):
    """Rows in = rows scored + rows quarantined is half evidenced by an export of decisions
    alone: the rows each batch of the period set aside go beside it (OUT.quarantine.FMT), the
    raw record only with --reveal (it holds card ids), its sha256 always."""
    from pipeline.ledger import QuarantinedRow

    with Ledger(db_url) as ledger:
        stamps = []
        for batch_id, start, bad in (("a", 0, 2), ("b", 10, 0), ("c", 20, 1)):
            held = [QuarantinedRow(100 + i, "amount", f"not a number ({batch_id}{i})",
                                   json.dumps({"customer_id": f"card-{batch_id}{i}-Zq",
                                               "amount": "x"}))
                    for i in range(bad)]
            ledger.record_batch(batch_id, "fraud", f"in-{batch_id}", 3 + bad,
                                small_decisions(batch_id, 3, start), held)
            stamps.append(ledger.decisions(batch_id=batch_id)[0]["created_at"])
            time.sleep(0.002)
        until = datetime.fromisoformat(stamps[2])  # [a, c): batches a and b
        for fmt in ("csv", "jsonl", "parquet"):
            out = tmp_path / f"month.{fmt}"
            report = audit.export(ledger, out, fmt, until=until)
            assert (report.rows, report.quarantined) == (6, 2)
            assert report.quarantine_path == str(tmp_path / f"month.quarantine.{fmt}")
            got = audit.read_quarantine_export(report.quarantine_path)
            assert got["batch_id"].to_list() == ["a", "a"], fmt
            assert got["row_number"].to_list() == [100, 101]
            assert got["reason"].to_list() == ["not a number (a0)", "not a number (a1)"]
            assert got["raw"].null_count() == 2  # pseudonymised export: no raw record
            raws = [q["raw"] for q in ledger.quarantined("a")]
            assert got["raw_sha256"].to_list() == [
                hashlib.sha256(r.encode()).hexdigest() for r in raws]
            assert "card-a0-Zq" not in Path(report.quarantine_path).read_text(errors="ignore")
        revealed = audit.export(ledger, tmp_path / "all.csv", "csv", reveal=True)
        back = audit.read_quarantine_export(revealed.quarantine_path)
        assert (revealed.rows, revealed.quarantined) == (9, 3)
        assert back["batch_id"].to_list() == ["a", "a", "c"]
        assert back["raw"].to_list() == [q["raw"] for b in "ac" for q in ledger.quarantined(b)]
        # A selection of decisions has no quarantine file; an earlier one there is removed.
        stale = tmp_path / "month.quarantine.csv"
        alerts = audit.export(ledger, tmp_path / "month.csv", "csv", alerts_only=True)
        assert alerts.quarantine_path is None and not stale.exists()

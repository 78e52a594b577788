"""The Prefect flows under stress and scrutiny: two score flows at once on one ledger (real
processes, SQLite and PostgreSQL), retries of transient database errors only, no database
password in anything Prefect stores, and only pseudonymised ids in flow artifacts and logs."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from pipeline import jobs, schema
from pipeline.features import compute_features
from pipeline.index import FraudIndex
from pipeline.ledger import DEFAULT_DB_ENV, Ledger, LedgerError
from pipeline.privacy import PSEUDONYM_KEY_ENV
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).with_name("reliability_workers.py")


@pytest.fixture(scope="module")
def feeds(tmp_path_factory):
    """An index ``cards`` of two weeks of history and two later batches as CSV feeds (X with two
    broken rows). Ids are distinctive strings, so a leaked id can be searched for."""
    work = tmp_path_factory.mktemp("flows")
    data = generate(SyntheticConfig(n_customers=150, n_terminals=300, n_days=20, seed=21))
    data = data.with_columns(
        ("txid-" + pl.col(schema.TRANSACTION_ID).cast(pl.String) + "-Qz").alias(
            schema.TRANSACTION_ID),
        ("cust-" + pl.col(schema.CUSTOMER_ID).cast(pl.String) + "-Wv").alias(schema.CUSTOMER_ID),
    )
    start = data[schema.TX_TIME].min().replace(hour=0, minute=0, second=0, microsecond=0)
    history = data.filter(pl.col(schema.TX_TIME) < start + timedelta(days=14))
    index = FraudIndex.build(compute_features(history), encoder=None,
                             vector_config=VectorConfig(text_dim=0))
    index.save("cards", work / "indexes")
    paths, batches = {}, {}
    for name, lo, hi in (("X", 14, 17), ("Y", 17, 20)):
        batch = data.filter(pl.col(schema.TX_TIME).is_between(
            start + timedelta(days=lo), start + timedelta(days=hi), closed="left"))
        feed = batch.drop(schema.IS_FRAUD, schema.FRAUD_SCENARIO).with_columns(
            pl.col(schema.TX_TIME).dt.to_string("%Y-%m-%dT%H:%M:%S"))
        if name == "X":
            broken = feed.head(2).with_columns(
                pl.Series(schema.TRANSACTION_ID, ["broken-1", "broken-2"]),
                pl.Series(schema.AMOUNT, [-1.0, float("nan")]))
            feed = pl.concat([feed, broken])
        paths[name] = work / f"{name}.csv"
        feed.write_csv(paths[name])
        batches[name] = batch
    return {"work": work, "root": work / "indexes", "paths": paths, "batches": batches}


def api_env() -> dict[str, str]:
    """The environment for a child process that talks to this session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop(DEFAULT_DB_ENV, None)
    return env


def ledgers(request, tmp_path) -> list[str]:
    """A fresh SQLite ledger, and a fresh PostgreSQL one where the server answers."""
    urls = [f"sqlite:///{tmp_path / 'ledger.sqlite'}"]
    with contextlib.suppress(pytest.skip.Exception):  # no server: SQLite only
        urls.append(request.getfixturevalue("pg_url"))
    return urls


def test_two_score_flows_at_once_keep_every_record_and_a_valid_chain(feeds, prefect_harness,
                                                                      request, tmp_path):
    """Process A scores X then Y while process B scores Y then X, on each ledger (SQLite, then
    PostgreSQL): each batch must be recorded exactly once, by whichever process got there first.
    (Both backends share the two processes: starting Prefect in a process takes seconds.)"""
    go = tmp_path / "go"
    paths, urls = feeds["paths"], ledgers(request, tmp_path)
    plans = {"A": [f"{db}::{paths[b]}" for db in urls for b in "XY"],
             "B": [f"{db}::{paths[b]}" for db in urls for b in "YX"]}
    children = [
        subprocess.Popen([sys.executable, str(WORKERS), "flow", str(go), str(feeds["root"]),
                          str(tmp_path / tag), *plan], cwd=REPO, env=api_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for tag, plan in plans.items()
    ]
    time.sleep(1.0)
    go.touch()
    reports = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        reports += [json.loads(line[len("REPORT "):]) for line in out.splitlines()
                    if line.startswith("REPORT ")]
    assert len(reports) == 4 * len(urls)

    batches = feeds["batches"]
    expected = {"X": batches["X"].height, "Y": batches["Y"].height}
    for db_url in urls:
        by_batch: dict[str, list[dict]] = {}
        for report in reports:
            if report["db"] == db_url:
                by_batch.setdefault(report["batch_id"], []).append(report)
        assert len(by_batch) == 2
        for runs in by_batch.values():
            scored = runs[0]["scored"]
            assert [r["scored"] for r in runs] == [scored, scored]
            # One run added the batch, the other found it whole: never both, never half.
            assert sorted((r["added"], r["present"]) for r in runs) == [(0, scored), (scored, 0)]
        assert sorted(r[0]["scored"] for r in by_batch.values()) == sorted(expected.values())
        assert sorted(r[0]["quarantined"] for r in by_batch.values()) == [0, 2]

        with Ledger(db_url) as ledger:
            report = ledger.verify()
            rows = ledger.decisions()
            recorded = ledger.batches()
            held = ledger.quarantined()
        assert report.ok, report.reason
        assert report.checked == len(rows) == sum(expected.values())
        assert {r["subject_id"] for r in rows} == set(
            pl.concat([batches["X"], batches["Y"]])[schema.TRANSACTION_ID])
        assert sorted(b["rows_scored"] for b in recorded) == sorted(expected.values())
        assert len(held) == 2
        for batch_id in by_batch:  # each batch one uninterrupted run of seqs
            seqs = [r["seq"] for r in rows if r["batch_id"] == batch_id]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


# --- retries ------------------------------------------------------------------------------

def locked_error() -> OperationalError:
    """What SQLAlchemy raises when SQLite's lock wait runs out: a transient error."""
    return OperationalError("INSERT INTO decisions …", {}, sqlite3.OperationalError(
        "database is locked"))


def test_the_record_task_retries_transient_database_errors_only(feeds, prefect_harness,
                                                                  monkeypatch, tmp_path):
    import flows.score_transactions as score_flow

    real_record = jobs.record
    calls = {"n": 0}
    failures: list[BaseException] = []

    def flaky_record(*args, **kwargs):
        calls["n"] += 1
        if failures:
            raise failures.pop(0)
        return real_record(*args, **kwargs)

    monkeypatch.setattr(jobs, "record", flaky_record)
    monkeypatch.setattr(score_flow, "record_decisions",
                        score_flow.record_decisions.with_options(retry_delay_seconds=0))
    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    kwargs = dict(index="cards", root=str(feeds["root"]), db=db, threshold=0.3)

    failures[:] = [locked_error(), locked_error()]
    report = score_flow.score_transactions(input=str(feeds["paths"]["X"]),
                                           output=str(tmp_path / "x.parquet"), **kwargs)
    assert calls["n"] == 3  # two transient failures, then the write
    assert report.ledger_added == report.rows_scored == feeds["batches"]["X"].height
    with Ledger(db) as ledger:
        assert ledger.count() == report.rows_scored and ledger.verify().ok

    calls["n"] = 0
    failures[:] = [LedgerError("batch conflicts with records already in the ledger")]
    with pytest.raises(LedgerError, match="conflicts"):
        score_flow.score_transactions(input=str(feeds["paths"]["Y"]),
                                      output=str(tmp_path / "y.parquet"), **kwargs)
    assert calls["n"] == 1  # not transient: no retry
    with Ledger(db) as ledger:
        assert ledger.count() == report.rows_scored and len(ledger.batches()) == 1


# --- secrets and pseudonyms in what Prefect stores -------------------------------------------

def run_record(flow_run_id) -> str:
    """Everything Prefect holds about a flow run and its tasks, as one text: the run, its
    parameters, task runs, logs and artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    parts = [run.model_dump_json(), *(t.model_dump_json() for t in tasks),
             *(log.model_dump_json() for log in logs),
             *(a.model_dump_json() for a in artifacts)]
    assert logs and artifacts, "expected the run to have logged and made artifacts"
    return "\n".join(parts)


def with_password(url: str, password: str) -> str:
    """The test server trusts local connections, so any password is accepted: a canary."""
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def test_a_ledger_password_never_reaches_prefect(feeds, prefect_harness, pg_url, tmp_path):
    from flows.score_transactions import score_transactions

    canary = "s3cret-Canary-7Hq"
    state = score_transactions(input=str(feeds["paths"]["X"]), index="cards",
                               root=str(feeds["root"]), output=str(tmp_path / "x.parquet"),
                               db=SecretStr(with_password(pg_url, canary)), threshold=0.3,
                               return_state=True)
    report = state.result()
    assert report.ledger_added == feeds["batches"]["X"].height
    stored = run_record(state.state_details.flow_run_id)
    assert canary not in stored
    assert '"db":"**********"' in stored.replace(" ", "")

    # A plain-string URL with a password is refused, and the refusal does not echo it.
    plain = "plain-Canary-5Rt"
    with pytest.raises(ValueError, match="SecretStr") as refused:
        score_transactions(input=str(feeds["paths"]["Y"]), index="cards",
                           root=str(feeds["root"]), output=str(tmp_path / "y.parquet"),
                           db=with_password(pg_url, plain))
    assert plain not in str(refused.value)
    with Ledger(pg_url) as ledger:
        assert len(ledger.batches()) == 1

    # The hourly inbox job refuses it before trying a file: the file waits, not failed.
    from flows.score_transactions import score_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    waiting = inbox / "y.parquet"
    waiting.write_bytes(feeds["paths"]["Y"].read_bytes())
    with pytest.raises(ValueError, match="SecretStr") as refused:
        score_inbox(inbox=str(inbox), index="cards", root=str(feeds["root"]),
                    output_dir=str(tmp_path / "scores"), db=with_password(pg_url, plain))
    assert plain not in str(refused.value)
    assert waiting.exists() and not (inbox / "failed").exists() and not (inbox / "done").exists()


def test_flow_artifacts_and_logs_hold_pseudonyms_not_ids(feeds, prefect_harness, monkeypatch,
                                                         tmp_path):
    from flows.score_transactions import score_transactions

    key = "test-pseudonym-key-9f"
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, key)
    state = score_transactions(input=str(feeds["paths"]["Y"]), index="cards",
                               root=str(feeds["root"]), output=str(tmp_path / "y.parquet"),
                               db=f"sqlite:///{tmp_path / 'l.sqlite'}", alerts_per_day=5,
                               return_state=True)
    report = state.result()
    assert report.alerts > 0
    stored = run_record(state.state_details.flow_run_id)
    batch = feeds["batches"]["Y"]
    leaked = [v for v in (*batch[schema.TRANSACTION_ID], *batch[schema.CUSTOMER_ID].unique())
              if v in stored]
    assert leaked == []

    def reference(value: str) -> str:  # keyed HMAC-SHA256, written out independently
        return "p_" + hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()[:16]

    scores = pl.read_parquet(report.output)
    top = scores.filter(pl.col("decision") == "alert").sort("score", descending=True).head(10)
    for tx, customer in top.select(schema.TRANSACTION_ID, schema.CUSTOMER_ID).iter_rows():
        assert reference(tx) in stored and reference(customer) in stored


def test_news_inbox_with_a_secret_ledger_url_classifies_and_keeps_the_password(
        prefect_harness, pg_url, monkeypatch, tmp_path):
    """classify_inbox given the URL as SecretStr (as it must be, with a password) classifies the
    waiting file, moves it to done/, and no run it makes stores the password."""
    from dashboard_seed import LexiconClassifier
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    import flows.classify_news as news_flow

    monkeypatch.setattr(news_flow, "load_classifier", lambda *a, **k: LexiconClassifier())
    inbox = tmp_path / "news-inbox"
    inbox.mkdir()
    (inbox / "wire.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"id": "n1", "published": "2024-05-01T10:00:00", "source": "wire",
         "headline": "$AAPL beats estimates, shares jump", "tickers": ["AAPL"]},
        {"id": "n2", "published": "2024-05-01T11:00:00", "source": "wire",
         "headline": "$MSFT misses on probe", "tickers": ["MSFT"]})) + "\n")
    arrived = time.time() - 3600  # past the inbox's settle interval
    os.utime(inbox / "wire.jsonl", (arrived, arrived))
    canary = "s3cret-News-Canary-4Lp"
    state = news_flow.classify_inbox(inbox=str(inbox), model="lexicon",
                                     output_dir=str(tmp_path / "news"),
                                     db=SecretStr(with_password(pg_url, canary)),
                                     return_state=True)
    assert state.is_completed(), state.result(raise_on_failure=False)
    [report] = state.result()
    assert report.rows_classified == 2 and report.ledger_added == 2
    assert [p.name for p in (inbox / "done").iterdir()] == ["wire.jsonl"]
    with Ledger(pg_url) as ledger:
        assert ledger.count() == 2 and ledger.verify().ok
    parent = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        inbox_run = client.read_flow_run(parent).model_dump_json()
    assert len(children) == 1
    assert canary not in inbox_run
    child = run_record(children[0].id)
    assert canary not in child
    assert '"db":"**********"' in child.replace(" ", "")


def test_an_unusable_inbox_file_is_read_once_not_retried(feeds, prefect_harness, monkeypatch,
                                                         tmp_path):
    """A file that cannot be read (InputError) fails the same way every attempt: the ingest
    tasks fail it at once instead of re-reading it twice with delays (a large broken file read
    three times per run), while an I/O error that another attempt may fix is still retried."""
    import flows.build_index as build_flow
    import flows.classify_news as news_flow
    import flows.score_transactions as score_flow
    from pipeline.ingest import InputError

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for module, reader, run in (
            (score_flow, "read_transactions", lambda: score_flow.score_transactions(
                input=str(empty), index="cards", root=str(feeds["root"]),
                output=str(tmp_path / "out.parquet"),
                db=f"sqlite:///{tmp_path / 'ledger.sqlite'}")),
            (news_flow, "read_news", lambda: news_flow.classify_news(
                input=str(empty), model="m", output=str(tmp_path / "news.parquet"),
                db=f"sqlite:///{tmp_path / 'ledger.sqlite'}")),
            (build_flow, "read_transactions", lambda: build_flow.build_index(
                input=str(empty), name="x", root=str(tmp_path / "indexes"), text_dim=0,
                db=f"sqlite:///{tmp_path / 'ledger.sqlite'}"))):
        real = getattr(module, reader)
        calls = []

        def counting(*args, _real=real, _calls=calls, **kwargs):
            _calls.append(args)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, reader, counting)
        with pytest.raises(InputError, match="empty"):
            run()
        assert len(calls) == 1, f"{module.__name__}: unusable file read {len(calls)} times"

    # An I/O error is worth another attempt: still retried.
    from pipeline.ingest import read_transactions

    attempts = []

    def flaky(path, *args, **kwargs):
        attempts.append(path)
        if len(attempts) == 1:
            raise OSError("stale NFS file handle")
        return read_transactions(path, *args, **kwargs)

    monkeypatch.setattr(score_flow, "ingest_batch",
                        score_flow.ingest_batch.with_options(retry_delay_seconds=0))
    monkeypatch.setattr(score_flow, "read_transactions", flaky)
    report = score_flow.score_transactions(
        input=str(feeds["paths"]["Y"]), index="cards", root=str(feeds["root"]),
        output=str(tmp_path / "y.parquet"), db=f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    assert len(attempts) == 2 and report.rows_scored == feeds["batches"]["Y"].height

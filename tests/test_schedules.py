"""Schedules: prefect.yaml and `finsentinel serve` declare the same deployments with the issue's
cadences; serve registers them with a Prefect API; the hourly inbox job scores new files,
moves them to done/ (unusable ones to failed/) and is idempotent."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml

from flows.deployments import SCHEDULES, build_deployments, select
from pipeline import jobs, schema
from pipeline.ingest import read_transactions
from pipeline.ledger import Ledger
from pipeline.settings import JobSettings
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig

REPO = Path(__file__).resolve().parents[1]
# The cadences: time between two consecutive runs (None: monthly, on the 1st).
CADENCE = {"score_inbox": timedelta(hours=1), "build_index": timedelta(days=1),
           "classify_inbox": timedelta(minutes=15), "export_audit": None,
           "evaluate_scorer": timedelta(weeks=1)}


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    from prefect.cli.deploy._models import PrefectYamlModel

    document = yaml.safe_load((REPO / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(document)  # what `prefect deploy` reads
    return {d["name"]: d for d in document["deployments"]}


def _settled(*paths: Path, age: float = 3600) -> None:
    """Files that arrived ``age`` seconds ago: past the inbox's settle interval."""
    when = time.time() - age
    for path in paths:
        os.utime(path, (when, when))


def _fire_times(cron: str, n: int = 3) -> list[datetime]:
    from cronsim import CronSim

    it = CronSim(cron, datetime(2024, 1, 1))
    return [next(it) for _ in range(n)]


def test_prefect_yaml_and_serve_declare_the_same_deployments(prefect_yaml):
    from prefect.client.schemas.schedules import CronSchedule

    assert set(prefect_yaml) == {s.name for s in SCHEDULES}
    flows_scheduled = set()
    for spec, deployment in zip(SCHEDULES, build_deployments(), strict=True):
        declared = prefect_yaml[spec.name]
        assert declared["entrypoint"] == spec.entrypoint
        path, function = spec.entrypoint.split(":")
        assert (REPO / path).is_file()
        flow = spec.load_flow()
        assert flow.fn.__name__ == function
        flows_scheduled.add(function)
        # Parameters: the flow accepts them, with the types it declares.
        assert declared.get("parameters", {}) == spec.parameters
        inspect.signature(flow.fn).bind_partial(**spec.parameters)
        flow.validate_parameters(spec.parameters)
        # Schedules: a valid cron, equal in both, UTC, at the cadence.
        [schedule] = declared["schedules"]
        assert schedule["cron"] == spec.cron and schedule.get("timezone", "UTC") == "UTC"
        CronSchedule(cron=spec.cron)
        cadence = CADENCE[function]
        fires = _fire_times(spec.cron)
        if cadence is None:
            assert [t.day for t in fires] == [1, 1, 1]
            assert [t.month for t in fires] == [1, 2, 3]
        else:
            assert {b - a for a, b in zip(fires, fires[1:], strict=False)} == {cadence}
        # One run at a time, the next one cancelled while one is going: in both.
        assert declared["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
        assert deployment.concurrency_limit == 1
        assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
        # What serve builds is the same deployment.
        assert deployment.name == spec.name
        assert deployment.parameters == spec.parameters
        [served] = deployment.schedules
        assert served.schedule.cron == spec.cron
        assert deployment.entrypoint.endswith(spec.entrypoint)
    assert flows_scheduled == set(CADENCE)


def test_unknown_deployment_name_is_refused():
    assert [s.name for s in select(["score-hourly"])] == ["score-hourly"]
    with pytest.raises(ValueError, match="unknown deployment.*expected one of"):
        select(["score-daily"])


def test_settings_come_from_the_environment(tmp_path):
    defaults = JobSettings.from_env({})
    assert defaults.inbox == Path("finsentinel-work/inbox")
    assert defaults.index_name == "fraud" and defaults.sentiment_model is None
    custom = JobSettings.from_env({"FINSENTINEL_WORKDIR": str(tmp_path),
                                   "FINSENTINEL_INBOX": "/in", "FINSENTINEL_INDEX_NAME": "x",
                                   "FINSENTINEL_EVALUATIONS": " "})
    assert custom.inbox == Path("/in") and custom.index_name == "x"
    assert custom.scores == tmp_path / "scores"
    assert custom.evaluations == tmp_path / "evaluations"  # blank means unset


def test_serve_registers_the_deployments_with_their_schedules(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve"], cwd=REPO,
                            env={**os.environ, "PREFECT_API_URL": api, "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    expected = {s.name: s.cron for s in SCHEDULES}
    found: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 180
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline and proc.poll() is None:
                found = {d.name: d.schedules[0].schedule.cron
                         for d in client.read_deployments() if d.name in expected
                         and d.schedules}
                if found == expected:
                    break
                time.sleep(1)
            registered = {d.name: d for d in client.read_deployments() if d.name in expected}
    finally:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert found == expected, output[-3000:]
    assert registered["export-audit-monthly"].parameters == {"format": "jsonl"}
    assert all(d.schedules[0].active for d in registered.values())
    assert {(d.global_concurrency_limit.limit, str(d.concurrency_options.collision_strategy
                                                   .value))
            for d in registered.values()} == {(1, "CANCEL_NEW")}
    assert "score-hourly" in output and "0 * * * *" in output  # the table it prints


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    work = tmp_path_factory.mktemp("inbox")
    data = generate(SyntheticConfig(n_customers=80, n_terminals=160, n_days=28, seed=9))
    split = data[schema.TX_TIME].min().replace(hour=0, minute=0, second=0) + timedelta(days=21)
    data.filter(pl.col(schema.TX_TIME) < split).write_parquet(work / "history.parquet")
    jobs.build_index(read_transactions(work / "history.parquet", require_labels=True), "fraud",
                     root=work / "indexes", encoder=None, vector_config=VectorConfig(text_dim=0))
    feed = data.filter(pl.col(schema.TX_TIME) >= split).drop(schema.LABELS)
    return {"root": work / "indexes", "feed": feed}


def test_hourly_inbox_job_scores_new_files_once(small_index, prefect_harness, tmp_path,
                                                monkeypatch):
    from flows.score_transactions import score_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    feed = small_index["feed"]
    first, second = feed.head(feed.height // 2), feed.tail(feed.height - feed.height // 2)
    first.write_parquet(inbox / "monday.parquet")
    second.write_csv(inbox / "tuesday.csv")
    (inbox / "broken.jsonl").write_text("")  # unusable: empty
    (inbox / ".partial.parquet").write_bytes(b"still being copied")
    _settled(*inbox.iterdir())
    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    monkeypatch.setenv("FINSENTINEL_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("FINSENTINEL_INBOX", str(inbox))
    monkeypatch.setenv("FINSENTINEL_INDEXES", str(small_index["root"]))
    monkeypatch.setenv("FINSENTINEL_DB", db)

    state = score_inbox(return_state=True)  # the scheduled run: no parameters but the yaml's
    assert state.is_failed()  # one file was unusable: the run says so, after doing the rest
    assert "broken.jsonl" in str(state.result(raise_on_failure=False))
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["monday.parquet",
                                                                  "tuesday.csv"]
    assert (inbox / "failed" / "broken.jsonl").exists()
    assert "empty" in (inbox / "failed" / "broken.jsonl.error.txt").read_text()
    assert (inbox / ".partial.parquet").exists()  # hidden files are left alone
    scores = tmp_path / "work" / "scores"
    monday = pl.read_parquet(scores / "monday.scores.parquet")
    tuesday = pl.read_parquet(scores / "tuesday.scores.parquet")
    assert (monday.height, tuesday.height) == (first.height, second.height)
    with Ledger(db) as ledger:
        assert ledger.count() == feed.height
        assert ledger.verify().ok

    # Nothing new: nothing done. The same rows dropped again add nothing to the ledger.
    assert score_inbox() == []
    first.write_parquet(inbox / "monday.parquet")
    _settled(inbox / "monday.parquet")
    [report] = score_inbox()
    assert (report.ledger_added, report.ledger_already_present) == (0, first.height)
    assert len(list((inbox / "done").glob("monday*.parquet"))) == 2
    with Ledger(db) as ledger:
        assert ledger.count() == feed.height


def test_hourly_inbox_job_leaves_files_still_being_copied_in(small_index, prefect_harness,
                                                            tmp_path, monkeypatch):
    """A producer copying straight into the inbox (scp, cp, an SFTP drop): a scheduled run that
    fires mid-copy leaves the half-written CSV and Parquet where they are (not a part of the
    rows scored and archived, not moved to failed/), and a later run, once they are complete
    and quiet for the settle interval ($FINSENTINEL_INBOX_SETTLE_SECONDS, default 60 s), scores
    every row."""
    from flows.score_transactions import score_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    feed = small_index["feed"]
    settled, csv_rows, parquet_rows = feed.head(30), feed.slice(30, 50), feed.slice(80, 50)
    settled.write_csv(inbox / "settled.csv")
    _settled(inbox / "settled.csv")
    csv_text = csv_rows.write_csv()
    parquet_rows.write_parquet(tmp_path / "full.parquet")
    parquet_bytes = (tmp_path / "full.parquet").read_bytes()
    (inbox / "copying.csv").write_text(csv_text[:len(csv_text) // 2])  # mid-copy: fresh mtime
    (inbox / "copying.parquet").write_bytes(parquet_bytes[:len(parquet_bytes) // 2])
    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    monkeypatch.delenv("FINSENTINEL_INBOX_SETTLE_SECONDS", raising=False)  # the default
    monkeypatch.setenv("FINSENTINEL_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("FINSENTINEL_INDEXES", str(small_index["root"]))
    monkeypatch.setenv("FINSENTINEL_DB", db)

    [report] = score_inbox(inbox=str(inbox))
    assert report.rows_scored == settled.height
    assert [p.name for p in (inbox / "done").iterdir()] == ["settled.csv"]
    assert not (inbox / "failed").exists()
    assert (inbox / "copying.csv").read_text() == csv_text[:len(csv_text) // 2]
    assert (inbox / "copying.parquet").read_bytes() == parquet_bytes[:len(parquet_bytes) // 2]
    with Ledger(db) as ledger:
        assert ledger.count() == settled.height

    # The copies complete and go quiet: the next run takes both, whole.
    (inbox / "copying.csv").write_text(csv_text)
    (inbox / "copying.parquet").write_bytes(parquet_bytes)
    _settled(inbox / "copying.csv", inbox / "copying.parquet", age=120)
    reports = score_inbox(inbox=str(inbox))
    assert sorted(r.rows_scored for r in reports) == [csv_rows.height, parquet_rows.height]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == [
        "copying.csv", "copying.parquet", "settled.csv"]
    with Ledger(db) as ledger:
        assert ledger.count() == settled.height + csv_rows.height + parquet_rows.height
        assert ledger.verify().ok


def test_weekly_evaluation_tests_the_latest_week():
    from flows.evaluate import latest_test_start
    from pipeline.evaluation import DAY, ProtocolConfig

    frame = pl.DataFrame({DAY: [datetime(2024, 3, d).date() for d in range(1, 29)]})
    assert latest_test_start(frame, ProtocolConfig()).isoformat() == "2024-03-22"


def test_a_file_name_dropped_again_gets_its_own_scores_file(small_index, prefect_harness,
                                                            tmp_path, monkeypatch):
    """A feed that always arrives as `feed.csv`: each hour's drop keeps its own scores (and
    quarantine) file; a later drop never overwrites an earlier one's, nor sits beside its
    quarantine file."""
    from flows.score_transactions import score_inbox

    inbox, scores = tmp_path / "inbox", tmp_path / "work" / "scores"
    inbox.mkdir()
    feed = small_index["feed"]
    first, second = feed.head(40), feed.slice(40, 60)
    bad = first.head(1).with_columns(pl.lit("broken-amount").alias(schema.TRANSACTION_ID),
                                     pl.lit(-5.0).alias(schema.AMOUNT))
    monkeypatch.setenv("FINSENTINEL_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("FINSENTINEL_INDEXES", str(small_index["root"]))
    monkeypatch.setenv("FINSENTINEL_DB", f"sqlite:///{tmp_path / 'ledger.sqlite'}")

    pl.concat([first, bad]).write_csv(inbox / "feed.csv")
    _settled(inbox / "feed.csv", age=7200)
    [hour1] = score_inbox(inbox=str(inbox))
    second.write_csv(inbox / "feed.csv")
    _settled(inbox / "feed.csv")
    [hour2] = score_inbox(inbox=str(inbox))
    assert (hour1.rows_scored, hour1.rows_quarantined) == (40, 1)
    assert (hour2.rows_scored, hour2.rows_quarantined) == (60, 0)
    assert hour1.output != hour2.output and hour2.quarantine is None
    assert pl.read_parquet(hour1.output)[schema.TRANSACTION_ID].to_list() \
        == first[schema.TRANSACTION_ID].to_list()
    assert pl.read_parquet(hour2.output)[schema.TRANSACTION_ID].to_list() \
        == second[schema.TRANSACTION_ID].to_list()
    written = sorted(p.name for p in scores.iterdir())
    assert len(written) == 3 and Path(hour1.quarantine).name in written
    assert sum(1 for name in written if "quarantine" in name) == 1
    assert len(list((inbox / "done").iterdir())) == 2


def test_daily_index_build_reads_reviews_from_the_default_ledger(prefect_harness, tmp_path,
                                                                 monkeypatch):
    """No database configured: the scheduled jobs record to $FINSENTINEL_WORKDIR/ledger.sqlite,
    so the daily build must take analysts' reviews from there; without that file it builds
    without reviews and creates no ledger."""
    from flows.build_index import build_index
    from pipeline.ledger import Decision

    data = generate(SyntheticConfig(n_customers=60, n_terminals=120, n_days=21, seed=5))
    data.write_parquet(tmp_path / "history.parquet")
    genuine = data.filter(pl.col(schema.IS_FRAUD) == 0)[schema.TRANSACTION_ID][0]
    work = tmp_path / "work"
    monkeypatch.delenv("FINSENTINEL_DB", raising=False)
    monkeypatch.setenv("FINSENTINEL_WORKDIR", str(work))
    kwargs = dict(input=str(tmp_path / "history.parquet"), name="daily", root=str(tmp_path),
                  text_dim=0)

    assert build_index(**kwargs).feedback_applied == 0
    assert not (work / "ledger.sqlite").exists()

    with Ledger(f"sqlite:///{work / 'ledger.sqlite'}") as ledger:
        ledger.record_batch("b", "fraud", "in", 1, [Decision(
            batch_id="b", kind="fraud", subject_id=str(genuine), score=0.1, threshold=0.5,
            decision="pass", model_version="m", index_version="i@1", input_hash="h",
            explanation={})])
        ledger.record_feedback(ledger.decisions()[0]["decision_id"], "confirmed-fraud",
                               "chargeback", "ana")
    assert build_index(**kwargs).feedback_applied == 1


def test_a_blank_setting_is_unset_for_the_index_root_and_the_ledger_too(monkeypatch):
    """JobSettings, the dashboard and the CLI take a blank variable (an empty value left in a
    compose file or a systemd unit) as unset; the index root took it as the current folder and
    the default ledger as a folder named by spaces."""
    from pipeline.index import default_root
    from pipeline.ledger import resolve_db_url

    monkeypatch.delenv("FINSENTINEL_DB", raising=False)
    monkeypatch.setenv("FINSENTINEL_INDEXES", "")
    monkeypatch.setenv("FINSENTINEL_WORKDIR", "  ")
    assert default_root() == Path("indexes")
    assert resolve_db_url(None).endswith(
        str(Path(JobSettings.from_env().workdir) / "ledger.sqlite"))


def test_flow_modules_answer_help_without_serving():
    """`python -m flows.export_audit --help` used to ignore its arguments and start serving
    (a temporary Prefect server, then a schedule) until killed."""
    for module, option in (("flows.export_audit", "--cron"), ("flows.classify_news", "--cron")):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr
        assert option in done.stdout and "usage:" in done.stdout
    refused = subprocess.run([sys.executable, "-m", "flows.export_audit", "--format", "xml"],
                             capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parents[1])
    assert refused.returncode == 2 and "invalid choice: 'xml'" in refused.stderr

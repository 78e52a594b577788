"""The fraud pipeline end to end: synthetic data -> flows / CLI -> scores, quarantine, ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from pipeline import schema
from pipeline.ledger import Ledger
from pipeline.metrics import average_precision, roc_auc
from pipeline.synthetic import SyntheticConfig, generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four weeks of synthetic transactions: history (labelled) and the last week as a CSV feed
    without labels plus three broken rows."""
    work = tmp_path_factory.mktemp("e2e")
    data = generate(SyntheticConfig(n_customers=400, n_terminals=800, n_days=28, seed=11))
    split = data[schema.TX_TIME].min().replace(hour=0, minute=0, second=0) + timedelta(days=21)
    history = data.filter(pl.col(schema.TX_TIME) < split)
    batch = data.filter(pl.col(schema.TX_TIME) >= split)
    feed = batch.drop(schema.IS_FRAUD, schema.FRAUD_SCENARIO).with_columns(
        pl.col(schema.TX_TIME).dt.to_string("%Y-%m-%dT%H:%M:%S"))
    broken = feed.head(3).with_columns(
        pl.Series(schema.TRANSACTION_ID, ["neg", "when", feed[schema.TRANSACTION_ID][0]]),
        pl.Series(schema.AMOUNT, [-5.0, 12.0, 12.0]),
        pl.Series(schema.TX_TIME, [feed[schema.TX_TIME][0], "yesterday-ish",
                                   feed[schema.TX_TIME][0]]),
    )
    history.write_parquet(work / "history.parquet")
    pl.concat([feed, broken]).write_csv(work / "batch.csv")
    return {"work": work, "split": split, "history": history, "batch": batch,
            "rows_in": feed.height + 3}


def _check_scores(scores: pl.DataFrame, batch: pl.DataFrame) -> None:
    labelled = scores.join(batch.select(schema.TRANSACTION_ID, schema.IS_FRAUD),
                           on=schema.TRANSACTION_ID)
    assert labelled.height == batch.height == scores.height
    y, s = labelled[schema.IS_FRAUD].to_numpy(), labelled["score"].to_numpy()
    assert ((s >= 0) & (s <= 1)).all()
    # Real evidence, not noise: well above random ranking and above the base rate.
    assert roc_auc(y, s) > 0.7
    assert average_precision(y, s) > 3 * y.mean()


def test_flows_score_record_and_are_idempotent(dataset, prefect_harness, db_url, tmp_path):
    from flows.build_index import build_index
    from flows.score_transactions import score_transactions

    work = dataset["work"]
    built = build_index(input=str(work / "history.parquet"), name="e2e", root=str(tmp_path),
                        until=dataset["split"])
    assert built.vectors == dataset["history"].filter(
        pl.col(schema.TX_TIME) + timedelta(days=7) <= dataset["split"]).height

    kwargs = dict(input=str(work / "batch.csv"), index="e2e", output=str(tmp_path / "s.parquet"),
                  db=db_url, root=str(tmp_path), alerts_per_day=20)
    report = score_transactions(**kwargs)
    assert report.rows_in == dataset["rows_in"] == report.rows_scored + report.rows_quarantined
    assert report.rows_quarantined == 3
    assert report.ledger_added == report.rows_scored
    assert 0 < report.alerts <= 20 * 7 + 7  # at most N per day, ties aside

    scores = pl.read_parquet(report.output)
    _check_scores(scores, dataset["batch"])
    quarantine = pl.read_parquet(report.quarantine)
    assert sorted(quarantine["field"].to_list()) == ["amount", "transaction_id", "tx_time"]

    with Ledger(db_url) as ledger:
        assert ledger.count() == report.rows_scored
        assert ledger.verify().ok
        decisions = ledger.decisions(batch_id=report.batch_id)
        assert len(ledger.quarantined(report.batch_id)) == 3
    first = decisions[0]
    explanation = first["explanation"]
    assert len(explanation["neighbours"]) == 10
    assert all(n["tx_time"] < first["created_at"] for n in explanation["neighbours"])
    assert set(explanation["features"]) == set(schema.MODEL_FEATURES)
    row = scores.filter(pl.col(schema.TRANSACTION_ID) == first["subject_id"])
    assert first["score"] == pytest.approx(row["score"][0])
    assert first["index_version"].startswith("e2e@")

    again = score_transactions(**kwargs)
    assert again.batch_id == report.batch_id
    assert again.ledger_added == 0 and again.ledger_already_present == report.rows_scored
    with Ledger(db_url) as ledger:
        assert ledger.count() == report.rows_scored and ledger.verify().ok

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"fraud-batch-counts", "fraud-top-alerts", "index-build"} <= keys


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)


def test_cli_features_index_score_and_verify(dataset, tmp_path, pg_url):
    work = dataset["work"]
    features = _cli("features", "--input", str(work / "history.parquet"),
                    "--output", str(tmp_path / "f.parquet"))
    assert features.returncode == 0, features.stderr
    assert set(schema.FEATURES) <= set(pl.read_parquet(tmp_path / "f.parquet").columns)

    env = {"FINSENTINEL_INDEXES": str(tmp_path / "idx"), "FINSENTINEL_DB": pg_url}
    build = _cli("index", "build", "--input", str(work / "history.parquet"), "--name", "cards",
                 "--until", dataset["split"].isoformat(), "--text-dim", "0", env=env)
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "idx" / "cards" / "CURRENT").exists()

    score = _cli("score", "--input", str(work / "batch.csv"), "--index", "cards",
                 "--output", str(tmp_path / "scores.csv"), "--batch-id", "week-4",
                 "--threshold", "0.3", env=env)
    assert score.returncode == 0, score.stderr
    assert "quarantined 3" in score.stderr
    scores = pl.read_csv(tmp_path / "scores.csv",
                         schema_overrides={schema.TRANSACTION_ID: pl.String})
    _check_scores(scores, dataset["batch"])
    assert ((scores["score"] >= 0.3) == (scores["decision"] == "alert")).all()

    verify = _cli("audit", "verify", env=env)
    assert verify.returncode == 0 and "chain intact" in verify.stdout
    with Ledger(pg_url) as ledger:
        assert ledger.count() == scores.height
        assert {b["batch_id"] for b in ledger.batches()} == {"week-4"}


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,when,card\n1,2024-01-01,7\n")
    result = _cli("features", "--input", str(bad), "--output", str(tmp_path / "o.parquet"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing required column" in result.stderr and "found" in result.stderr

    both = _cli("score", "--input", str(bad), "--index", "x", "--output", "o.csv",
                "--threshold", "0.5", "--alerts-per-day", "5")
    assert both.returncode == 2 and "not both" in both.stderr

    missing = _cli("score", "--input", str(bad), "--index", "nope", "--output", "o.csv",
                   env={"FINSENTINEL_INDEXES": str(tmp_path)})
    assert missing.returncode == 2 and "no artifact named 'nope'" in missing.stderr


def test_demo_command_runs_the_whole_pipeline(tmp_path):
    result = _cli("demo", "--workdir", str(tmp_path / "demo"), "--customers", "300",
                  "--terminals", "600", "--days", "21", "--json",
                  env={"PREFECT_HOME": str(tmp_path / "prefect"), "FINSENTINEL_DB": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["batch_rows_in"] == report["scored"] + report["quarantined"]
    assert report["quarantined"] == 3
    assert report["ledger_verified"] is True
    assert report["ledger_records"] == report["scored"]
    assert report["auc_roc"] > 0.7
    assert Path(report["scores_file"]).exists()


def test_demo_twice_in_one_folder_uses_only_its_own_ledger(prefect_harness, tmp_path,
                                                           monkeypatch):
    """`finsentinel demo --db URL` works on that ledger alone, even with $FINSENTINEL_DB set
    (another team's ledger); run again in the same folder, it adds nothing to it."""
    from pipeline.demo import DemoConfig, run_demo

    elsewhere = tmp_path / "production.sqlite"
    monkeypatch.setenv("FINSENTINEL_DB", f"sqlite:///{elsewhere}")
    config = DemoConfig(workdir=tmp_path / "demo", customers=200, terminals=400, days=21,
                        db=f"sqlite:///{tmp_path / 'demo-ledger.sqlite'}")
    first = run_demo(config, log=lambda _: None)
    second = run_demo(config, log=lambda _: None)
    assert not elsewhere.exists()
    assert first.ledger_records == first.scored == second.ledger_records == second.scored
    assert (first.quarantined, second.quarantined) == (3, 3)
    assert second.ledger_verified and second.auc_roc == first.auc_roc
    assert first.index != second.index  # rebuilt: a new version, the old one kept

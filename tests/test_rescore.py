"""A batch scored (or news classified) again when the ledger already holds it, with other
settings (threshold, alerts per day, a newer index or another model): the ledger keeps the
recorded decisions (idempotent re-runs, input-derived batch ids), and so does the output file
(what operations act on is what auditors find), while the report and the CLI say how many
decisions this run would have made differently, with which recorded version, and how to
record the new ones (a new ``--batch-id``). On SQLite and PostgreSQL."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from pipeline import jobs, schema
from pipeline.index import FraudIndex
from pipeline.ingest import read_transactions
from pipeline.ledger import Ledger
from pipeline.news_store import NewsStore
from pipeline.scoring import ScoringConfig
from pipeline.sentiment import Prediction
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig

sys.path.insert(0, str(Path(__file__).parent))
from reliability_workers import run_cli  # noqa: E402
from test_audit import flat  # noqa: E402


@pytest.fixture(scope="module")
def feed(tmp_path_factory):
    """An index of 21 days of history (versions ``v1`` and ``v2``: the second built on a week
    less, as a daily rebuild makes another version), and the next week as a Parquet file."""
    work = tmp_path_factory.mktemp("rescore")
    data = generate(SyntheticConfig(n_customers=80, n_terminals=160, n_days=28, seed=11))
    split = data[schema.TX_TIME].min().replace(hour=0, minute=0, second=0) + timedelta(days=21)
    data.filter(pl.col(schema.TX_TIME) < split).write_parquet(work / "history.parquet")
    history = read_transactions(work / "history.parquet", require_labels=True)
    root = work / "indexes"
    jobs.build_index(history, "fraud", root=root, encoder=None,
                     vector_config=VectorConfig(text_dim=0))
    v1 = FraudIndex.load("fraud", root)
    jobs.build_index(history, "fraud", root=root, encoder=None,
                     vector_config=VectorConfig(text_dim=0), until=split - timedelta(days=7))
    v2 = FraudIndex.load("fraud", root)
    assert v1.version != v2.version
    data.filter(pl.col(schema.TX_TIME) >= split).drop(schema.LABELS).write_parquet(
        work / "week.parquet")
    return {"work": work, "root": root, "input": work / "week.parquet", "v1": v1, "v2": v2}


def _ledger_view(db_url: str, batch_id: str) -> pl.DataFrame:
    with Ledger(db_url) as ledger:
        rows = ledger.decisions(batch_id=batch_id, parse=False)
    return pl.DataFrame({schema.TRANSACTION_ID: [r["subject_id"] for r in rows],
                         "score": [r["score"] for r in rows],
                         "threshold": [r["threshold"] for r in rows],
                         "decision": [r["decision"] for r in rows],
                         "index_version": [r["index_version"] for r in rows]}
                        ).sort(schema.TRANSACTION_ID)


def _output_view(path: str | Path) -> pl.DataFrame:
    return pl.read_parquet(path).select(schema.TRANSACTION_ID, "score", "threshold",
                                        "decision").sort(schema.TRANSACTION_ID)


def test_rescoring_with_another_threshold_keeps_and_writes_the_recorded_decisions(
        feed, db_url, tmp_path):
    index = feed["v1"]
    with Ledger(db_url) as ledger:
        first = jobs.score_file(feed["input"], index, tmp_path / "first.parquet", ledger=ledger,
                                config=ScoringConfig(threshold=0.5))
        same = jobs.score_file(feed["input"], index, tmp_path / "same.parquet", ledger=ledger,
                               config=ScoringConfig(threshold=0.5))
        lower = jobs.score_file(feed["input"], index, tmp_path / "lower.parquet",
                                ledger=ledger, config=ScoringConfig(threshold=0.05))
    fresh = pl.read_parquet(tmp_path / "first.parquet")
    would_flip = int((fresh["score"] >= 0.05).sum() - (fresh["score"] >= 0.5).sum())
    assert would_flip > 0  # the lower threshold really changes decisions

    assert (first.ledger_differing, first.ledger_index_version) == (0, None)
    assert jobs.ledger_warning(first) is None
    # The same settings again: idempotent, nothing differs, nothing to say.
    assert (same.ledger_added, same.ledger_already_present) == (0, first.rows_scored)
    assert (same.ledger_differing, same.ledger_index_version) == (0, index.version)
    assert jobs.ledger_warning(same) is None

    # Another threshold: still nothing added, and the difference is counted and named.
    assert lower.batch_id == first.batch_id
    assert (lower.ledger_added, lower.ledger_already_present) == (0, first.rows_scored)
    assert lower.ledger_differing == first.rows_scored  # every threshold differs
    assert lower.ledger_differing_labels == would_flip
    assert lower.ledger_index_version == index.version
    warning = jobs.ledger_warning(lower)
    assert warning is not None
    for piece in (lower.batch_id, f"{would_flip:,} flipped between alert and pass",
                  "ledger keeps the recorded", "--batch-id", lower.output):
        assert piece in warning, (piece, warning)

    # The output file holds what the ledger holds, not this run's decisions.
    recorded = _ledger_view(db_url, first.batch_id)
    assert _output_view(lower.output).equals(recorded.drop("index_version"))
    assert lower.alerts == first.alerts == int((recorded["decision"] == "alert").sum())
    with Ledger(db_url) as ledger:
        assert ledger.count() == first.rows_scored and ledger.verify().ok


def test_rescoring_with_a_newer_index_version_names_the_recorded_one(feed, db_url, tmp_path):
    with Ledger(db_url) as ledger:
        first = jobs.score_file(feed["input"], feed["v1"], tmp_path / "a.parquet", ledger=ledger)
        newer = jobs.score_file(feed["input"], feed["v2"], tmp_path / "b.parquet", ledger=ledger)
        # The way to record the new decisions: a new batch id, a new batch beside the old.
        renamed = jobs.score_file(feed["input"], feed["v2"], tmp_path / "c.parquet",
                                  ledger=ledger, batch_id="week-rescored-v2")
    assert newer.batch_id == first.batch_id and newer.ledger_added == 0
    assert newer.index_version == feed["v2"].version
    assert newer.ledger_index_version == feed["v1"].version != newer.index_version
    assert newer.ledger_differing > 0
    warning = jobs.ledger_warning(newer)
    assert feed["v1"].version in warning and feed["v2"].version in warning
    assert _output_view(newer.output).equals(
        _ledger_view(db_url, first.batch_id).drop("index_version"))

    assert renamed.ledger_added == renamed.rows_scored and renamed.ledger_differing == 0
    assert jobs.ledger_warning(renamed) is None
    assert set(_ledger_view(db_url, "week-rescored-v2")["index_version"]) == {
        feed["v2"].version}


def test_score_command_warns_and_exits_1_when_the_ledger_keeps_other_decisions(
        feed, tmp_path):
    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    args = ("score", "--input", str(feed["input"]), "--index", "fraud", "--root",
            str(feed["root"]), "--db", db)
    code, _, err = run_cli(*args, "--output", str(tmp_path / "a.csv"))
    assert code == 0, err
    assert "warning" not in err
    code, _, err = run_cli(*args, "--output", str(tmp_path / "a.csv"))  # a plain re-run
    assert code == 0, err
    assert "warning" not in err

    code, out, err = run_cli(*args, "--output", str(tmp_path / "b.csv"), "--threshold", "0.05")
    text = flat(err)
    assert code == 1, out + err
    assert "Traceback" not in text
    for piece in ("warning:", "already in the ledger", "ledger keeps the recorded decisions",
                  "flipped between alert and pass", "--batch-id", str(tmp_path / "b.csv")):
        assert piece in text, (piece, text)
    written = pl.read_csv(tmp_path / "b.csv")
    first = pl.read_csv(tmp_path / "a.csv")
    assert written["decision"].to_list() == first["decision"].to_list()

    code, out, err = run_cli(*args, "--output", str(tmp_path / "c.csv"), "--threshold", "0.05",
                             "--batch-id", "week-low-threshold")
    assert code == 0, err
    assert "warning" not in err
    assert (pl.read_csv(tmp_path / "c.csv")["decision"] == "alert").sum() > (
        first["decision"] == "alert").sum()


def test_partitioned_rescoring_keeps_and_writes_the_recorded_decisions(feed, db_url, tmp_path):
    from pipeline.partitions import score_dataset

    kwargs = dict(partitions=2, db=db_url, root=str(feed["root"]))
    first = score_dataset(feed["input"], "fraud", tmp_path / "a.parquet",
                          config=ScoringConfig(threshold=0.5), **kwargs)
    again = score_dataset(feed["input"], "fraud", tmp_path / "b.parquet",
                          config=ScoringConfig(threshold=0.05), **kwargs)
    assert (first.ledger_differing, first.ledger_index_version) == (0, None)
    assert again.ledger_added == 0 and again.ledger_differing == first.rows_scored
    assert again.ledger_differing_labels > 0
    assert again.ledger_index_version == feed["v2"].version  # the current one, recorded
    assert "ledger keeps the recorded" in jobs.ledger_warning(again)
    written, before = _output_view(again.output), _output_view(first.output)
    assert written.equals(before)
    assert again.alerts == first.alerts


def test_partitioned_rerun_with_some_days_new_says_which_days_the_ledger_kept(
        feed, db_url, tmp_path, monkeypatch):
    """The file's first days were recorded (an earlier, shorter copy of it, or a run that
    failed part-way) and it is scored again, whole, with another threshold: those days keep
    their recorded decisions, the other days are recorded with this run's. The warning used
    to say that *each* daily batch was already in the ledger, counted the differences among
    all the file's decisions, and said the output held none of this run's."""
    from pipeline.partitions import score_dataset

    week = pl.read_parquet(feed["input"])
    start = week[schema.TX_TIME].min().replace(hour=0, minute=0, second=0, microsecond=0)
    days = week[schema.TX_TIME].dt.date().n_unique()
    early, full = tmp_path / "early" / "week.parquet", tmp_path / "full" / "week.parquet"
    for path in (early, full):  # one file name: the same days are the same batches
        path.parent.mkdir()
    week.filter(pl.col(schema.TX_TIME) < start + timedelta(days=3)).write_parquet(early)
    week.write_parquet(full)
    kwargs = dict(partitions=2, db=db_url, root=str(feed["root"]))
    first = score_dataset(early, "fraud", tmp_path / "a.parquet",
                          config=ScoringConfig(threshold=0.5), **kwargs)
    again = score_dataset(full, "fraud", tmp_path / "b.parquet",
                          config=ScoringConfig(threshold=0.05), **kwargs)
    recorded_before = set(_output_view(first.output)[schema.TRANSACTION_ID])
    assert again.ledger_already_present == first.rows_scored
    assert again.ledger_added == again.rows_scored - first.rows_scored > 0
    assert again.rows_in == again.rows_scored + again.rows_quarantined
    assert again.ledger_differing == first.rows_scored  # every recorded threshold differs
    assert (again.ledger_batches_present, again.ledger_batches_added) == (3, days - 3)

    warning = flat(jobs.ledger_warning(again))
    assert "each daily batch" not in warning, warning
    for piece in (f"3 of the {days} daily batches of {full} were already in the ledger",
                  f"{first.rows_scored:,} of {first.rows_scored:,} decisions differ",
                  f"other {days - 3} daily batches ({again.ledger_added:,} decisions)",
                  "this run's decisions", "ledger keeps the recorded", "--batch-id"):
        assert piece in warning, (piece, warning)
    assert f"of {again.rows_scored:,} decisions" not in warning, warning

    # The output: the recorded decisions for the recorded days, this run's for the others.
    written = _output_view(again.output)
    old = written.filter(pl.col(schema.TRANSACTION_ID).is_in(recorded_before))
    new = written.filter(~pl.col(schema.TRANSACTION_ID).is_in(recorded_before))
    assert old.equals(_output_view(first.output))
    assert new.height == again.ledger_added
    assert set(new["threshold"]) == {0.05}
    assert again.alerts == int((written["decision"] == "alert").sum())

    # The CLI (the flow replaced by the same job in this process): the warning, and exit 1.
    import flows.score_dataset as flow_module

    def in_process(*, address, workers, input, index, output, partitions, db, root,
                   threshold, alerts_per_day, k, batch_id):
        return score_dataset(input, index, output, partitions=partitions,
                             db=db.get_secret_value() if db else None, root=root,
                             config=ScoringConfig(k=k, threshold=threshold,
                                                  alerts_per_day=alerts_per_day),
                             batch_id=batch_id)

    monkeypatch.setattr(flow_module, "score_dataset_on_dask", in_process)
    db = f"sqlite:///{tmp_path / 'cli.sqlite'}"

    def cli(path, output, threshold):
        code, out, err = run_cli("score", "--input", str(path), "--index", "fraud", "--root",
                                 str(feed["root"]), "--db", db, "--partitions", "2",
                                 "--output", str(tmp_path / output), "--threshold", threshold)
        text = flat(out + err)
        assert "Traceback" not in text, text
        return code, text

    code, text = cli(early, "c.parquet", "0.5")
    assert code == 0 and "warning" not in text, text
    code, text = cli(full, "d.parquet", "0.05")
    assert code == 1, text
    assert f"3 of the {days} daily batches of {full} were already" in text, text
    assert "each daily batch" not in text, text
    # Now every day is in the ledger: the first three differ, the others are this run's.
    code, text = cli(full, "e.parquet", "0.05")
    assert code == 1, text
    assert f"each of the {days} daily batches of {full} was already in the ledger" in text, text
    assert f"{first.rows_scored:,} of {again.rows_scored:,} decisions differ" in text, text


def test_score_flow_writes_the_recorded_decisions_and_warns(feed, prefect_harness, tmp_path):
    from flows.score_transactions import score_transactions

    db = f"sqlite:///{tmp_path / 'flow.sqlite'}"
    kwargs = dict(input=str(feed["input"]), index="fraud", db=db, root=str(feed["root"]))
    first = score_transactions(output=str(tmp_path / "a.parquet"), **kwargs)
    again = score_transactions(output=str(tmp_path / "b.parquet"), threshold=0.05, **kwargs)
    assert again.ledger_added == 0 and again.ledger_differing_labels > 0
    assert _output_view(again.output).equals(_output_view(first.output))


# --- news sentiment ---------------------------------------------------------------------------

NEWS = [
    {"id": "n1", "published": "2024-05-01T13:30:00Z", "source": "wire",
     "headline": "$AAPL beats estimates as iPhone sales jump"},
    {"id": "n2", "published": "2024-05-01T15:00:00Z", "source": "wire",
     "headline": "Bitcoin slides 8% as ETF outflows mount"},
    {"id": "n3", "published": "2024-05-02", "source": "blog",
     "headline": "Microsoft schedules annual shareholder meeting", "tickers": "MSFT"},
]


class _Fixed:
    """A stand-in backend giving every text one label; ``model_id`` names it in the ledger."""

    backend = "encoder"

    def __init__(self, label: str, model_id: str = "fixed@0"):
        self.label, self.model_id = label, model_id

    def classify(self, texts, *, explain=True):
        probabilities = {"negative": 0.1, "neutral": 0.1, "positive": 0.1} | {self.label: 0.8}
        return [Prediction(self.label, probabilities) for _ in texts]

    def audit_fields(self):
        return {"backend": self.backend, "model_id": self.model_id, "index_version": "-"}


@pytest.fixture
def news(tmp_path):
    import json

    path = tmp_path / "news.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in NEWS))
    return path


def test_reclassifying_news_keeps_and_writes_the_recorded_labels(news, db_url, tmp_path):
    """The same model id giving other labels (an int8-quantised run, a sampling LLM), and an
    explicit batch id reused with another model: the ledger, the output file and the daily
    table keep the recorded labels; the report counts the differences."""
    from pipeline.sentiment.jobs import classify_file, ledger_warning

    with Ledger(db_url) as ledger, NewsStore(db_url) as store:
        first = classify_file(news, _Fixed("neutral"), tmp_path / "a.parquet", ledger=ledger,
                              store=store)
        again = classify_file(news, _Fixed("positive"), tmp_path / "b.parquet", ledger=ledger,
                              store=store)
        named = classify_file(news, _Fixed("neutral"), tmp_path / "c.parquet", ledger=ledger,
                              store=store, batch_id="news-1")
        other = classify_file(news, _Fixed("negative", "other@1"), tmp_path / "d.parquet",
                              ledger=ledger, store=store, batch_id="news-1")
        days = store.daily()
    assert (first.ledger_differing, first.ledger_model_version) == (0, None)
    assert ledger_warning(first) is None
    assert again.batch_id == first.batch_id and again.ledger_added == 0
    assert (again.ledger_differing, again.ledger_differing_labels) == (3, 3)
    assert again.ledger_model_version == "fixed@0"
    assert "ledger keeps the recorded" in ledger_warning(again)
    assert again.labels == first.labels == {"negative": 0, "neutral": 3, "positive": 0}
    written = pl.read_parquet(again.output)
    assert written["label"].to_list() == ["neutral"] * 3
    assert written["p_neutral"].to_list() == pytest.approx([0.8] * 3)
    assert all(d["neutral"] == d["articles"] for d in days)

    assert other.ledger_added == 0 and other.ledger_differing_labels == 3
    assert other.ledger_model_version == "fixed@0" != other.model_id
    warning = ledger_warning(other)
    assert "fixed@0" in warning and "other@1" in warning and "--batch-id" in warning
    written = pl.read_parquet(other.output)
    assert written["label"].to_list() == ["neutral"] * 3
    assert written["model_id"].to_list() == ["fixed@0"] * 3
    assert named.ledger_added == 3


def test_classify_command_warns_and_exits_1_when_the_ledger_keeps_other_labels(
        news, tmp_path, monkeypatch):
    from pipeline.sentiment import cli as sentiment_cli

    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    label = {"now": "neutral"}
    monkeypatch.setattr(sentiment_cli, "_load", lambda *a, **k: _Fixed(label["now"]))
    args = ("sentiment", "classify", "--input", str(news), "--model", "fixed", "--db", db)
    code, out, err = run_cli(*args, "--output", str(tmp_path / "a.csv"))
    assert code == 0, out + err
    assert "warning" not in err
    label["now"] = "positive"
    code, out, err = run_cli(*args, "--output", str(tmp_path / "b.csv"))
    text = flat(err)
    assert code == 1, out + err
    for piece in ("warning:", "ledger keeps the recorded", "3 of 3", "--batch-id"):
        assert piece in text, (piece, text)
    assert pl.read_csv(tmp_path / "b.csv")["label"].to_list() == ["neutral"] * 3


def test_rerunning_an_older_news_batch_leaves_a_later_batchs_labels_in_the_daily_table(
        news, db_url, tmp_path):
    """The articles were classified again since, under another batch (a new model): re-running
    the older file keeps its recorded labels in its own output, but the daily table keeps the
    later classification. A re-run whose table write never happened (a crash after the
    ledger write) still fills it in."""
    from pipeline.sentiment.jobs import classify_file

    with Ledger(db_url) as ledger, NewsStore(db_url) as store:
        classify_file(news, _Fixed("neutral"), tmp_path / "a.parquet", ledger=ledger,
                      store=store)
        classify_file(news, _Fixed("positive", "new@2"), tmp_path / "b.parquet",
                      ledger=ledger, store=store, batch_id="news-new-model")
        assert all(d["positive"] == d["articles"] for d in store.daily())
        again = classify_file(news, _Fixed("neutral"), tmp_path / "c.parquet", ledger=ledger,
                              store=store)
        assert again.ledger_added == 0
        assert pl.read_parquet(again.output)["label"].to_list() == ["neutral"] * 3
        assert all(d["positive"] == d["articles"] for d in store.daily())

        # Only the ledger write happened for this batch (the table write was lost).
        classify_file(news, _Fixed("negative", "newest@3"), tmp_path / "d.parquet",
                      ledger=ledger, store=None, batch_id="news-newest")
        classify_file(news, _Fixed("negative", "newest@3"), tmp_path / "e.parquet",
                      ledger=ledger, store=store, batch_id="news-newest")
        assert all(d["negative"] == d["articles"] for d in store.daily())

"""Partitioned scoring of a Parquet dataset: equal to scoring the whole file at once, every row
scored or quarantined once, ledger batches idempotent and chain-valid in any order, and the same
through the Prefect flow on a two-worker Dask LocalCluster."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import jobs, schema
from pipeline.index import FraudIndex
from pipeline.ingest import InputError, read_transactions
from pipeline.ledger import Ledger
from pipeline.partitions import (
    history_margin,
    load_index,
    merge_parts,
    plan_partitions,
    score_dataset,
    score_partition,
)
from pipeline.scoring import ScoringConfig
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig

sys.path.insert(0, str(Path(__file__).parent))
from reliability_workers import run_cli  # noqa: E402
from test_audit import flat  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """An index of the first 30 days; the next 60 days as one Parquet file with four broken
    rows spread over the period (bad amount, missing card, no time, a repeated id)."""
    work = tmp_path_factory.mktemp("partitions")
    data = generate(SyntheticConfig(n_customers=120, n_terminals=240, n_days=90, seed=5))
    split = data[schema.TX_TIME].min().replace(hour=0, minute=0, second=0) + timedelta(days=30)
    history = data.filter(pl.col(schema.TX_TIME) < split)
    feed = data.filter(pl.col(schema.TX_TIME) >= split)
    n = feed.height
    amounts = feed[schema.AMOUNT].to_list()
    customers = feed[schema.CUSTOMER_ID].to_list()
    times = feed[schema.TX_TIME].to_list()
    ids = feed[schema.TRANSACTION_ID].to_list()
    amounts[n // 5] = -1.0
    customers[n // 2] = None
    times[3 * n // 4] = None
    ids[n - 10] = ids[n - 11]
    feed = feed.with_columns(pl.Series(schema.AMOUNT, amounts), pl.Series(
        schema.CUSTOMER_ID, customers), pl.Series(schema.TX_TIME, times, schema.DTYPES[
            schema.TX_TIME]), pl.Series(schema.TRANSACTION_ID, ids))
    history.write_parquet(work / "history.parquet")
    feed.write_parquet(work / "feed.parquet")
    root = work / "indexes"
    jobs.build_index(read_transactions(work / "history.parquet", require_labels=True), "fraud",
                     root=root, encoder=None, vector_config=VectorConfig(text_dim=0))
    index = FraudIndex.load("fraud", root)
    with Ledger(f"sqlite:///{work / 'whole.sqlite'}") as ledger:
        whole = jobs.score_file(work / "feed.parquet", index, work / "whole.parquet",
                                ledger=ledger)
    return {"work": work, "root": root, "feed": work / "feed.parquet", "rows": n,
            "whole": whole, "index": index}


def _same_scores(whole_path: str | Path, parts_path: str | Path) -> None:
    whole = pl.read_parquet(whole_path).sort(schema.TRANSACTION_ID)
    parts = pl.read_parquet(parts_path).sort(schema.TRANSACTION_ID)
    assert parts[schema.TRANSACTION_ID].to_list() == whole[schema.TRANSACTION_ID].to_list()
    # FAISS's float32 distances may differ in the last bits with the rows searched together.
    assert np.allclose(parts["score"].to_numpy(), whole["score"].to_numpy(), atol=1e-6, rtol=0)
    assert parts["decision"].to_list() == whole["decision"].to_list()
    assert parts["input_hash"].to_list() == whole["input_hash"].to_list()


def test_partitions_are_whole_days_covering_every_row(dataset):
    plan = plan_partitions(dataset["feed"], 4)
    assert len(plan) == 4
    assert sum(p.rows for p in plan) == dataset["rows"]
    assert [p.takes_null_times for p in plan] == [True, False, False, False]
    for before, after in zip(plan, plan[1:], strict=False):
        assert before.end == after.start
    for p in plan:
        assert p.start.hour == p.start.minute == 0 and (p.end - p.start).days >= 1
    sizes = [p.rows for p in plan]
    assert max(sizes) < 1.6 * min(sizes)  # about equal row counts
    assert len(plan_partitions(dataset["feed"], 10_000)) == 60  # at most one per day
    assert history_margin(7) == timedelta(days=37)


def test_bad_inputs_are_clear_errors(dataset, tmp_path):
    csv = tmp_path / "feed.csv"
    csv.write_text("transaction_id,tx_time\n1,2024-01-01\n")
    with pytest.raises(InputError, match="partitioned scoring reads Parquet"):
        plan_partitions(csv, 2)
    text_times = tmp_path / "text.parquet"
    pl.DataFrame({"transaction_id": ["1"], "tx_time": ["2024-01-01"]}).write_parquet(text_times)
    with pytest.raises(InputError, match="column 'tx_time' is String.*timestamp"):
        plan_partitions(text_times, 2)
    with pytest.raises(ValueError, match="partitions: expected a whole number >= 1"):
        plan_partitions(dataset["feed"], 0)


def test_partitioned_scoring_equals_whole_file_in_any_order(dataset, tmp_path):
    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    feed, index = dataset["feed"], dataset["index"]
    plan = plan_partitions(feed, 3)
    out = tmp_path / "scores.parquet"
    # Partitions finishing in reverse order still make one valid chain.
    reports = [score_partition(feed, p, index, out, db=db) for p in reversed(plan)]
    assert all(r.margin_rows > 0 for r in reports if r.number > 0)
    report = merge_parts(feed, reports, out, index.version)
    whole = dataset["whole"]
    assert report.rows_in == dataset["rows"] == whole.rows_in
    assert report.rows_in == report.rows_scored + report.rows_quarantined
    assert (report.rows_scored, report.rows_quarantined) == (whole.rows_scored,
                                                             whole.rows_quarantined) \
        == (dataset["rows"] - 4, 4)
    assert report.alerts == whole.alerts
    _same_scores(whole.output, out)
    quarantined = pl.read_parquet(report.quarantine)
    expected = pl.read_parquet(whole.quarantine)
    assert quarantined.select("row_number", "field").equals(
        expected.select("row_number", "field"))
    assert not (tmp_path / "scores.parquet.parts").exists()
    with Ledger(db) as ledger:
        assert ledger.verify().ok
        assert ledger.count() == report.rows_scored == report.ledger_added
        batches = ledger.batches()
        # One batch per day of the file, plus one for the row without a time.
        days = pl.read_parquet(whole.output)[schema.TX_TIME].dt.date().n_unique()
        assert len(batches) == days + 1
        assert sum(b["rows_in"] for b in batches) == report.rows_in
        assert sum(len(ledger.quarantined(b)) for r in reports for b in r.batch_ids) == 4
        assert pl.read_parquet(out)["batch_id"].n_unique() == days
    # Re-running adds nothing: each day's batch id comes from its rows, so a re-run with
    # another partition count (say, after a failure, on a bigger cluster) lands on the same ones.
    for n in (3, 5):
        again = score_dataset(feed, "fraud", tmp_path / f"again-{n}.parquet", partitions=n,
                              db=db, root=str(dataset["root"]))
        assert (again.ledger_added, again.ledger_already_present) == (0, report.rows_scored)
        assert sorted(b for r in again.partitions for b in r.batch_ids) == sorted(
            b for r in reports for b in r.batch_ids)
    with Ledger(db) as ledger:
        assert ledger.count() == report.rows_scored and ledger.verify().ok


def test_a_repeated_id_is_caught_whatever_partition_its_first_occurrence_is_in(dataset,
                                                                             tmp_path):
    """The file's first row repeats the id of a row weeks earlier in time (a resent payment
    with a corrected time, say): scored whole, the later row in the file is quarantined as a
    duplicate. Partitioned, each copy used to be scored in its own partition (the earlier
    partition never saw the other copy): one transaction, two decisions. And a duplicate's
    reason named the kept row by its place among the partition's rows, not in the file."""
    feed = pl.read_parquet(dataset["feed"])
    early = feed.filter(pl.col(schema.AMOUNT) >= 0).row(3, named=True)
    late = feed.row(feed.height - 3, named=True)
    assert late[schema.TX_TIME] - early[schema.TX_TIME] > timedelta(days=45)
    resent = pl.DataFrame([late | {schema.TRANSACTION_ID: early[schema.TRANSACTION_ID]}],
                          schema=feed.schema)
    path = tmp_path / "resent.parquet"
    pl.concat([resent, feed]).write_parquet(path)
    with Ledger(f"sqlite:///{tmp_path / 'whole.sqlite'}") as ledger:
        whole = jobs.score_file(path, dataset["index"], tmp_path / "whole.parquet",
                                ledger=ledger)
    assert (whole.rows_scored, whole.rows_quarantined) == (dataset["rows"] - 4, 5)
    out = tmp_path / "parts.parquet"
    db = f"sqlite:///{tmp_path / 'parts.sqlite'}"
    report = score_dataset(path, "fraud", out, partitions=3, db=db, root=str(dataset["root"]))
    assert (report.rows_scored, report.rows_quarantined) == (whole.rows_scored,
                                                             whole.rows_quarantined)
    _same_scores(whole.output, out)
    parts_q = pl.read_parquet(report.quarantine).select("row_number", "field", "reason")
    whole_q = pl.read_parquet(whole.quarantine).select("row_number", "field", "reason")
    assert parts_q.to_dicts() == whole_q.to_dicts()
    early_row = 1 + feed[schema.TRANSACTION_ID].to_list().index(early[schema.TRANSACTION_ID])
    assert parts_q.filter(pl.col("row_number") == early_row)["reason"].to_list() == [
        f"transaction_id: '{early[schema.TRANSACTION_ID]}' duplicates row 0, which is kept"]
    with Ledger(db) as ledger:
        assert ledger.count() == whole.rows_scored and ledger.verify().ok


def test_flow_on_a_two_worker_dask_cluster(dataset, prefect_harness, pg_url, tmp_path):
    """Two worker processes write to one PostgreSQL ledger concurrently, and report their
    task runs to the flow's own Prefect server (not to temporary servers of their own)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.score_dataset import score_dataset_on_dask

    out = tmp_path / "scores.parquet"
    environment = os.environ.get("PREFECT_API_URL")
    report = score_dataset_on_dask(
        workers=2, input=str(dataset["feed"]), index="fraud", output=str(out), partitions=4,
        db=pg_url, root=str(dataset["root"]), k=20)
    assert len(report.partitions) == 4
    assert report.rows_in == report.rows_scored + report.rows_quarantined == dataset["rows"]
    _same_scores(dataset["whole"].output, out)
    version = dataset["index"].version
    assert report.index_version == version
    with Ledger(pg_url) as ledger:
        assert ledger.verify().ok
        assert ledger.count() == report.ledger_added == report.rows_scored
        assert {b["batch_id"] for b in ledger.batches()} == {
            b for r in report.partitions for b in r.batch_ids}
    load_index.cache_clear()
    assert os.environ.get("PREFECT_API_URL") == environment  # put back as it was
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(limit=1, sort="START_TIME_DESC")[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[run.id])))
    assert run.name and run.state.is_completed()
    assert sorted(t.state.name for t in tasks if t.task_key.startswith("score_one")) == \
        ["Completed"] * 4


def test_cli_refuses_partitioned_misuse_with_messages(dataset, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "200"})

    base = ["score", "--index", "fraud", "--root", str(dataset["root"]), "-o",
            str(tmp_path / "s.parquet"), "--db", f"sqlite:///{tmp_path / 'l.sqlite'}"]
    csv = tmp_path / "feed.csv"
    csv.write_text("transaction_id,tx_time\n1,2024-01-01\n")
    result = cli(*base, "-i", str(csv), "--partitions", "2")
    assert result.returncode == 2
    assert "partitioned scoring reads Parquet files" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli(*base, "-i", str(dataset["feed"]), "--partitions", "2", "--history",
                 str(dataset["feed"]))
    assert result.returncode == 2 and "--history cannot be combined" in result.stderr


def test_cli_run_on_a_local_cluster_starts_one_temporary_prefect_server(dataset, tmp_path):
    """With no Prefect server configured, `finsentinel score --partitions` starts one
    temporary server and its Dask workers report to it (each used to start its own: tens of
    seconds of CPU on a small machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "COLUMNS": "200"}
    db = tmp_path / "l.sqlite"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "score", "-i", str(dataset["feed"]), "--index",
         "fraud", "--root", str(dataset["root"]), "-o", str(tmp_path / "s.parquet"), "--db",
         f"sqlite:///{db}", "--partitions", "2", "--dask-workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("Starting temporary server") == 1, output[-3000:]
    assert "2 partitions:" in output
    with Ledger(f"sqlite:///{db}") as ledger:
        assert ledger.count() == dataset["rows"] - 4 and ledger.verify().ok
    load_index.cache_clear()


def test_a_new_run_to_the_same_output_leaves_no_earlier_quarantine_file_beside_it(
        dataset, tmp_path):
    """The file written again by a run with no quarantined row: the earlier run's quarantine
    file used to stay beside it, its rows counted with the new scores (rows in != scored +
    quarantined), and nothing said it was stale."""
    clean = tmp_path / "clean.parquet"
    feed = pl.read_parquet(dataset["feed"])
    feed.filter(pl.col(schema.TX_TIME).is_not_null() & (pl.col(schema.AMOUNT) >= 0)
                & pl.col(schema.CUSTOMER_ID).is_not_null()).unique(
        schema.TRANSACTION_ID, keep="first", maintain_order=True).write_parquet(clean)
    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    for name, run in (
            ("parts", lambda path, out: score_dataset(path, "fraud", out, partitions=2, db=db,
                                                      root=str(dataset["root"]))),
            ("whole", lambda path, out: _whole(path, out, dataset["index"], db))):
        out = tmp_path / f"{name}.parquet"
        first = run(dataset["feed"], out)
        assert first.quarantine and Path(first.quarantine).exists()
        again = run(clean, out)
        assert again.rows_quarantined == 0 and again.quarantine is None
        assert not jobs.quarantine_path(out).exists(), name
    out = tmp_path / "features.parquet"
    assert jobs.features_job(dataset["feed"], out)[0].quarantined.height
    assert jobs.quarantine_path(out).exists()
    assert jobs.features_job(clean, out)[0].quarantined.height == 0
    assert not jobs.quarantine_path(out).exists()


def _whole(path, out, index, db):
    with Ledger(db) as ledger:
        return jobs.score_file(path, index, out, ledger=ledger)


def test_flow_rerun_against_a_copied_index_folder_reports_no_version_change(
        dataset, prefect_harness, tmp_path):
    """The flow named its run's index by the folder (``copy@v``) while the partitions record
    the manifest's name (``fraud@v``): every plain re-run of a copied or renamed index read
    as a version change."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.score_dataset import score_dataset as flow

    root = tmp_path / "indexes"
    shutil.copytree(dataset["root"] / "fraud", root / "copy")
    run = flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    params = dict(input=str(dataset["feed"]), index="copy", output=str(tmp_path / "s.parquet"),
                  partitions=2, db=db, root=str(root))
    first = run(**params)
    load_index.cache_clear()
    again = run(**params)
    assert first.index_version == again.index_version == dataset["index"].version
    assert again.ledger_added == 0 and again.ledger_already_present == first.rows_scored
    assert jobs.ledger_warning(again) is None


def _micros(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1)) // timedelta(microseconds=1)


def _with_times(feed: pl.DataFrame, times: dict[int, int]) -> pl.DataFrame:
    """``feed`` with the rows numbered in ``times`` stamped at those microseconds since 1970
    (any year, as a writer outside Python's date range stores them)."""
    micros = feed[schema.TX_TIME].dt.epoch("us").to_list()
    for row, value in times.items():
        micros[row] = value
    return feed.with_columns(pl.Series(schema.TX_TIME, micros, pl.Int64).cast(
        pl.Datetime("us")))


def _same_quarantine(whole_report, parts_report) -> None:
    whole = pl.read_parquet(whole_report.quarantine).select("row_number", "field")
    parts = pl.read_parquet(parts_report.quarantine).select("row_number", "field")
    assert parts.to_dicts() == whole.to_dicts()


def test_placeholder_and_out_of_range_times_are_quarantined_as_scoring_whole(dataset,
                                                                            tmp_path):
    """Scored whole, a placeholder time (0001-01-01, 1900-01-01, 9999-12-31) or one past
    Python's dates (year 10000) is one more quarantined row. Partitioned, 9999-12-31 crashed
    the plan (OverflowError: its partition ended on a day past the calendar), year 10000 too
    (ValueError), and 0001-01-01 crashed its partition (its margin began before year 1)."""
    feed = pl.read_parquet(dataset["feed"])
    path = tmp_path / "placeholders.parquet"
    _with_times(feed, {10: _micros(datetime(1, 1, 1)), 2000: _micros(datetime(1900, 1, 1)),
                       3000: _micros(datetime(9999, 12, 31, 12)),
                       4000: _micros(datetime(9999, 12, 31)) + 400 * 86_400 * 10**6}
                ).write_parquet(path)
    whole = _whole(path, tmp_path / "whole.parquet", dataset["index"],
                   f"sqlite:///{tmp_path / 'whole.sqlite'}")
    assert (whole.rows_scored, whole.rows_quarantined) == (dataset["rows"] - 8, 8)
    plan = plan_partitions(path, 3)
    assert sum(p.rows for p in plan) == dataset["rows"]
    first_day = feed[schema.TX_TIME].min().replace(hour=0, minute=0, second=0, microsecond=0)
    assert plan[0].start == first_day  # the placeholders make no partition of their own
    db = f"sqlite:///{tmp_path / 'parts.sqlite'}"
    out = tmp_path / "parts.parquet"
    report = score_dataset(path, "fraud", out, partitions=3, db=db, root=str(dataset["root"]))
    assert (report.rows_in, report.rows_scored, report.rows_quarantined) == (
        whole.rows_in, whole.rows_scored, whole.rows_quarantined)
    _same_scores(whole.output, out)
    _same_quarantine(whole, report)
    with Ledger(db) as ledger:
        assert ledger.verify().ok
        # The rows without a usable time share the undated batch (five: the null one too).
        undated = [b for r in report.partitions for b in r.batch_ids if "-undated-" in b]
        assert len(undated) == 1 and len(ledger.quarantined(undated[0])) == 5
        assert sum(b["rows_in"] for b in ledger.batches()) == report.rows_in


def test_a_fixed_offset_time_zone_is_read_as_scoring_whole_reads_it(dataset, tmp_path):
    """A timestamp column whose zone is a fixed offset ("+05:30", written by pyarrow and
    pandas) reads as UTC instants when the file is scored whole; partitioned, polars'
    lazy scan panicked on the zone (a Rust backtrace, not a message)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pl.read_parquet(dataset["feed"]).to_arrow()
    i = table.schema.get_field_index(schema.TX_TIME)
    zoned = table.column(i).cast(pa.timestamp("us", "UTC")).cast(pa.timestamp("us", "+05:30"))
    path = tmp_path / "offset.parquet"
    pq.write_table(table.set_column(i, schema.TX_TIME, zoned), path)
    whole = _whole(path, tmp_path / "whole.parquet", dataset["index"],
                   f"sqlite:///{tmp_path / 'whole.sqlite'}")
    assert whole.rows_quarantined == 4
    assert [p.rows for p in plan_partitions(path, 3)] == [
        p.rows for p in plan_partitions(dataset["feed"], 3)]
    out = tmp_path / "parts.parquet"
    report = score_dataset(path, "fraud", out, partitions=3,
                           db=f"sqlite:///{tmp_path / 'parts.sqlite'}",
                           root=str(dataset["root"]))
    assert (report.rows_in, report.rows_scored, report.rows_quarantined) == (
        whole.rows_in, whole.rows_scored, whole.rows_quarantined)
    _same_scores(whole.output, out)
    _same_quarantine(whole, report)


def test_a_file_without_a_usable_time_or_without_rows_is_scored_as_whole(dataset, tmp_path,
                                                                         monkeypatch):
    """Scored whole, a file whose rows all lack a usable time has them all quarantined, and
    an empty file scores nothing: rows in = scored + quarantined. Partitioned, both were
    refused ("no row has a transaction time"), the bad rows recorded nowhere."""
    feed = pl.read_parquet(dataset["feed"]).head(5)
    timeless = tmp_path / "timeless.parquet"
    _with_times(feed.with_columns(pl.lit(None, pl.Datetime("us")).alias(schema.TX_TIME)),
                {0: _micros(datetime(9999, 12, 31))}).write_parquet(timeless)
    empty = tmp_path / "empty.parquet"
    feed.head(0).write_parquet(empty)
    for path, quarantined in ((timeless, 5), (empty, 0)):
        whole = _whole(path, tmp_path / f"whole-{path.name}", dataset["index"],
                       f"sqlite:///{tmp_path / 'whole.sqlite'}")
        out = tmp_path / f"parts-{path.name}"
        db = f"sqlite:///{tmp_path / 'parts.sqlite'}"
        report = score_dataset(path, "fraud", out, partitions=3, db=db,
                               root=str(dataset["root"]))
        expected = (quarantined, 0, quarantined)
        assert (whole.rows_in, whole.rows_scored, whole.rows_quarantined) == expected
        assert (report.rows_in, report.rows_scored, report.rows_quarantined) == expected
        assert pl.read_parquet(out).height == 0
        if quarantined:
            _same_quarantine(whole, report)
        with Ledger(db) as ledger:
            assert ledger.verify().ok
    # The CLI says so too (the flow's Dask cluster replaced by the same job in this process).
    import flows.score_dataset as flow_module

    def in_process(*, address, workers, db, **parameters):
        parameters["config"] = ScoringConfig(k=parameters.pop("k"),
                                             threshold=parameters.pop("threshold"),
                                             alerts_per_day=parameters.pop("alerts_per_day"))
        return score_dataset(parameters.pop("input"), parameters.pop("index"),
                             db=db.get_secret_value() if db else None, **parameters)

    monkeypatch.setattr(flow_module, "score_dataset_on_dask", in_process)
    code, out, err = run_cli("score", "-i", str(empty), "--index", "fraud", "--root",
                             str(dataset["root"]), "-o", str(tmp_path / "cli.parquet"), "--db",
                             f"sqlite:///{tmp_path / 'cli.sqlite'}", "--partitions", "2")
    text = flat(out + err)
    assert code == 0 and "Traceback" not in text, text
    assert "rows in 0 = scored 0 + quarantined 0" in text, text


def test_a_dask_scheduler_that_cannot_be_used_fails_at_once_with_a_message(dataset, tmp_path):
    """A --dask-address whose port accepts connections but is no Dask scheduler (a Prefect
    server's, a proxy's) hung the command for good: distributed's client waits for the
    scheduler's handshake without a limit. A closed port failed only after the flow had
    started, with its traceback; an address without a port too."""
    import dask

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # never accepted: the kernel completes the connection, nobody answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    args = ["score", "-i", str(dataset["feed"]), "--index", "fraud", "--root",
            str(dataset["root"]), "-o", str(tmp_path / "s.parquet"), "--db",
            f"sqlite:///{tmp_path / 'l.sqlite'}", "--partitions", "2", "--dask-address"]
    try:
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args, address], cwd=REPO,
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "COLUMNS": "200", "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT":
                 "2s"})
        text = flat(result.stdout + result.stderr)
        assert result.returncode == 2, text
        assert f"error: Dask scheduler {address}: no answer within 2 s" in text, text
        assert "Traceback" not in text and "Flow run" not in text, text
        assert time.monotonic() - started < 60
    finally:
        silent.close()
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        for address, why in ((f"tcp://127.0.0.1:{closed_port}", "Connection refused"),
                             ("scheduler.example", "missing port number")):
            code, out, err = run_cli(*args, address)
            text = flat(out + err)
            assert code == 2 and "Traceback" not in text and "Flow run" not in text, text
            assert f"error: Dask scheduler {address}:" in text and why in text, text
            assert "--dask-address" in text, text
    assert not (tmp_path / "l.sqlite").exists()  # nothing scored, nothing recorded


def test_a_blank_dask_address_means_the_local_cluster(dataset, tmp_path, monkeypatch):
    """A blank $FINSENTINEL_DASK_ADDRESS is unset, as every other variable (it was taken for
    a scheduler address: "missing port number in address '  '")."""
    from flows.score_dataset import dask_runner

    monkeypatch.setenv("FINSENTINEL_DASK_ADDRESS", "  ")
    for given in (None, "", " \t"):
        runner = dask_runner(given, workers=3)
        assert runner.address is None and runner.cluster_kwargs["n_workers"] == 3
    code, out, err = run_cli("score", "-i", str(dataset["feed"]), "--index", "fraud", "--root",
                             str(dataset["root"]), "-o", str(tmp_path / "s.parquet"),
                             "--partitions", "2", "--dask-workers", "0")
    text = flat(out + err)
    assert code == 2 and "Traceback" not in text and "Flow run" not in text, text
    assert "--dask-workers: expected a whole number >= 1, got 0" in text, text


def test_relative_paths_name_the_same_files_for_workers_in_another_folder(
        dataset, prefect_harness, tmp_path, monkeypatch):
    """The workers of a cluster run in a folder of their own. Relative paths (as in
    docs/operations.md: `--input big.parquet --output scores.parquet`) went to them as given:
    a worker looked for the index under its own folder ("missing its manifest") and would
    have written its part where the flow never looks."""
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    from flows.score_dataset import score_dataset_on_dask

    here, elsewhere = tmp_path / "client", tmp_path / "worker"
    elsewhere.mkdir()
    (here / "out").mkdir(parents=True)
    shutil.copy(dataset["feed"], here / "feed.parquet")
    shutil.copytree(dataset["root"], here / "indexes")
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the workers' API
    monkeypatch.chdir(elsewhere)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        monkeypatch.chdir(here)
        report = score_dataset_on_dask(
            address=cluster.scheduler_address, input="feed.parquet", index="fraud",
            output="out/scores.parquet", partitions=2, root="indexes",
            db=f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    assert report.rows_in == report.rows_scored + report.rows_quarantined == dataset["rows"]
    _same_scores(dataset["whole"].output, here / "out" / "scores.parquet")
    assert Path(report.output) == here / "out" / "scores.parquet"
    assert list(elsewhere.iterdir()) == []

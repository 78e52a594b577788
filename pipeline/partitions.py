"""Scoring a large Parquet dataset partition by partition, with memory bounded by a partition.

The dataset is split by time into partitions of whole days with about the same number of rows.
A transaction's features look back at most ``max(windows) + label delay`` days (30-day customer
windows; terminal risk over 30 days ending 7 days back), so each partition reads its own rows
plus that margin of earlier rows (a lazy scan filtered on time: only those rows are read into
memory), computes features with the margin as history, scores its own rows against the one
index, and drops the margin. Scores equal those of scoring the whole file at once. In the
ledger each day of the file is one batch (named by the day and its rows), written under the
ledger's own lock: partitions may finish in any order, and a re-run with another partition
count lands on the same batches, so it adds nothing (and one with other settings keeps, and
writes, the recorded decisions: see pipeline.reconcile).

Limits: the input must be Parquet with ``tx_time`` stored as a timestamp (so that partitions can
be cut by time without parsing). A ``transaction_id`` repeated anywhere in the file is caught as
scoring the whole file catches it: each partition also reads the file's other rows with its ids
(one more filtered scan of the file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

import polars as pl

from pipeline import schema
from pipeline.artifacts import atomic_path
from pipeline.features import LABEL_DELAY_DAYS
from pipeline.index import FraudIndex
from pipeline.ingest import (
    MAX_TIME,
    MIN_TIME,
    IngestResult,
    InputError,
    _text,
    canonical_columns,
    utc_relabelled_schema,
    validate_transactions,
    write_quarantine,
)
from pipeline.jobs import as_recorded, quarantine_path, record_and_reconcile, write_frame
from pipeline.ledger import Ledger
from pipeline.reconcile import Reconciliation, combine
from pipeline.scoring import FraudScorer, ScoredBatch, ScoringConfig, batch_hash

_FILE_ROW = "__file_row"
_DAY = "__day"
_KEPT = r" duplicates row (\d+), which is kept$"  # a duplicate's reason, naming the row kept


def history_margin(label_delay_days: int = LABEL_DELAY_DAYS) -> timedelta:
    """How far back a transaction's features look: the longest window plus the label delay."""
    return timedelta(days=max(schema.WINDOWS_DAYS) + label_delay_days)


@dataclass(frozen=True)
class Partition:
    """Rows with ``start <= tx_time < end`` (whole days); the first partition also takes the
    rows without a usable time (missing, or out of range: quarantined), so that each row of
    the file belongs to exactly one partition."""

    number: int
    start: datetime
    end: datetime
    rows: int
    takes_null_times: bool = False


@dataclass(frozen=True)
class PartitionReport:
    number: int
    batch_ids: tuple[str, ...]  # one ledger batch per day (and one for rows without a time)
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    margin_rows: int
    alerts: int
    ledger_added: int
    ledger_already_present: int
    output: str | None
    quarantine: str | None
    # Its day batches the ledger already held, compared with this run (pipeline.reconcile);
    # None when it recorded every one. Its scores are the recorded ones.
    ledger_check: Reconciliation | None = None
    ledger_batches_added: int = 0  # its day batches with decisions this run recorded


@dataclass(frozen=True)
class DatasetReport:
    input: str
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    alerts: int
    ledger_added: int
    ledger_already_present: int
    output: str
    quarantine: str | None
    index_version: str
    partitions: list[PartitionReport] = field(default_factory=list)
    # As in jobs.ScoreReport: over the day batches the ledger already held.
    ledger_differing: int = 0
    ledger_differing_labels: int = 0
    ledger_index_version: str | None = None
    # Day batches with decisions: those the ledger already held (their decisions are the
    # recorded ones, ledger_already_present of them), and those this run recorded.
    ledger_batches_present: int = 0
    ledger_batches_added: int = 0


def _scan(path: Path) -> pl.LazyFrame:
    """The lazy scan of a Parquet file, read as the whole-file reader reads it: a timestamp
    zone polars cannot resolve is relabelled UTC (see ``ingest.utc_relabelled_schema``;
    polars' own scan panics on it), the file then scanned through pyarrow, in batches."""
    relabelled = utc_relabelled_schema(path)
    if relabelled is None:
        return pl.scan_parquet(path)
    import pyarrow.dataset as ds

    return pl.scan_pyarrow_dataset(ds.dataset(path, schema=relabelled, format="parquet"))


def _time_column(path: Path) -> tuple[pl.LazyFrame, pl.Expr]:
    """The lazy scan of ``path`` and its tx_time as naive UTC microseconds (found by alias);
    null where validation will quarantine the time as out of range (a placeholder such as
    0001-01-01 or 9999-12-31): such rows have no day, as rows without a time."""
    if path.suffix.lower() not in (".parquet", ".pq"):
        raise InputError(f"{path}: partitioned scoring reads Parquet files, got "
                         f"'{path.suffix or '(no suffix)'}'; convert it, or score it whole")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    scan = _scan(path)
    columns = scan.collect_schema()
    found = [src for src, canonical in canonical_columns(list(columns)).items()
             if canonical == schema.TX_TIME]
    if not found:
        raise InputError(f"{path}: missing required column '{schema.TX_TIME}'; found columns: "
                         f"{', '.join(columns)}")
    name, dtype = found[0], columns[found[0]]
    if not isinstance(dtype, pl.Datetime):
        raise InputError(f"{path}: column '{name}' is {dtype}; partitioned scoring needs "
                         "transaction times stored as a Parquet timestamp")
    time = pl.col(name)
    if dtype.time_zone is not None:
        time = time.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    time = time.cast(pl.Datetime("us"))
    return scan, pl.when(time.is_between(pl.lit(MIN_TIME), pl.lit(MAX_TIME),
                                         closed="left")).then(time)


def plan_partitions(path: str | Path, partitions: int) -> list[Partition]:
    """Split ``path`` into at most ``partitions`` runs of whole days with about equal row
    counts (reading the time column only). A file with no usable time at all (empty, or every
    time missing or out of range) is one partition of those rows, all to be quarantined."""
    if partitions < 1:
        raise ValueError(f"partitions: expected a whole number >= 1, got {partitions}")
    scan, time = _time_column(Path(path))
    per_day = (scan.select(time.dt.truncate("1d").alias(_DAY)).group_by(_DAY)
               .agg(pl.len().alias("rows")).sort(_DAY, nulls_last=True).collect())
    nulls = int(per_day.filter(pl.col(_DAY).is_null())["rows"].sum())
    days = per_day.filter(pl.col(_DAY).is_not_null())
    if days.height == 0:  # nothing to cut by time: an empty range, taking the timeless rows
        return [Partition(number=0, start=MIN_TIME, end=MIN_TIME, rows=nulls,
                          takes_null_times=nulls > 0)]
    total = int(days["rows"].sum())
    # Day i opens a new partition where the rows before it pass the next equal share.
    before = days["rows"].cum_sum() - days["rows"]
    group = (pl.Series(range(days.height)) if partitions >= days.height
             else (before * partitions // total)).cast(pl.Int64)
    cuts = days.with_columns(group.alias("group")).group_by("group", maintain_order=True).agg(
        pl.col(_DAY).min().alias("start"), pl.col(_DAY).max().alias("last"),
        pl.col("rows").sum())
    return [Partition(number=i, start=row["start"], end=row["last"] + timedelta(days=1),
                      rows=int(row["rows"]) + (nulls if i == 0 else 0),
                      takes_null_times=(i == 0 and nulls > 0))
            for i, row in enumerate(cuts.iter_rows(named=True))]


def read_partition(path: str | Path, partition: Partition,
                   margin: timedelta) -> tuple[IngestResult, pl.DataFrame]:
    """The partition's rows validated (quarantined rows keep their row number in the file and
    carry their day, if their time could be read, in a ``__day`` column), and the accepted rows
    of the margin before it, without labels (history for the windows)."""
    path = Path(path)
    scan, time = _time_column(path)
    own = (time >= partition.start) & (time < partition.end)
    if partition.takes_null_times:
        own = own | time.is_null()
    wanted = own | ((time >= partition.start - margin) & (time < partition.start))
    frame = (scan.with_row_index(_FILE_ROW).filter(wanted)
             .with_columns(own.alias("__own")).collect(engine="streaming"))
    frame = _with_same_ids(scan, frame, wanted)
    file_rows, is_own = frame[_FILE_ROW], frame["__own"]
    checked = validate_transactions(frame.drop(_FILE_ROW, "__own"),
                                    source=f"{path} partition {partition.number}")
    accepted = checked.accepted
    own_accepted = ((pl.col(schema.TX_TIME) >= partition.start)
                    & (pl.col(schema.TX_TIME) < partition.end))
    positions = checked.quarantined["row_number"]
    days = frame.select(time.dt.truncate("1d")).to_series()
    # A duplicate's reason names the row kept by its place in `frame`: name it in the file.
    kept = checked.quarantined["reason"].str.extract(_KEPT, 1).cast(pl.Int64)
    kept_text = file_rows.gather(kept.fill_null(0)).cast(pl.String)
    quarantined = checked.quarantined.with_columns(
        file_rows.gather(positions).cast(pl.Int64).alias("row_number"),
        days.gather(positions).alias(_DAY),
        pl.when(kept.is_not_null())
        .then(pl.col("reason").str.replace(_KEPT, " duplicates row ")
              + kept_text + pl.lit(", which is kept"))
        .otherwise(pl.col("reason")).alias("reason"),
    ).filter(is_own.gather(positions))
    result = IngestResult(accepted=accepted.filter(own_accepted), quarantined=quarantined,
                          rows_in=int(is_own.sum()), source=f"{path} partition "
                                                            f"{partition.number}")
    in_margin = pl.col(schema.TX_TIME).is_between(partition.start - margin, partition.start,
                                                 closed="left")
    history = accepted.filter(~own_accepted & in_margin).drop(schema.LABELS, strict=False)
    return result, history


def _with_same_ids(scan: pl.LazyFrame, frame: pl.DataFrame, wanted: pl.Expr) -> pl.DataFrame:
    """``frame`` plus the file's other rows with a transaction id found in it, in file order,
    as neither own rows nor history: a repeated id is then quarantined as scoring the whole
    file does (its first valid occurrence in the file kept), wherever the copies are."""
    ids = [src for src, canonical in canonical_columns(frame.columns).items()
           if canonical == schema.TRANSACTION_ID]
    if not ids:
        return frame  # validation names the missing column
    name = ids[0]
    key = _text(pl.col(name), frame.schema[name])
    seen = frame.select(key.alias("id")).to_series().drop_nulls().unique()
    others = (scan.with_row_index(_FILE_ROW).filter(~wanted.fill_null(False) & key.is_in(seen))
              .with_columns(pl.lit(False).alias("__own")).collect(engine="streaming"))
    if not others.height:
        return frame
    return pl.concat([frame, others.select(frame.columns)]).sort(_FILE_ROW)


@lru_cache(maxsize=2)
def load_index(name: str, root: str | None, version: str) -> FraudIndex:
    """One load per worker process for all the partitions it scores (loading reads and hashes
    every index file and the encoder's weights)."""
    return FraudIndex.load(name, root, version=version)


def day_batch_id(path: str | Path, day: datetime | None, input_hashes: list[str],
                 batch_id: str | None) -> str:
    """The ledger batch of one day of the file (``undated``: rows without a readable time)."""
    name = day.strftime("%Y%m%d") if day is not None else "undated"
    if batch_id:
        return f"{batch_id}-{name}"
    return f"{Path(path).stem}-{name}-{batch_hash(input_hashes)[:12]}"


def _day_batches(scored: ScoredBatch, ingested: IngestResult
                 ) -> list[tuple[datetime | None, ScoredBatch, IngestResult]]:
    """The partition's scored and quarantined rows split by day, in day order."""
    scored_days = scored.scores[schema.TX_TIME].dt.truncate("1d")
    accepted_days = ingested.accepted[schema.TX_TIME].dt.truncate("1d")
    quarantined_days = ingested.quarantined[_DAY]
    days = sorted(set(scored_days.to_list()) | set(quarantined_days.to_list()),
                  key=lambda d: (d is None, d))
    def on(series: pl.Series, day: datetime | None) -> pl.Series:
        return (series.is_null() if day is None else series == day).fill_null(False)

    out = []
    for day in days:
        part = scored.take(on(scored_days, day))
        held = ingested.quarantined.filter(on(quarantined_days, day))
        accepted = ingested.accepted.filter(on(accepted_days, day))
        out.append((day, part, IngestResult(accepted=accepted, quarantined=held.drop(_DAY),
                                            rows_in=accepted.height + held.height,
                                            source=f"{ingested.source} day {day}")))
    return out


def part_path(output: str | Path, number: int) -> Path:
    output = Path(output)
    return output.with_name(f"{output.name}.parts") / f"part-{number:05d}.parquet"


def score_partition(path: str | Path, partition: Partition, index: FraudIndex,
                    output: str | Path, *, db: str | None, config: ScoringConfig | None = None,
                    batch_id: str | None = None) -> PartitionReport:
    """Score one partition and record it in the ledger, one batch per day; its scores go to
    ``part_path(output, number)`` until :func:`merge_parts` joins them."""
    ingested, history = read_partition(path, partition, history_margin(
        index.config.label_delay_days))
    scored = FraudScorer(index, config).score(ingested.accepted, history)
    batches, added, present, checks, recorded, new = [], 0, 0, [], [], 0
    with Ledger(db) as ledger:
        for day, part, held in _day_batches(scored, ingested):
            batch = day_batch_id(path, day, part.scores["input_hash"].to_list()
                                 + held.quarantined["raw"].to_list(), batch_id)
            result = record_and_reconcile(ledger, held, part, index, batch)
            if result.check is not None:  # already in the ledger: its recorded decisions
                checks.append(result.check)
                recorded.append(result.scored.scores.select(
                    pl.col(schema.TRANSACTION_ID).alias("subject_id"), "score", "threshold",
                    "decision"))
            batches.append((day, batch))
            added = added + result.receipt.added
            new = new + (result.receipt.added > 0)
            present = present + result.receipt.already_present
    if recorded:
        scored = ScoredBatch(as_recorded(scored.scores, pl.concat(recorded)), scored.evidence,
                             scored.rows)
    by_day = {day: batch for day, batch in batches if day is not None}
    scores = scored.scores.with_columns(
        pl.col(schema.TX_TIME).dt.truncate("1d").replace_strict(by_day, return_dtype=pl.String)
        .alias("batch_id"))
    own = IngestResult(accepted=ingested.accepted, quarantined=ingested.quarantined.drop(_DAY),
                       rows_in=ingested.rows_in, source=ingested.source)
    out = write_frame(scores, part_path(output, partition.number))
    qpath = (write_quarantine(own, quarantine_path(out)) if own.quarantined.height else None)
    return PartitionReport(
        number=partition.number, batch_ids=tuple(b for _, b in batches),
        rows_in=ingested.rows_in, rows_scored=scored.scores.height,
        rows_quarantined=ingested.quarantined.height, margin_rows=history.height,
        alerts=int((scored.scores["decision"] == "alert").sum()), ledger_added=added,
        ledger_already_present=present, output=str(out), quarantine=str(qpath) if qpath else None,
        ledger_check=combine(checks), ledger_batches_added=new)


def merge_parts(input: str | Path, reports: list[PartitionReport], output: str | Path,
                index_version: str) -> DatasetReport:
    """Join the partitions' scores (in time order) into ``output`` and their quarantined rows
    (in file order) beside it, streaming; remove the parts; check that every row of the input
    was scored or quarantined exactly once."""
    output = Path(output)
    reports = sorted(reports, key=lambda r: r.number)
    file_rows = _scan(Path(input)).select(pl.len()).collect().item()
    rows_in = sum(r.rows_in for r in reports)
    if rows_in != file_rows:
        raise RuntimeError(f"{input}: {file_rows} rows in the file but the partitions read "
                           f"{rows_in}")
    parts = [r.output for r in reports if r.output]
    write_frame(pl.concat([pl.scan_parquet(p) for p in parts]), output)
    qpath = None
    quarantined = [r.quarantine for r in reports if r.quarantine]
    if quarantined:
        qpath = quarantine_path(output)
        with atomic_path(qpath) as tmp:
            pl.concat([pl.scan_parquet(q) for q in quarantined]).sort("row_number") \
                .sink_parquet(tmp)
    else:  # an earlier run's quarantine file beside it would read as this run's
        quarantine_path(output).unlink(missing_ok=True)
    directory = part_path(output, 0).parent
    for p in (*parts, *quarantined):
        Path(p).unlink(missing_ok=True)
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    check = combine([r.ledger_check for r in reports if r.ledger_check is not None])
    return DatasetReport(
        input=str(input), rows_in=rows_in, rows_scored=sum(r.rows_scored for r in reports),
        rows_quarantined=sum(r.rows_quarantined for r in reports),
        alerts=sum(r.alerts for r in reports),
        ledger_added=sum(r.ledger_added for r in reports),
        ledger_already_present=sum(r.ledger_already_present for r in reports),
        output=str(output), quarantine=str(qpath) if qpath else None,
        index_version=index_version, partitions=reports,
        ledger_differing=check.differing if check else 0,
        ledger_differing_labels=check.labels_differing if check else 0,
        ledger_index_version=(check.recorded_version or None) if check else None,
        ledger_batches_present=check.batches if check else 0,
        ledger_batches_added=sum(r.ledger_batches_added for r in reports))


def score_dataset(path: str | Path, index_name: str, output: str | Path, *, partitions: int,
                  db: str | None, root: str | None = None, config: ScoringConfig | None = None,
                  batch_id: str | None = None) -> DatasetReport:
    """Score the partitions one after another in this process (the Prefect flow
    ``flows/score_dataset.py`` runs them on a Dask cluster instead)."""
    from pipeline.artifacts import current_version
    from pipeline.index import default_root

    root = str(root or default_root())
    version = current_version(root, index_name)
    index = load_index(index_name, root, version)
    reports = [score_partition(path, p, index, output, db=db, config=config, batch_id=batch_id)
               for p in plan_partitions(path, partitions)]
    return merge_parts(path, reports, output, index.version)

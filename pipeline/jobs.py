"""The pipeline's jobs as plain functions: what the CLI runs, and what the Prefect flows run
step by step as tasks. Each returns a typed report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from pipeline import schema, scoring
from pipeline.artifacts import atomic_path
from pipeline.audit import FeedbackLabels, apply_feedback
from pipeline.encoder import TextEncoder
from pipeline.features import compute_features
from pipeline.index import FraudIndex, IndexConfig, default_root
from pipeline.ingest import IngestResult, read_transactions, write_quarantine
from pipeline.ledger import BatchReceipt, Decision, DecisionStream, Ledger
from pipeline.reconcile import Reconciliation, compare, recorded_decisions
from pipeline.reconcile import warning as reconcile_warning
from pipeline.scoring import FraudScorer, Progress, ScoredBatch, ScoringConfig, batch_hash
from pipeline.vectors import VectorConfig

if TYPE_CHECKING:
    from pipeline.partitions import DatasetReport


@dataclass(frozen=True)
class BuildReport:
    name: str
    version: str
    path: str
    rows_in: int
    rows_accepted: int
    rows_quarantined: int
    vectors: int
    frauds: int
    faiss_index: str
    label_cutoff: str
    feedback_applied: int = 0  # history rows relabelled by analysts' reviews
    recall_at_10: float | None = None  # approximate index against exact search; None: exact


@dataclass(frozen=True)
class ScoreReport:
    batch_id: str
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    alerts: int
    ledger_added: int
    ledger_already_present: int
    output: str
    quarantine: str | None
    index_version: str
    top_alerts: list[dict[str, Any]] = field(default_factory=list)
    # When the batch was already in the ledger (see pipeline.reconcile): this run's decisions
    # that differ from the recorded ones (label, score, threshold), those with another label,
    # and the index version the recorded ones name (None: this run recorded the batch). The
    # output file and the counts above are the recorded decisions.
    ledger_differing: int = 0
    ledger_differing_labels: int = 0
    ledger_index_version: str | None = None


def write_frame(frame: pl.DataFrame | pl.LazyFrame, path: str | Path) -> Path:
    """Write Parquet, CSV or JSONL by suffix, atomically; a LazyFrame is streamed (its rows
    never all in memory)."""
    path = Path(path)
    suffix = path.suffix.lower()
    lazy = isinstance(frame, pl.LazyFrame)
    writers = {".parquet": frame.sink_parquet if lazy else frame.write_parquet,
               ".csv": frame.sink_csv if lazy else frame.write_csv,
               ".jsonl": frame.sink_ndjson if lazy else frame.write_ndjson}
    writers[".ndjson"] = writers[".jsonl"]
    if suffix not in writers:
        raise ValueError(f"{path}: unsupported output format {suffix!r}; "
                         "expected .parquet, .csv or .jsonl")
    with atomic_path(path) as tmp:
        writers[suffix](tmp)
    return path


def features_job(input_path: str | Path, output_path: str | Path,
                 label_delay_days: int = 7) -> tuple[IngestResult, Path]:
    ingested = read_transactions(input_path)
    featured = compute_features(ingested.accepted, label_delay_days=label_delay_days)
    out = write_frame(featured, output_path)
    quarantine_beside(ingested, out)
    return ingested, out


def quarantine_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.quarantine.parquet")


def quarantine_beside(ingested: IngestResult, output: Path) -> Path | None:
    """The quarantined rows to the file beside ``output``; with none, no file there: an
    earlier run's would read as this run's (rows in != scored + quarantined)."""
    if ingested.quarantined.height:
        return write_quarantine(ingested, quarantine_path(output))
    quarantine_path(output).unlink(missing_ok=True)
    return None


def build_index(ingested: IngestResult, name: str, *, root: str | Path | None = None,
                encoder: TextEncoder | None = None, until: datetime | None = None,
                vector_config: VectorConfig | None = None,
                config: IndexConfig | None = None,
                feedback: FeedbackLabels | None = None, scorer: str = "knn",
                stage: Callable[[str], None] | None = None) -> BuildReport:
    """Build and save an index of the accepted rows. With ``feedback`` (analysts' reviews from
    the ledger), reviewed transactions carry the reviewer's label, known from the review time.
    ``scorer="knn-stacked"`` adds learned vector weights and a stacked XGBoost model (trained on
    the last 7 days of labelled rows) to the index (see pipeline.stacking). ``stage`` is told
    the name of each step as it starts."""
    if scorer not in ("knn", "knn-stacked"):
        raise ValueError(f"scorer: expected knn or knn-stacked, got {scorer!r}")
    config = config or IndexConfig()
    started = stage or (lambda _name: None)
    history, applied = ingested.accepted, 0
    if feedback is not None:
        history, applied = apply_feedback(history, feedback)
    started(f"features of {history.height:,} transactions")
    featured = compute_features(history, label_delay_days=config.label_delay_days)
    started("text embeddings, vectors and the FAISS index"
            + (", then the stacked model" if scorer == "knn-stacked" else ""))
    if scorer == "knn-stacked":
        from pipeline.stacking import build_stacked_index

        index = build_stacked_index(
            featured, encoder=encoder, text_dim=(vector_config or VectorConfig()).text_dim,
            config=config, until=until)
    else:
        index = FraudIndex.build(featured, encoder=encoder, vector_config=vector_config,
                                 config=config, until=until)
    if feedback is not None:
        index.manifest["feedback"] = {
            "rows_relabelled": applied, "reviewed_transactions": feedback.frame.height,
            "feedback_head_seq": feedback.feedback_head_seq,
            "feedback_head_hash": feedback.feedback_head_hash}
    started("saving")
    version = index.save(name, root)
    m = index.manifest
    return BuildReport(
        name=name, version=version, path=str(Path(root or default_root()) / name / version),
        rows_in=ingested.rows_in, rows_accepted=ingested.accepted.height,
        rows_quarantined=ingested.quarantined.height, vectors=m["vector_count"],
        frauds=m["fraud_count"], faiss_index=m["faiss_index"], label_cutoff=m["label_cutoff"],
        feedback_applied=applied, recall_at_10=m.get("recall_at_10"),
    )


def decisions_for(scored: ScoredBatch, batch_id: str, index: FraudIndex,
                  chunk_rows: int | None = None, progress: Progress | None = None
                  ) -> DecisionStream:
    """The batch's decisions, made ``chunk_rows`` (default ``scoring.TEXT_ROWS``) at a time
    as the ledger writes them; ``progress`` is told of each chunk written."""
    chunk_rows = chunk_rows or scoring.TEXT_ROWS
    model_version = (index.manifest["encoder"] or {}).get("model_id", "numeric-only")

    def chunks() -> Iterator[list[Decision]]:
        for start in range(0, scored.scores.height, chunk_rows):
            rows = scored.scores.slice(start, chunk_rows).select(
                schema.TRANSACTION_ID, "score", "threshold", "decision", "input_hash",
                schema.TX_TIME)
            explanations, inputs = scored.texts(start, start + chunk_rows)
            yield [
                Decision(batch_id=batch_id, kind="fraud", subject_id=tx, score=score,
                         threshold=threshold, decision=decision, model_version=model_version,
                         index_version=index.version, input_hash=input_hash, explanation=None,
                         subject_time=tx_time, encoded=(explanation, row_inputs))
                for (tx, score, threshold, decision, input_hash, tx_time), explanation, row_inputs
                in zip(rows.iter_rows(), explanations, inputs, strict=True)]
            if progress is not None:
                progress("explaining and recording", start + rows.height, scored.scores.height)

    return DecisionStream(scored.scores.height, chunks)


def record(ledger: Ledger, ingested: IngestResult, scored: ScoredBatch, index: FraudIndex,
           batch_id: str, progress: Progress | None = None) -> BatchReceipt:
    """Write the batch's decisions and quarantined rows to the ledger in one transaction."""
    decisions = decisions_for(scored, batch_id, index, progress=progress)
    input_hash = batch_input_hash(ingested, scored)
    return ledger.record_batch(batch_id, "fraud", input_hash, ingested.rows_in, decisions,
                               ingested.ledger_rows())


@dataclass(frozen=True)
class Recorded:
    """A batch as the ledger holds it after :func:`record_and_reconcile`: ``scored`` carries
    the recorded score, threshold and decision of each row (this run's, when it recorded the
    batch); ``check`` compares this run with a batch the ledger already held (else None)."""

    receipt: BatchReceipt
    scored: ScoredBatch
    check: Reconciliation | None = None


def record_and_reconcile(ledger: Ledger, ingested: IngestResult, scored: ScoredBatch,
                         index: FraudIndex, batch_id: str, progress: Progress | None = None
                         ) -> Recorded:
    """:func:`record` the batch; when the ledger already held it (a re-run), compare this
    run's decisions with the recorded ones and take the recorded ones for the output."""
    receipt = record(ledger, ingested, scored, index, batch_id, progress=progress)
    if not receipt.already_present:
        return Recorded(receipt, scored)
    as_recorded, check = reconcile(ledger, scored, batch_id, index)
    return Recorded(receipt, as_recorded, check)


def reconcile(ledger: Ledger, scored: ScoredBatch, batch_id: str, index: FraudIndex
              ) -> tuple[ScoredBatch, Reconciliation]:
    """This run's scores with the recorded score, threshold and decision of each row of a
    batch the ledger already holds, and how this run's differ from them."""
    recorded = recorded_decisions(ledger, batch_id, "fraud")
    fresh = scored.scores.select(pl.col(schema.TRANSACTION_ID).alias("subject_id"),
                                 "decision", "score", "threshold")
    check = compare(fresh, recorded, version_column="index_version",
                    run_version=index.version)
    return dataclasses.replace(scored, scores=as_recorded(scored.scores, recorded)), check


def as_recorded(scores: pl.DataFrame, recorded: pl.DataFrame) -> pl.DataFrame:
    """``scores`` (in its order) with the score, threshold and decision the ledger records
    for each transaction."""
    values = recorded.select(pl.col("subject_id").alias(schema.TRANSACTION_ID), "score",
                             "threshold", "decision")
    return scores.update(values, on=schema.TRANSACTION_ID)


def ledger_warning(report: ScoreReport | DatasetReport, retry: str = "`--batch-id NEW`"
                   ) -> str | None:
    """What to tell the user when the ledger already held the batch with other decisions
    (or another index version), else None; ``retry`` says how to give a new batch id."""
    if report.ledger_index_version is None:
        return None
    # The recorded decisions compared: the batch's (all its rows, on a re-run), or those of
    # the day batches the ledger already held (partitioned scoring; other days may be new).
    compared = report.ledger_already_present
    check = Reconciliation(compared, report.ledger_differing, report.ledger_differing_labels,
                           tuple(report.ledger_index_version.split(", ")), report.index_version)
    if not check.disagrees:
        return None
    plural, others = False, None
    if hasattr(report, "batch_id"):
        batch = f"batch {report.batch_id}"
    else:
        held, new = report.ledger_batches_present, report.ledger_batches_added
        if new:  # some days were new to the ledger: recorded, and written, as this run made
            batch = f"{held:,} of the {held + new:,} daily batches of {report.input}"
            plural = held != 1
            others = (f"the other {new:,} daily batch{'es' if new != 1 else ''} "
                      f"({report.ledger_added:,} decisions) {'were' if new != 1 else 'was'} "
                      "new to the ledger: recorded, and written there, with this run's "
                      "decisions")
        else:
            batch = (f"each of the {held:,} daily batches of {report.input}" if held > 1
                     else f"the daily batch of {report.input}")
    return reconcile_warning(what="decisions", batch=batch, check=check, total=compared,
                             output=report.output,
                             label_words="flipped between alert and pass", version_word="index",
                             retry=retry, plural=plural, others=others)


def batch_input_hash(ingested: IngestResult, scored: ScoredBatch) -> str:
    """The hash the ledger records for a batch: its scored rows and its quarantined rows."""
    return batch_hash(scored.scores["input_hash"].to_list() + ingested.quarantine_hashes())


def top_alerts(scored: ScoredBatch, n: int = 10) -> list[dict[str, Any]]:
    top = scored.scores.filter(pl.col("decision") == "alert").sort("score", descending=True)
    return top.head(n).select(
        schema.TRANSACTION_ID, schema.TX_TIME, schema.CUSTOMER_ID, schema.AMOUNT,
        pl.col("score").round(4), pl.col("threshold").round(4),
    ).with_columns(pl.col(schema.TX_TIME).dt.to_string("%Y-%m-%d %H:%M:%S")).to_dicts()


def resolve_batch_id(input_path: str | Path, scored: ScoredBatch, batch_id: str | None,
                     ingested: IngestResult | None = None) -> str:
    """The given batch id, else one derived from the input rows: re-scoring the same rows
    lands on the same batch and adds nothing to the ledger. A file with no row scored is
    named by its quarantined rows (given ``ingested``): by the scored rows alone every such
    file of one name would get the same id, and the second would conflict in the ledger."""
    if batch_id:
        return batch_id
    if scored.scores.height == 0 and ingested is not None and ingested.quarantined.height:
        digest = batch_input_hash(ingested, scored)
    else:
        digest = batch_hash(scored.scores["input_hash"].to_list())
    return f"{Path(input_path).stem}-{digest[:12]}"


def write_outputs(scored: ScoredBatch, ingested: IngestResult, batch_id: str,
                  output_path: str | Path) -> tuple[Path, Path | None]:
    """Scores to ``output_path``; quarantined rows (if any) beside it."""
    out = write_frame(scored.scores.with_columns(pl.lit(batch_id).alias("batch_id")),
                      output_path)
    return out, quarantine_beside(ingested, out)


def score_file(input_path: str | Path, index: FraudIndex, output_path: str | Path, *,
               ledger: Ledger, batch_id: str | None = None, config: ScoringConfig | None = None,
               history: pl.DataFrame | None = None, progress: Progress | None = None
               ) -> ScoreReport:
    """Score a file and record it as one ledger batch; ``progress(stage, done, total)`` is
    told as the search and the ledger write advance. A batch the ledger already holds keeps
    its recorded decisions, and the output file gets those (see pipeline.reconcile); the
    report counts how many of this run's differ."""
    ingested = read_transactions(input_path)
    scored = FraudScorer(index, config).score(ingested.accepted, history, progress=progress)
    batch_id = resolve_batch_id(input_path, scored, batch_id, ingested)
    recorded = record_and_reconcile(ledger, ingested, scored, index, batch_id,
                                    progress=progress)
    out, qpath = write_outputs(recorded.scored, ingested, batch_id, output_path)
    return report_for(batch_id, ingested, recorded.scored, recorded.receipt, out, qpath, index,
                      recorded.check)


def report_for(batch_id: str, ingested: IngestResult, scored: ScoredBatch, receipt: BatchReceipt,
               out: Path, qpath: Path | None, index: FraudIndex,
               check: Reconciliation | None = None) -> ScoreReport:
    """The job's report; ``scored`` as recorded (what the output file holds)."""
    return ScoreReport(
        batch_id=batch_id, rows_in=ingested.rows_in, rows_scored=scored.scores.height,
        rows_quarantined=ingested.quarantined.height,
        alerts=int((scored.scores["decision"] == "alert").sum()),
        ledger_added=receipt.added, ledger_already_present=receipt.already_present,
        output=str(out), quarantine=str(qpath) if qpath else None,
        index_version=index.version, top_alerts=top_alerts(scored),
        ledger_differing=check.differing if check else 0,
        ledger_differing_labels=check.labels_differing if check else 0,
        ledger_index_version=(check.recorded_version or None) if check else None,
    )

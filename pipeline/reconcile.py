"""A batch run again when the ledger already holds it.

Batch ids are derived from the input rows, so re-running a file lands on the batch it was
recorded as, and the ledger adds nothing (a retried flow never duplicates a decision). A re-run
with other settings (another threshold, alerts per day, a newer index, another model) would
then make other decisions than the ledger holds. The rule, for every path that records a batch
(``score``, partitioned scoring, the inbox flows, ``sentiment classify``):

- the ledger keeps the recorded decisions (it is append-only);
- the output file gets the recorded decisions too, so that what operations act on is what
  auditors find in the ledger;
- the report says how many of this run's decisions differ from the recorded ones (label,
  score beyond :data:`SCORE_TOLERANCE`, threshold) and which version (index, model) the
  recorded ones name; the CLI prints a warning, exits 1 when decisions differ, and says how to
  record the new ones: a new batch id.

This module compares one run with the recorded batch: one indexed query for the batch's
(subject, decision, score, threshold, versions), joined with the run's decisions in polars.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipeline.ledger import OUTCOME_FIELDS, Ledger

# Scores recomputed from the same inputs may differ in the last bits (FAISS's float32
# distances with the rows searched in other groups): below this they are the same score.
SCORE_TOLERANCE = 1e-6

# Ledger.batch_outcomes's tuples as a frame.
RECORDED_SCHEMA = dict(zip(OUTCOME_FIELDS, (pl.String, pl.String, pl.Float64, pl.Float64,
                                            pl.String, pl.String), strict=True))


@dataclass(frozen=True)
class Reconciliation:
    """How a run's decisions compare with those the ledger already held for the batch."""

    decisions: int  # recorded decisions of the batch
    differing: int  # this run's decisions that differ in label, score or threshold
    labels_differing: int  # of those, the ones with another label (alert or pass, a sentiment)
    recorded_versions: tuple[str, ...]  # the index (fraud) or model (news) versions recorded
    run_version: str  # the version this run used
    batches: int = 1  # the recorded batches compared (partitioned scoring: days)

    @property
    def disagrees(self) -> bool:
        """True when the run's decisions, or the version that made them, are not the ledger's."""
        return self.differing > 0 or any(v != self.run_version for v in self.recorded_versions)

    @property
    def recorded_version(self) -> str:
        return ", ".join(self.recorded_versions)


def recorded_decisions(ledger: Ledger, batch_id: str, kind: str, *,
                       explanation: bool = False) -> pl.DataFrame:
    """The batch's recorded decisions (:data:`RECORDED_SCHEMA`, plus the explanation's JSON
    text with ``explanation``), read a chunk at a time into one frame."""
    schema = dict(RECORDED_SCHEMA)
    if explanation:
        schema["explanation"] = pl.String
    frames = [pl.DataFrame(rows, schema=schema, orient="row")
              for rows in ledger.batch_outcomes(batch_id, kind, explanation=explanation)]
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def compare(fresh: pl.DataFrame, recorded: pl.DataFrame, *, version_column: str,
            run_version: str) -> Reconciliation:
    """Compare this run's decisions (``fresh``: subject_id, decision, score, threshold) with
    the recorded ones; a subject the ledger lacks counts as differing."""
    joined = fresh.select("subject_id", "decision", "score", "threshold").join(
        recorded.select("subject_id", "decision", "score", "threshold"), on="subject_id",
        how="left", suffix="_recorded")
    label = pl.col("decision").ne_missing(pl.col("decision_recorded"))
    number = ((pl.col("score") - pl.col("score_recorded")).abs() > SCORE_TOLERANCE) | (
        (pl.col("threshold") - pl.col("threshold_recorded")).abs() > SCORE_TOLERANCE)
    counts = joined.select(label.sum().alias("labels"),
                           (label | number.fill_null(True)).sum().alias("any")).row(0)
    versions = tuple(sorted(recorded[version_column].unique().to_list()))
    return Reconciliation(decisions=recorded.height, differing=int(counts[1]),
                          labels_differing=int(counts[0]), recorded_versions=versions,
                          run_version=run_version)


def combine(checks: list[Reconciliation]) -> Reconciliation | None:
    """Several batches' reconciliations as one (partitioned scoring: a batch per day); None
    when no batch was already in the ledger."""
    if not checks:
        return None
    return Reconciliation(
        decisions=sum(c.decisions for c in checks), differing=sum(c.differing for c in checks),
        labels_differing=sum(c.labels_differing for c in checks),
        recorded_versions=tuple(sorted({v for c in checks for v in c.recorded_versions})),
        run_version=checks[0].run_version, batches=sum(c.batches for c in checks))


def warning(*, what: str, batch: str, check: Reconciliation, total: int, output: str,
            label_words: str, version_word: str, retry: str, plural: bool = False,
            others: str | None = None) -> str:
    """The message for a re-run the ledger kept other decisions of: what differs, that the
    ledger and ``output`` hold the recorded decisions, and how to record this run's.

    ``total`` is the number of recorded decisions compared; ``plural``: ``batch`` names
    several batches (``were``, ``their``); ``others`` says what became of the run's rows that
    were new to the ledger (partitioned scoring: days not recorded before)."""
    if check.differing:
        differs = (f"{check.differing:,} of {total:,} {what} differ from the recorded ones "
                   f"({check.labels_differing:,} {label_words})")
    else:
        differs = f"{'their' if plural else 'its'} {what} equal the recorded ones"
    kept = f"{output} holds them too, not this run's"
    if others:
        kept = f"{kept}; {others}"
    return (f"{batch} {'were' if plural else 'was'} already in the ledger, recorded with "
            f"{version_word} {check.recorded_version}; this run used {check.run_version} and "
            f"{differs}. The ledger keeps the recorded decisions, and {kept}. To record this "
            f"run's decisions, run it again under a new batch id ({retry}): a new batch, beside "
            "the recorded one.")

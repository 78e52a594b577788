"""What auditors need from the ledger: replay a decision, export decisions with pseudonymised ids
(CSV, JSON lines, Parquet, or a self-contained HTML case report), anchor files of the chain heads,
and analysts' reviews turned into labels for the next index build.

Replay reloads the exact index version a decision names, checks the encoder weights and every
index file against the manifest, rebuilds the query vector from the recorded inputs and compares
it with the recorded vector, then searches the recorded vectors of the decision's scoring call
again (FAISS's float32 distances depend on which queries are searched together, so the same call
is replayed as one) and recomputes the score with the recorded k, smoothing and prior.

A decision whose text embedding was made in fp16 (the encoder on CUDA) is replayed on any machine:
the rebuilt vector's text part is checked against the fp16 tolerance (FP16_EMBEDDING_TOLERANCE)
instead of the fp32 one, and the search (a stacked model's included) uses the recorded vectors.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import html
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import sqlalchemy as sa

from pipeline import artifacts, schema
from pipeline.ledger import (
    BATCHES,
    DECISIONS,
    FEEDBACK,
    QUARANTINE,
    Anchor,
    Ledger,
    LedgerError,
    VerifyReport,
    _created_between,
    canonical_json,
)

REVIEWER_ENV = "FINSENTINEL_REVIEWER"
SCORE_TOLERANCE = 1e-9
# A partial scoring call cannot be searched as it was; FAISS's float32 arithmetic then differs.
PARTIAL_CALL_TOLERANCE = 1e-6
# Rebuilt vs recorded query vector: text embeddings vary ~1e-7 with the texts batched with them.
VECTOR_TOLERANCE = 1e-4
# The text part of a vector whose embedding was made (or is rebuilt) in fp16 may differ by up to
# FP16_EMBEDDING_TOLERANCE x the vectorizer's text scale: fp16 arithmetic moved unit-length MiniLM
# embeddings of 1,075 synthetic merchant texts by an L2 distance of 0.0016 at most (fp16 against
# fp32 on the CPU), and a projected coordinate moves by at most text scale x that distance (the
# PCA components are unit rows). Measured projected differences: up to 1.2e-3, 12x
# VECTOR_TOLERANCE; the tolerance is ~6x the measured worst case and far below the distance to
# another merchant's text (median nearest 0.1-0.4). The numeric part keeps VECTOR_TOLERANCE.
FP16_EMBEDDING_TOLERANCE = 0.01
ID_FIELDS = (schema.CUSTOMER_ID, schema.TERMINAL_ID)  # card and merchant ids: pseudonymised
FEEDBACK_LABELS = {"confirmed-fraud": 1, "false-positive": 0}
ANCHOR_FORMAT = "finsentinel-ledger-anchors/1"
ExportFormat = Literal["csv", "jsonl", "parquet", "html"]
FORMATS: tuple[str, ...] = ("csv", "jsonl", "parquet", "html")
# Decisions read, converted and written per chunk of an export (a month may hold millions).
EXPORT_CHUNK_ROWS = 5_000

EXPORT_SCHEMA: dict[str, pl.DataType] = {
    "seq": pl.Int64(), "decision_id": pl.String(), "batch_id": pl.String(), "kind": pl.String(),
    "subject_id": pl.String(), "customer_id": pl.String(), "terminal_id": pl.String(),
    "tx_time": pl.String(), "amount": pl.Float64(), "score": pl.Float64(),
    "threshold": pl.Float64(), "decision": pl.String(), "model_version": pl.String(),
    "index_version": pl.String(), "input_hash": pl.String(), "created_at": pl.String(),
    "subject_time": pl.String(), "prev_hash": pl.String(), "hash": pl.String(),
    "explanation": pl.String(),
    "inputs": pl.String(), "review_label": pl.String(), "reviewer": pl.String(),
    "reviewed_at": pl.String(), "review_comment": pl.String(), "reviews": pl.Int64(),
}


# --- time ranges -----------------------------------------------------------------------------

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


def time_range(start: str | None, end: str | None) -> tuple[datetime | None, datetime | None]:
    """``--from``/``--to`` as a half-open UTC range [since, until). Both ends are inclusive as
    written: a bare date covers its whole day, so ``--from 2024-05-01 --to 2024-05-31`` is May."""
    since = _parse(start, "--from")
    until = _parse(end, "--to")
    if until is not None:
        until += timedelta(days=1) if _is_date(end) else timedelta(microseconds=1)
    if since is not None and until is not None and until <= since:
        raise ValueError(f"--to ({end}) is before --from ({start})")
    return since, until


def month_range(month: str) -> tuple[datetime, datetime]:
    """"YYYY-MM" as [first day, first day of the next month)."""
    found = _MONTH.match(month.strip())
    if not found or not 1 <= int(found[2]) <= 12:
        raise ValueError(f"month: expected YYYY-MM, got {month!r}")
    year, mon = int(found[1]), int(found[2])
    start = datetime(year, mon, 1)
    return start, datetime(year + (mon == 12), mon % 12 + 1, 1)


def previous_month(today: date | None = None) -> str:
    first = (today or datetime.now(UTC).date()).replace(day=1)
    return (first - timedelta(days=1)).strftime("%Y-%m")


def _is_date(value: str) -> bool:
    """A day without a time, in any ISO-8601 spelling (2024-05-01, 20240501, 2024-W18-3)."""
    try:
        date.fromisoformat(value.strip())
    except ValueError:
        return False
    return True


def _parse(value: str | None, option: str) -> datetime | None:
    if value is None or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ValueError(f"{option}: expected a date (2024-05-01) or an ISO-8601 time "
                         f"(2024-05-01T12:00), got {value!r}") from exc
    return parsed if parsed.tzinfo is None else parsed.astimezone(UTC).replace(tzinfo=None)


# --- pseudonyms ------------------------------------------------------------------------------

Pseudonymiser = Callable[[Any], Any]


def pseudonymiser(reveal: bool = False) -> Pseudonymiser:
    """Card (customer) and terminal ids -> keyed HMAC-SHA256 pseudonyms, the same ones
    :mod:`pipeline.privacy` writes to logs; identity with ``reveal``. The key comes from
    ``$FINSENTINEL_PSEUDONYM_KEY`` only and is never written anywhere."""
    from pipeline.privacy import pseudonym_key, pseudonymise

    if reveal:
        return lambda value: value
    try:  # the key rules are privacy's (set, and long enough not to be found by trying)
        secret = pseudonym_key(required=True)
    except ValueError as exc:
        raise ValueError(f"{exc}; audit exports replace card and terminal ids with a keyed "
                         "hash (HMAC-SHA256), or pass --reveal to export the raw ids") from None
    return lambda value: None if value is None else pseudonymise(value, key=secret)


def pseudonymise_ids(value: Any, pseudo: Pseudonymiser) -> Any:
    """A copy of a JSON value with every card/terminal id field (at any depth) pseudonymised."""
    if isinstance(value, dict):
        return {k: pseudo(v) if k in ID_FIELDS and isinstance(v, str | int)
                else pseudonymise_ids(v, pseudo) if isinstance(v, dict | list) else v
                for k, v in value.items()}
    if isinstance(value, list):
        return [pseudonymise_ids(v, pseudo) if isinstance(v, dict | list) else v for v in value]
    return value


# --- analyst feedback ------------------------------------------------------------------------

def default_reviewer() -> str:
    """$FINSENTINEL_REVIEWER, else the operating-system user."""
    configured = os.environ.get(REVIEWER_ENV, "").strip()
    if configured:
        return configured
    try:
        return getpass.getuser()
    except (KeyError, OSError) as exc:
        raise ValueError(f"no reviewer: pass --reviewer or set ${REVIEWER_ENV}") from exc


@dataclass(frozen=True)
class FeedbackLabels:
    """The latest fraud review per transaction, as labels for an index build."""

    # transaction_id, is_fraud (Int8), label_time (review time, naive UTC), label, reviewer
    frame: pl.DataFrame
    feedback_head_seq: int
    feedback_head_hash: str


def feedback_labels(ledger: Ledger) -> FeedbackLabels:
    """confirmed-fraud -> is_fraud 1, false-positive -> 0; label time = review time. A later
    review of the same transaction (any batch) supersedes an earlier one."""
    reviews = ledger.feedback()
    latest: dict[str, dict[str, Any]] = {}
    for review in reviews:  # in chain order: the last one wins
        if review["kind"] == "fraud" and review["label"] in FEEDBACK_LABELS:
            latest[review["subject_id"]] = review
    rows = list(latest.values())
    frame = pl.DataFrame({
        schema.TRANSACTION_ID: [r["subject_id"] for r in rows],
        schema.IS_FRAUD: [FEEDBACK_LABELS[r["label"]] for r in rows],
        "label_time": [_naive_utc(r["created_at"]) for r in rows],
        "label": [r["label"] for r in rows],
        "reviewer": [r["reviewer"] for r in rows],
    }, schema={schema.TRANSACTION_ID: pl.String(), schema.IS_FRAUD: pl.Int8(),
               "label_time": pl.Datetime("us"), "label": pl.String(), "reviewer": pl.String()})
    head = reviews[-1] if reviews else None
    return FeedbackLabels(frame, int(head["seq"]) if head else 0,
                          head["hash"] if head else "0" * 64)


def apply_feedback(history: pl.DataFrame, labels: FeedbackLabels) -> tuple[pl.DataFrame, int]:
    """``history`` with reviewed transactions relabelled and given their review time as
    ``label_time`` (:meth:`FraudIndex.build` uses it); and how many rows were relabelled."""
    if labels.frame.height == 0:
        return history, 0
    reviewed = labels.frame.select(schema.TRANSACTION_ID, pl.col(schema.IS_FRAUD).alias("_fb"),
                                   pl.col("label_time").alias("_fb_time"))
    joined = history.join(reviewed, on=schema.TRANSACTION_ID, how="left",
                          maintain_order="left")
    applied = int(joined["_fb"].is_not_null().sum())
    earlier = (pl.col("label_time").cast(pl.Datetime("us")) if "label_time" in history.columns
               else pl.lit(None, pl.Datetime("us")))
    joined = joined.with_columns(
        pl.coalesce("_fb", schema.IS_FRAUD).cast(pl.Int8).alias(schema.IS_FRAUD),
        pl.coalesce("_fb_time", earlier).alias("label_time"),
    ).drop("_fb", "_fb_time")
    return joined, applied


def _naive_utc(stamp: str) -> datetime:
    parsed = datetime.fromisoformat(stamp)
    return parsed if parsed.tzinfo is None else parsed.astimezone(UTC).replace(tzinfo=None)


# --- replay ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplayResult:
    """A decision recomputed from its recorded inputs and artefacts. ``reason`` says what
    matched, or exactly which artefact is missing or changed, or what differs."""

    decision_id: str
    ok: bool
    reason: str
    recorded_score: float
    replayed_score: float | None = None
    score_difference: float | None = None
    recorded_threshold: float | None = None
    replayed_threshold: float | None = None
    recorded_decision: str | None = None
    replayed_decision: str | None = None
    index_version: str = ""
    model_version: str = ""
    vector_max_difference: float | None = None
    neighbours_match: bool | None = None
    rows_searched: int = 0
    neighbours: list[dict[str, Any]] = field(default_factory=list)
    # The text encoder's precision when the decision was scored (None: not on record — an older
    # record, or an index without a text part) and in this replay; the tolerance the rebuilt
    # vector's text part was checked against.
    recorded_precision: str | None = None
    replay_precision: str | None = None
    vector_tolerance: float | None = None


def replay(ledger: Ledger, decision_id: str, *, root: str | Path | None = None,
           encoder: Any = None) -> ReplayResult:
    """Recompute decision ``decision_id`` and compare it with what the ledger recorded."""
    record = ledger.decision(decision_id)
    if record is None:
        raise LedgerError(f"no decision {decision_id!r} in the ledger")

    found: dict[str, Any] = {}  # what every later result carries (the precisions)

    def result(ok: bool, reason: str, **kw: Any) -> ReplayResult:
        return ReplayResult(decision_id, ok, reason, float(record["score"]),
                            recorded_threshold=float(record["threshold"]),
                            recorded_decision=record["decision"],
                            index_version=record["index_version"],
                            model_version=record["model_version"], **found, **kw)

    if record["kind"] != "fraud":
        return result(False, f"a {record['kind']!r} decision: replay recomputes fraud scores only")
    inputs = record["inputs"]
    if inputs is None:
        return result(False, "the decision was recorded without its inputs (a schema version 1 "
                             "record): only its input hash is on record, so its score cannot be "
                             "recomputed")
    try:
        index = load_recorded_index(record["index_version"], record["model_version"], root,
                                    encoder)
    except (artifacts.ArtifactError, OSError, ValueError) as exc:
        return result(False, str(exc))

    group, complete = _scoring_call(ledger, record)
    frame = inputs_frame([r["inputs"] for r in group])
    target = next(i for i, r in enumerate(group) if r["decision_id"] == decision_id)

    from pipeline.scoring import row_hashes

    for row, recomputed in zip(group, row_hashes(frame), strict=True):
        if recomputed != row["input_hash"]:
            return result(False, f"the recorded inputs of decision {row['decision_id']} hash to "
                                 f"{recomputed[:16]}…, not to its input hash "
                                 f"{row['input_hash'][:16]}…: the inputs are not what was scored")
    recorded = np.vstack([_vector(r["inputs"]) for r in group])
    if recorded.shape[1] != index.vectorizer.dimension:
        return result(False, f"the recorded query vector has {recorded.shape[1]} dimensions but "
                             f"index {record['index_version']} makes "
                             f"{index.vectorizer.dimension}: not the index that scored")
    rebuilt = index.vectorizer.transform(frame[target:target + 1])
    check = _check_vector(index.vectorizer, rebuilt[0], recorded[target], inputs,
                          inputs["search"].get("device", "cpu"))
    vector_diff = check.max_difference
    found.update(recorded_precision=check.recorded_precision,
                 replay_precision=check.replay_precision, vector_tolerance=check.text_tolerance)
    if not check.ok:
        return result(False, f"the vector rebuilt from the recorded inputs differs from the "
                             f"recorded query vector: {check.detail}; the vectorizer or encoder "
                             "differs from the one that scored",
                      vector_max_difference=vector_diff)

    settings = inputs["scoring"]
    prior = float(settings["prior"])
    if settings.get("prior_source") == "index" and prior != index.fraud_rate:
        return result(False, f"the recorded prior {prior!r} is not index "
                             f"{record['index_version']}'s fraud rate {index.fraud_rate!r}: the "
                             "index's labels changed", vector_max_difference=vector_diff)

    from pipeline.scoring import ScoringConfig, alert_thresholds, knn_score, similarity

    times = frame[schema.TX_TIME].dt.epoch("us").to_numpy()
    ids = frame[schema.TRANSACTION_ID].to_numpy()
    distances, positions = index.neighbours(recorded, times, ids, int(settings["k"]))
    sims = similarity(distances)
    labels = index.labels_at(positions)
    scores = knn_score(sims, labels, prior=prior, smoothing=float(settings["smoothing"]))
    knn_replayed = float(scores[target])
    if index.model is not None:  # a --scorer knn-stacked index: its booster gave the score
        if check.fp16:  # its neighbours from the recorded fp16 vectors, not fp32 rebuilt ones
            with _recorded_vectors(index, frame, recorded):
                scores = index.model.predict(frame, index, index.meta, contributions=False).scores
        else:
            scores = index.model.predict(frame, index, index.meta, contributions=False).scores
    replayed = float(scores[target])

    threshold = float(settings["threshold"])
    if settings.get("alerts_per_day") is not None:
        # The day's ranking was made over the scored batch: recomputable when that batch was
        # one search call and all of it is here.
        if complete and inputs["search"].get("calls", 1) == 1:
            config = ScoringConfig(alerts_per_day=int(settings["alerts_per_day"]))
            per_day = alert_thresholds(frame.select(schema.TX_TIME).with_columns(
                pl.Series("score", scores, dtype=pl.Float64)), config)
            threshold = float(per_day[target])
        else:
            threshold = float(record["threshold"])
    decision = "alert" if replayed >= threshold else "pass"

    meta_ids = index.meta[schema.TRANSACTION_ID].to_list()
    meta_times = index.meta[schema.TX_TIME].to_list()
    recorded_neighbours = [n["transaction_id"] for n in record["explanation"].get("neighbours", [])]
    neighbours = []
    for j, pos in enumerate(positions[target]):
        if pos < 0:
            break
        neighbours.append({"transaction_id": meta_ids[pos], "similarity": float(sims[target, j]),
                           "is_fraud": int(labels[target, j]),
                           "tx_time": meta_times[pos].isoformat()})
    replayed_ids = [n["transaction_id"] for n in neighbours[:len(recorded_neighbours)]]
    same_neighbours = replayed_ids == recorded_neighbours

    tolerance = SCORE_TOLERANCE if complete else PARTIAL_CALL_TOLERANCE
    difference = abs(replayed - float(record["score"]))
    problems = []
    if not difference <= tolerance:
        problems.append(f"score {replayed!r} differs from the recorded {record['score']!r} by "
                        f"{difference:.3g} (tolerance {tolerance:g})")
    if abs(threshold - float(record["threshold"])) > tolerance:
        problems.append(f"threshold {threshold!r} differs from the recorded "
                        f"{record['threshold']!r}")
    if decision != record["decision"]:
        problems.append(f"decision {decision!r} differs from the recorded {record['decision']!r}")
    recorded_knn = record["explanation"].get("knn_score")
    if recorded_knn is not None and abs(knn_replayed - float(recorded_knn)) > max(tolerance, 1e-6):
        problems.append(f"the kNN score {knn_replayed!r} behind the stacked model differs from "
                        f"the recorded {recorded_knn!r}")
    if not same_neighbours:
        problems.append("the neighbours differ from the recorded explanation "
                        f"({replayed_ids[:3]}… vs {recorded_neighbours[:3]}…)")
    note = ("" if complete else f"; only {len(group)} of the {inputs['search']['rows']} rows of "
            "its scoring call are in the batch, so FAISS's float32 distances may differ slightly")
    device = inputs["search"].get("device", "cpu")
    if device == "gpu-float16":
        note += ("; scored on a GPU with vectors in half precision, so its distances were "
                 "approximate")
    if device.startswith("gpu") and not index.gpu:
        note += "; scored on a GPU, replayed on the CPU"
    note += f"; {check.detail}"
    detail = dict(replayed_score=replayed, score_difference=difference,
                  replayed_threshold=threshold, replayed_decision=decision,
                  vector_max_difference=vector_diff, neighbours_match=same_neighbours,
                  rows_searched=len(group), neighbours=neighbours)
    if problems:
        return result(False, "; ".join(problems) + note, **detail)
    return result(True, f"score {replayed!r} reproduced (difference {difference:.3g}) with index "
                        f"{record['index_version']} and encoder {record['model_version']}; "
                        f"{len(recorded_neighbours)} recorded neighbours identical{note}",
                  **detail)


@dataclass(frozen=True)
class VectorCheck:
    """The rebuilt query vector against the recorded one, in the encoder precisions of both."""

    ok: bool
    max_difference: float
    recorded_precision: str | None  # None: not on record (or no text part)
    replay_precision: str | None
    text_tolerance: float
    fp16: bool  # either side ran the encoder in fp16: the fp16 tolerance applies
    detail: str  # which precisions, what differs by how much, against which tolerance


def _check_vector(vectorizer: Any, rebuilt: np.ndarray, recorded: np.ndarray,
                  inputs: Mapping[str, Any], search_device: str) -> VectorCheck:
    """Numeric part within VECTOR_TOLERANCE; text part within VECTOR_TOLERANCE when both sides
    ran the encoder in fp32, within FP16_EMBEDDING_TOLERANCE x text scale when either ran it
    in fp16 (a record without its precision counts as fp32, as it was checked before)."""
    diff = np.abs(rebuilt.astype(np.float64) - recorded.astype(np.float64))
    numeric = len(vectorizer.config.numeric_features)
    numeric_diff = float(np.max(diff[:numeric], initial=0.0))
    text_diff = float(np.max(diff[numeric:], initial=0.0))
    max_diff = max(numeric_diff, text_diff) if np.isfinite(diff).all() else math.inf
    if not (vectorizer.use_text_ and vectorizer.encoder is not None):
        ok = max_diff <= VECTOR_TOLERANCE
        return VectorCheck(ok, max_diff, None, None, VECTOR_TOLERANCE, False,
                           f"numeric vector within {max_diff:.3g} (tolerance "
                           f"{VECTOR_TOLERANCE:g})" if ok else f"numeric vector differs by up "
                           f"to {max_diff:.3g} (tolerance {VECTOR_TOLERANCE:g})")
    on_record = inputs.get("encoder") or {}
    recorded_precision = on_record.get("precision")
    encoder = vectorizer.encoder
    replay_precision = str(getattr(encoder, "precision", "fp32"))
    fp16 = "fp16" in (recorded_precision, replay_precision)
    fp16_tolerance = FP16_EMBEDDING_TOLERANCE * float(vectorizer.text_scale_)
    text_tolerance = fp16_tolerance if fp16 else VECTOR_TOLERANCE
    ok = max_diff <= VECTOR_TOLERANCE or (numeric_diff <= VECTOR_TOLERANCE
                                          and text_diff <= text_tolerance)
    scored_as = (f"recorded in {recorded_precision} ({on_record.get('device', '?')})"
                 if recorded_precision else "precision not recorded (an older record: checked "
                                            + ("with the fp16 tolerance, as this replay runs in "
                                               "fp16)" if fp16 else "as fp32)"))
    parts = [f"text embedding {scored_as}, rebuilt in {replay_precision} "
             f"({getattr(encoder, 'device', '?')})"]
    within = "within" if text_diff <= text_tolerance else "beyond"
    if fp16:
        parts.append(f"text part of the vector differs by up to {text_diff:.3g}, {within} the "
                     f"fp16 tolerance {text_tolerance:.3g} (FP16_EMBEDDING_TOLERANCE "
                     f"{FP16_EMBEDDING_TOLERANCE:g} x text scale {vectorizer.text_scale_:.3g}: "
                     "fp16 arithmetic moves a MiniLM embedding by <= 0.0016, measured)")
        parts.append("the search used the recorded query vectors")
    else:
        parts.append(f"text part differs by up to {text_diff:.3g}, {within} the fp32 tolerance "
                     f"{VECTOR_TOLERANCE:g}")
    parts.append(f"numeric part by up to {numeric_diff:.3g} (tolerance {VECTOR_TOLERANCE:g})")
    if not ok and recorded_precision is None and numeric_diff <= VECTOR_TOLERANCE \
            and text_diff <= fp16_tolerance:
        on_gpu = " and it was searched on a GPU" if search_device.startswith("gpu") else ""
        parts.append("the record does not record the encoder's precision" + on_gpu + ": a "
                     "difference of this size is what an encoder run in fp16 (on CUDA) gives, "
                     f"within the fp16 tolerance {fp16_tolerance:.3g}, but an fp32 decision "
                     "cannot be told from it, so it is not accepted")
    return VectorCheck(ok, max_diff, recorded_precision, replay_precision, text_tolerance, fp16,
                       "; ".join(parts))


class _RecordedVectorizer:
    """An index's vectorizer whose ``transform`` of the replayed call's rows gives their
    recorded query vectors (matched by transaction id); everything else is the vectorizer's."""

    def __init__(self, vectorizer: Any, frame: pl.DataFrame, vectors: np.ndarray):
        self._vectorizer = vectorizer
        self._vectors = vectors
        self._rows = {tx: i for i, tx in enumerate(frame[schema.TRANSACTION_ID].to_list())}

    def transform(self, frame: pl.DataFrame) -> np.ndarray:
        rows = [self._rows[tx] for tx in frame[schema.TRANSACTION_ID].to_list()]
        return np.ascontiguousarray(self._vectors[rows], dtype=np.float32)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vectorizer, name)


@contextmanager
def _recorded_vectors(index: Any, frame: pl.DataFrame, vectors: np.ndarray) -> Iterator[None]:
    """While inside, ``index`` (loaded for this replay only) vectorises the rows of ``frame``
    to their recorded ``vectors``: a stacked model's neighbours are then searched from what
    was searched at scoring time."""
    vectorizer = index.vectorizer
    index.vectorizer = _RecordedVectorizer(vectorizer, frame, vectors)
    try:
        yield
    finally:
        index.vectorizer = vectorizer


def load_recorded_index(index_version: str, model_version: str, root: str | Path | None,
                        encoder: Any = None):
    """The exact index version a decision names, with every file checked against its manifest
    and the encoder weights against the recorded hash; ArtifactError says what is missing or
    changed."""
    from pipeline.index import INDEXES_ENV, FraudIndex, default_root

    name, _, version = index_version.rpartition("@")
    if not name or not version or version == "unsaved":
        raise artifacts.ArtifactError(f"index version {index_version!r} does not name a saved "
                                      "index (NAME@VERSION): nothing to reload")
    root = Path(root) if root else default_root()
    directory = root / name / version
    if not directory.is_dir():
        base = root / name
        if not base.is_dir():  # a wrong --root, most likely: not a pruned version
            raise artifacts.ArtifactError(
                f"index version {index_version} is missing: there is no index {name!r} under "
                f"{root} (check --root or ${INDEXES_ENV}: the decision was scored with the "
                f"index folder {name}/)")
        present = sorted(p.name for p in base.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        raise artifacts.ArtifactError(
            f"index version {index_version} is missing: {directory} does not exist (versions "
            f"present: {', '.join(present) or 'none'}). Publishing keeps the newest "
            f"${artifacts.KEEP_VERSIONS_ENV}={artifacts.keep_versions() or 'all'} versions and "
            "prunes older ones; restore this version from backup to replay the decision")
    index = FraudIndex.load(name, root, version=version, encoder=encoder)
    expected = (index.manifest.get("encoder") or {}).get("model_id", "numeric-only")
    if expected != model_version:
        raise artifacts.ArtifactError(
            f"index {index_version} was built with encoder {expected}, but the decision records "
            f"model {model_version}: the index version on disk is not the one that scored")
    return index


def _scoring_call(ledger: Ledger, record: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The decisions searched together with ``record``, in their order; and whether all of
    them are in the ledger's batch."""
    search = record["inputs"]["search"]
    group = [r for r in ledger.decisions(batch_id=record["batch_id"], kind=record["kind"])
             if r["inputs"] is not None and r["inputs"]["search"]["call"] == search["call"]]
    group.sort(key=lambda r: r["inputs"]["search"]["row"])
    complete = [r["inputs"]["search"]["row"] for r in group] == list(range(search["rows"]))
    return group, complete


def inputs_frame(inputs: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """The recorded rows as a frame in canonical dtypes: the scored fields plus the features."""
    fields = [dict(i["transaction"]) for i in inputs]
    columns = sorted({k for f in fields for k in f})
    frame = pl.DataFrame({c: [f.get(c) for f in fields] for c in columns},
                         schema={c: schema.DTYPES[c] if c != schema.TX_TIME else pl.String()
                                 for c in columns})
    frame = frame.with_columns(pl.col(schema.TX_TIME).str.to_datetime("%Y-%m-%dT%H:%M:%S%.f",
                                                                      time_unit="us"))
    names = list(inputs[0]["features"])
    features = pl.DataFrame({n: [i["features"][n] for i in inputs] for n in names},
                            schema=dict.fromkeys(names, pl.Float64()))
    return frame.hstack(features.drop([n for n in names if n in frame.columns]))


def _vector(inputs: Mapping[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(inputs["vector_f32"]), dtype="<f4").astype(np.float32)


# --- the ledger auditors read ----------------------------------------------------------------

def missing_ledger(url: str | None) -> str | None:
    """Where the ledger ``url`` names (as :func:`~pipeline.ledger.resolve_db_url` resolves
    it) when no ledger is there: a SQLite file that does not exist, or a database (an empty
    file, a mistyped PostgreSQL database or schema) without the ledger's tables; None when
    there is one. Creates nothing: opening a missing ledger would create an empty one, which
    verifies as an intact chain. A database that cannot be inspected is left to the ledger to
    open (and name what is wrong)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.ledger import LEDGER_META, missing_sqlite_ledger, resolve_db_url

    path = missing_sqlite_ledger(url)
    if path is not None:
        return str(path)
    resolved = resolve_db_url(url)
    try:
        engine = sa.create_engine(resolved)
    except (SQLAlchemyError, ImportError, ValueError):
        return None
    try:
        with engine.connect() as conn:
            if sa.inspect(conn).has_table(LEDGER_META.name):
                return None
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()
    parsed = make_url(resolved)
    if parsed.get_backend_name() == "sqlite":
        return str(Path(parsed.database or "").resolve())
    return parsed.render_as_string(hide_password=True)



def require_ledger(url: str | None, what: str, option: str = "--db") -> str:
    """The resolved URL of the existing ledger ``url`` names; :class:`LedgerError` naming
    where none is (see :func:`missing_ledger`) and what ``what`` needed it for."""
    from pipeline.ledger import resolve_db_url

    missing = missing_ledger(url)
    if missing is not None:
        raise LedgerError(f"no ledger at {missing}: {what} needs an existing ledger database "
                          f"(check {option} or $FINSENTINEL_DB; a ledger is created by "
                          "`finsentinel score`)")
    return resolve_db_url(url)

# --- anchors ---------------------------------------------------------------------------------

def write_anchors(path: str | Path, anchors: Sequence[Anchor]) -> Path:
    """The chain heads per day as JSON: keep the file outside the database (write-once storage,
    another system) so that ``audit verify --anchors`` can catch a rebuilt ledger."""
    document = {"format": ANCHOR_FORMAT, "written_at": datetime.now(UTC).isoformat(),
                "anchors": [asdict(a) for a in anchors]}
    return artifacts.atomic_write_bytes(path, (json.dumps(document, indent=1) + "\n").encode())


def read_anchors(path: str | Path) -> list[Anchor]:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not an anchor file (invalid JSON: {exc})") from exc
    if not isinstance(document, dict) or document.get("format") != ANCHOR_FORMAT:
        raise ValueError(f"{path}: not an anchor file (expected format {ANCHOR_FORMAT!r})")
    try:
        return [Anchor(str(a["chain"]), str(a["day"]), int(a["last_seq"]), str(a["head_hash"]),
                       int(a["records"]),
                       None if a.get("batches") is None else str(a["batches"]))
                for a in document["anchors"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: anchor entry malformed ({exc!r}); expected chain, day, "
                         "last_seq, head_hash, records") from exc


# --- exports ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportReport:
    path: str
    format: str
    rows: int
    anchors_path: str
    anchors: int
    verified: bool
    verify_reason: str
    pseudonymised: bool
    quarantined: int = 0  # rows the period's batches set aside, in quarantine_path
    quarantine_path: str | None = None  # None: html, or a selection of decisions


QUARANTINE_EXPORT_SCHEMA: dict[str, pl.DataType] = {
    "batch_id": pl.String(), "kind": pl.String(), "batch_created_at": pl.String(),
    "row_number": pl.Int64(), "field": pl.String(), "reason": pl.String(),
    "raw_sha256": pl.String(), "raw": pl.String(),
}


def quarantine_export_path(out: str | Path) -> Path:
    """Where an export's quarantined rows go: ``month.csv`` -> ``month.quarantine.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.quarantine{out.suffix}")


def quarantine_rows(ledger: Ledger, since: datetime | None = None,
                    until: datetime | None = None, *, reveal: bool = False,
                    batch_id: str | None = None) -> pl.DataFrame:
    """The rows the batches recorded in [since, until) set aside, in ledger order (by batch
    time, then row number): where and why, the raw record's sha256 (to match the source file)
    and, with ``reveal`` only, the raw record itself (it may hold card and terminal ids)."""
    query = (sa.select(QUARANTINE.c.batch_id, QUARANTINE.c.kind,
                       BATCHES.c.created_at.label("batch_created_at"), QUARANTINE.c.row_number,
                       QUARANTINE.c.field, QUARANTINE.c.reason, QUARANTINE.c.raw)
             .join(BATCHES, sa.and_(BATCHES.c.batch_id == QUARANTINE.c.batch_id,
                                    BATCHES.c.kind == QUARANTINE.c.kind))
             .order_by(BATCHES.c.created_at, QUARANTINE.c.batch_id, QUARANTINE.c.kind,
                       QUARANTINE.c.row_number))
    if batch_id is not None:
        query = query.where(QUARANTINE.c.batch_id == batch_id)
    query = _created_between(query, BATCHES.c.created_at, since, until)
    with ledger.read() as conn:
        rows = [{**r, "raw_sha256": hashlib.sha256(r["raw"].encode()).hexdigest(),
                 "raw": r["raw"] if reveal else None}
                for r in conn.execute(query).mappings()]
    return pl.DataFrame(rows, schema=QUARANTINE_EXPORT_SCHEMA).select(
        list(QUARANTINE_EXPORT_SCHEMA))


def read_quarantine_export(path: str | Path, format: str | None = None) -> pl.DataFrame:
    """Read an export's quarantine file back with its exact column types."""
    return _read_table(path, format, QUARANTINE_EXPORT_SCHEMA)


def export_rows(ledger: Ledger, since: datetime | None = None, until: datetime | None = None, *,
                reveal: bool = False, batch_id: str | None = None,
                decision_ids: Sequence[str] | None = None, alerts_only: bool = False
                ) -> list[dict[str, Any]]:
    """One row per decision (created_at in [since, until)), in ledger order, with its latest
    review; card and terminal ids pseudonymised unless ``reveal``. Explanation and inputs are
    JSON text: with ``reveal`` the texts as recorded, so each row's hash can be recomputed
    from the export; otherwise canonical JSON of the pseudonymised values."""
    return [row for chunk in iter_export_rows(ledger, since, until, reveal=reveal,
                                              batch_id=batch_id, decision_ids=decision_ids,
                                              alerts_only=alerts_only)
            for row in chunk]


def iter_export_rows(ledger: Ledger, since: datetime | None = None,
                     until: datetime | None = None, *, reveal: bool = False,
                     batch_id: str | None = None, decision_ids: Sequence[str] | None = None,
                     alerts_only: bool = False, chunk_rows: int | None = None
                     ) -> Iterator[list[dict[str, Any]]]:
    """The rows of :func:`export_rows`, ``chunk_rows`` (default EXPORT_CHUNK_ROWS) at a time,
    streamed from one query in one snapshot (decisions and reviews agree): an export of any
    size never holds more than a chunk of decisions in memory."""
    for rows, _ in _export_chunks(ledger, since, until, reveal=reveal, batch_id=batch_id,
                                  decision_ids=decision_ids, alerts_only=alerts_only,
                                  chunk_rows=chunk_rows):
        yield rows


def _export_chunks(ledger: Ledger, since: datetime | None, until: datetime | None, *,
                   reveal: bool, batch_id: str | None, decision_ids: Sequence[str] | None,
                   alerts_only: bool, chunk_rows: int | None = None
                   ) -> Iterator[tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]]:
    """Chunks of export rows with every review of the chunk's decisions (oldest first), all
    read in one snapshot."""
    pseudo = pseudonymiser(reveal)
    table = DECISIONS
    query = sa.select(table).order_by(table.c.seq)
    if batch_id is not None:
        query = query.where(table.c.batch_id == batch_id)
    if alerts_only:
        query = query.where(table.c.decision == "alert")
    query = _created_between(query, table.c.created_at, since, until)
    if decision_ids is not None:
        query = query.where(table.c.decision_id.in_(list(decision_ids)))
    # Reviews of the selected decisions only, in chain order (the last one is current).
    selected = query.with_only_columns(table.c.decision_id).order_by(None)
    review_query = (sa.select(FEEDBACK).where(FEEDBACK.c.decision_id.in_(selected))
                    .order_by(FEEDBACK.c.seq))
    size = max(1, int(chunk_rows or EXPORT_CHUNK_ROWS))
    with ledger.read() as conn:
        reviews: dict[str, list[dict[str, Any]]] = {}
        for review in conn.execute(review_query).mappings():
            reviews.setdefault(review["decision_id"], []).append(dict(review))
        result = conn.execution_options(yield_per=size).execute(query)
        try:
            for part in result.mappings().partitions(size):
                found = {d["decision_id"]: reviews[d["decision_id"]] for d in part
                         if d["decision_id"] in reviews}
                yield ([_export_row(d, reviews.get(d["decision_id"], []), pseudo, reveal)
                        for d in part], found)
        finally:
            result.close()


def _export_row(d: Mapping[str, Any], history: list[dict[str, Any]], pseudo: Pseudonymiser,
                reveal: bool) -> dict[str, Any]:
    inputs = None if d["inputs"] is None else pseudonymise_ids(json.loads(d["inputs"]), pseudo)
    if reveal:
        recorded = {"explanation": d["explanation"], "inputs": d["inputs"]}
    else:
        recorded = {"explanation": canonical_json(pseudonymise_ids(
            json.loads(d["explanation"]), pseudo)),
            "inputs": None if inputs is None else canonical_json(inputs)}
    tx = (inputs or {}).get("transaction", {})
    last = history[-1] if history else {}
    return {
        "seq": int(d["seq"]), "decision_id": d["decision_id"], "batch_id": d["batch_id"],
        "kind": d["kind"], "subject_id": d["subject_id"],
        "customer_id": tx.get(schema.CUSTOMER_ID), "terminal_id": tx.get(schema.TERMINAL_ID),
        "tx_time": tx.get(schema.TX_TIME), "amount": tx.get(schema.AMOUNT),
        "score": float(d["score"]), "threshold": float(d["threshold"]),
        "decision": d["decision"], "model_version": d["model_version"],
        "index_version": d["index_version"], "input_hash": d["input_hash"],
        "created_at": d["created_at"], "subject_time": d["subject_time"],
        "prev_hash": d["prev_hash"], "hash": d["hash"], **recorded,
        "review_label": last.get("label"), "reviewer": last.get("reviewer"),
        "reviewed_at": last.get("created_at"), "review_comment": last.get("comment"),
        "reviews": len(history),
    }


def reviews_by_decision(ledger: Ledger, decision_ids: Sequence[str]
                        ) -> dict[str, list[dict[str, Any]]]:
    """Every review of the given decisions, oldest first, by decision: one query per 1,000
    ids (an HTML case report's reviews), not the whole review chain nor a query a decision."""
    with ledger.read() as conn:
        return reviews_in(conn, decision_ids)


def reviews_in(conn: sa.Connection, decision_ids: Sequence[str]
               ) -> dict[str, list[dict[str, Any]]]:
    """:func:`reviews_by_decision` on an open connection (inside a caller's snapshot)."""
    wanted = list(dict.fromkeys(decision_ids))
    found: dict[str, list[dict[str, Any]]] = {}
    for start in range(0, len(wanted), 1000):
        query = (sa.select(FEEDBACK).where(FEEDBACK.c.decision_id.in_(
            wanted[start:start + 1000])).order_by(FEEDBACK.c.seq))
        for review in conn.execute(query).mappings():
            found.setdefault(review["decision_id"], []).append(dict(review))
    return found


def export_frame(rows: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=EXPORT_SCHEMA, orient="row") if rows else \
        pl.DataFrame(schema=EXPORT_SCHEMA)


def read_export(path: str | Path, format: str | None = None) -> pl.DataFrame:
    """Read a CSV / JSON-lines / Parquet export back with its exact column types."""
    return _read_table(path, format, EXPORT_SCHEMA)


def _read_table(path: str | Path, format: str | None, columns: dict[str, pl.DataType]
                ) -> pl.DataFrame:
    path = Path(path)
    format = format or _format_of(path)
    if format == "csv":
        return pl.read_csv(path, schema=columns)
    if format == "jsonl":
        return pl.read_ndjson(path, schema=columns)
    if format == "parquet":
        return pl.read_parquet(path).cast(columns)
    raise ValueError(f"{path}: cannot read back format {format!r}; expected csv, jsonl or parquet")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"ndjson": "jsonl", "htm": "html"}.get(suffix, suffix)


class ExportRefused(LedgerError):
    """An export not written: the ledger does not verify and an earlier export (or its
    anchors) is at the path; ``verified`` says where the ledger breaks."""

    def __init__(self, message: str, verified: VerifyReport):
        super().__init__(message)
        self.verified = verified


def previous_anchors(path: str | Path) -> list[Anchor]:
    """The anchors of an anchor file about to be replaced (none if there is no file): a
    ledger must still hold them before new anchors are written over them."""
    path = Path(path)
    return read_anchors(path) if path.exists() else []


def export(ledger: Ledger, out: str | Path, format: str, since: datetime | None = None,
           until: datetime | None = None, *, reveal: bool = False, batch_id: str | None = None,
           decision_ids: Sequence[str] | None = None, alerts_only: bool = False,
           max_cases: int = 2000) -> ExportReport:
    """Write the decisions in [since, until) to ``out`` (atomically, streamed a chunk at a
    time), and the chain heads of each day in the range to ``<out>.anchors.json``. The ledger
    is verified first, against the anchors already at ``<out>.anchors.json`` too (an earlier
    export of the period: a ledger rebuilt since then fails there); the result is stated in
    the report (and on the HTML report's first page). When the ledger does not verify, an
    earlier export and its anchors are kept (ExportRefused); with none there, the export is
    written all the same, for the auditors to see what the ledger holds."""
    if format not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    out = Path(out)
    anchors_path = out.with_name(out.name + ".anchors.json")
    pseudonymiser(reveal)  # a missing key stops here, before anything is read or written
    previous = previous_anchors(anchors_path)
    verified = ledger.verify(anchors=previous)
    if not verified.ok and (previous or out.exists()):
        raise ExportRefused(
            f"the ledger does not verify ({verified.chain} seq {verified.first_bad_seq}: "
            f"{verified.reason}); the existing export {out} and its anchors {anchors_path} "
            "were kept, nothing was written", verified)
    if format == "html":
        rows: list[dict[str, Any]] = []
        reviews: dict[str, list[dict[str, Any]]] = {}
        parts = _export_chunks(ledger, since, until, reveal=reveal, batch_id=batch_id,
                               decision_ids=decision_ids, alerts_only=alerts_only)
        for chunk, found in parts:
            rows += chunk
            reviews |= found
            if len(rows) > max_cases:
                parts.close()
                raise ValueError(f"more than {max_cases:,} decisions selected for an HTML case "
                                 "report: narrow it with --batch, --decision, --alerts-only or "
                                 "--from/--to, or export csv/jsonl/parquet")
        page = render_case_report(rows, reviews, verified=verified, since=since, until=until,
                                  pseudonymised=not reveal)
        artifacts.atomic_write_bytes(out, page.encode("utf-8"))
        count = len(rows)
    else:
        chunks = iter_export_rows(ledger, since, until, reveal=reveal, batch_id=batch_id,
                                  decision_ids=decision_ids, alerts_only=alerts_only)
        with artifacts.atomic_path(out) as tmp:
            count = _write_table(tmp, format, chunks)
    held, held_path = 0, quarantine_export_path(out)
    if format != "html" and decision_ids is None and not alerts_only:
        quarantined = quarantine_rows(ledger, since, until, reveal=reveal, batch_id=batch_id)
        with artifacts.atomic_path(held_path) as tmp:
            {"csv": quarantined.write_csv, "jsonl": quarantined.write_ndjson,
             "parquet": quarantined.write_parquet}[format](tmp)
        held = quarantined.height
    else:  # a selection of decisions: an earlier export's file there would read as this one's
        held_path.unlink(missing_ok=True)
        held_path = None
    anchors = ledger.anchors(since, until)
    written = write_anchors(anchors_path, anchors)
    return ExportReport(str(out), format, count, str(written), len(anchors),
                        verified.ok, verified.reason, not reveal, held,
                        None if held_path is None else str(held_path))


def _write_table(path: Path, format: str, chunks: Iterator[list[dict[str, Any]]]) -> int:
    """Write the export's chunks one after the other to ``path`` (a header once; one Parquet
    row group per chunk), synced to disk; the number of rows written."""
    import pyarrow.parquet as pq

    count = 0
    arrow_schema = export_frame([]).to_arrow().schema
    with open(path, "wb") as handle:
        writer = pq.ParquetWriter(handle, arrow_schema) if format == "parquet" else None
        try:
            for chunk in chunks:
                frame = export_frame(chunk)
                if format == "csv":
                    frame.write_csv(handle, include_header=count == 0)
                elif format == "jsonl":
                    frame.write_ndjson(handle)
                else:
                    writer.write_table(frame.to_arrow().cast(arrow_schema))
                count += frame.height
            if count == 0 and format == "csv":
                export_frame([]).write_csv(handle)
        finally:
            if writer is not None:
                writer.close()
        handle.flush()
        os.fsync(handle.fileno())
    return count


# --- HTML case report ------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;margin:24px auto;
max-width:1040px;padding:0 16px}h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0}
h3{font-size:14px;margin:18px 0 6px;color:#3a4252}table{border-collapse:collapse;width:100%;
margin:4px 0}th,td{border-bottom:1px solid #e3e6ec;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f6f9;font-weight:600}td.n{text-align:right;
font-variant-numeric:tabular-nums}code,.h{font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:12px;word-break:break-all}.case{border:1px solid #d5d9e0;border-radius:6px;
padding:14px 18px;margin:22px 0;page-break-inside:avoid}.badge{display:inline-block;
border-radius:4px;padding:1px 8px;font-weight:600;font-size:12px}.alert{background:#fde2e1;
color:#9b1c1c}.pass{background:#e1f5e6;color:#1d6b35}.other{background:#eef0f4;color:#3b4252}.ok{color:#1d6b35}.bad{color:#9b1c1c}
.muted{color:#6b7385}.grid{display:grid;grid-template-columns:1fr 1fr;gap:4px 24px}
@media print{body{margin:0}.case{border:none}}
"""


def render_case_report(rows: Sequence[Mapping[str, Any]],
                       reviews: Mapping[str, list[dict[str, Any]]], *,
                       verified: VerifyReport | None = None, since: datetime | None = None,
                       until: datetime | None = None, pseudonymised: bool = True) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts, no external assets): a
    summary table, then one case section per decision. Every text is HTML-escaped."""
    e = _esc
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>finsentinel case report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>finsentinel case report</h1>"]
    scope = (f"decisions recorded from {e(since.isoformat() if since else 'the start')} "
             f"to {e(until.isoformat() if until else 'now')} (UTC, end exclusive)")
    parts.append(f'<p class="muted">{len(rows)} {scope}; generated '
                 f"{e(datetime.now(UTC).isoformat(timespec='seconds'))}. "
                 + ("Card and terminal ids are keyed pseudonyms (HMAC-SHA256)."
                    if pseudonymised else "Card and terminal ids are shown as recorded.")
                 + "</p>")
    if verified is not None:
        css = "ok" if verified.ok else "bad"
        status = "intact" if verified.ok else (f"BROKEN at {e(verified.chain)} seq "
                                               f"{e(verified.first_bad_seq)}")
        parts.append(f'<p>Ledger hash chain at export: <b class="{css}">{status}</b> — '
                     f"{e(verified.reason)}</p>")
    parts.append("<table><tr><th>seq</th><th>subject</th><th>time</th><th>score</th>"
                 "<th>threshold</th><th>decision</th><th>review</th></tr>")
    for r in rows:
        parts.append(
            f'<tr><td class="n"><a href="#d{int(r["seq"])}">{int(r["seq"])}</a></td>'
            f"<td>{e(r['subject_id'])}</td><td>{e(r['tx_time'] or r['subject_time'])}</td>"
            f'<td class="n">{r["score"]:.4f}</td><td class="n">{r["threshold"]:.4f}</td>'
            f"<td>{_badge(r['decision'])}</td><td>{e(r['review_label'] or '')}</td></tr>")
    parts.append("</table>")
    for r in rows:
        parts.append(_case(r, reviews.get(r["decision_id"], [])))
    parts.append("</body></html>")
    return "\n".join(parts)


def _case(r: Mapping[str, Any], reviews: list[dict[str, Any]]) -> str:
    if r["kind"] == "sentiment":
        return _sentiment_case(r, reviews)
    e = _esc
    explanation = json.loads(r["explanation"])
    inputs = json.loads(r["inputs"]) if r["inputs"] else {}
    tx = inputs.get("transaction", {})
    out = [f'<section class="case" id="d{int(r["seq"])}">',
           f"<h2>{e(r['kind'])} decision on {e(r['subject_id'])} {_badge(r['decision'])}</h2>",
           _gauge(float(r["score"]), float(r["threshold"])), '<div class="grid">']
    facts = [("decision id", r["decision_id"]), ("batch", r["batch_id"]),
             ("card (customer)", r["customer_id"]), ("terminal", r["terminal_id"]),
             ("transaction time", r["tx_time"]), ("amount", r["amount"]),
             ("recorded at", r["created_at"]), ("ledger seq", r["seq"])]
    facts += [(k.replace("_", " "), tx[k]) for k in schema.DESCRIPTIVE if tx.get(k) is not None]
    out += [f"<div><span class='muted'>{e(k)}:</span> {e(v)}</div>" for k, v in facts]
    out.append("</div>")
    if explanation.get("method"):
        out.append(
            f"<p class='muted'>score = (fraud weight {e(explanation.get('fraud_weight'))} + "
            f"{e(explanation.get('smoothing'))} × prior {e(explanation.get('prior'))}) / "
            f"(total weight {e(explanation.get('total_weight'))} + "
            f"{e(explanation.get('smoothing'))}) over {e(explanation.get('neighbours_used'))} of "
            f"k={e(explanation.get('k'))} neighbours whose label was known in time</p>")
    neighbours = explanation.get("neighbours") or []
    if neighbours:
        out.append("<h3>Nearest labelled neighbours</h3><table><tr><th>#</th><th>transaction"
                   "</th><th>similarity</th><th>label</th><th>time</th></tr>")
        for i, n in enumerate(neighbours, 1):
            label = {1: "fraud", 0: "genuine"}.get(n.get("is_fraud"), n.get("is_fraud"))
            out.append(f"<tr><td class='n'>{i}</td><td>{e(n.get('transaction_id'))}</td>"
                       f"<td class='n'>{e(n.get('similarity'))}</td><td>{e(label)}</td>"
                       f"<td>{e(n.get('tx_time'))}</td></tr>")
        out.append("</table>")
    features = explanation.get("features") or {}
    if features:
        out.append(f"<h3>Features against the card's usual values "
                   f"({e(explanation.get('card_history_transactions'))} earlier transactions "
                   "of the card in the index)</h3>")
        out.append(_feature_chart(features))
        out.append("<table><tr><th>feature</th><th>this transaction</th><th>card usual</th>"
                   "</tr>")
        for name, v in features.items():
            out.append(f"<tr><td>{e(name)}</td><td class='n'>{e(_fmt(v.get('value')))}</td>"
                       f"<td class='n'>{e(_fmt(v.get('card_usual')))}</td></tr>")
        out.append("</table>")
    out += _versions_and_reviews(r, reviews)
    return "\n".join(out)


# What a sentiment case shows in its own sections; any other explanation field is listed too.
_SENTIMENT_SHOWN = ("probabilities", "attributions", "nearest_training_examples", "aggregation",
                    "rationale", "failure", "tickers", "units", "signed_score")


def _sentiment_case(r: Mapping[str, Any], reviews: list[dict[str, Any]]) -> str:
    """A news classification: the article, the label's probabilities, and why (the words
    that moved it, the nearest labelled training texts, the sentences of a long article, an
    LLM's rationale)."""
    e = _esc
    explanation = json.loads(r["explanation"])
    inputs = json.loads(r["inputs"]) if r["inputs"] else {}
    out = [f'<section class="case" id="d{int(r["seq"])}">',
           f"<h2>{e(r['kind'])} decision on {e(r['subject_id'])} {_badge(r['decision'])}</h2>",
           f"<p><b>{e(inputs.get('headline'))}</b></p>"]
    body = inputs.get("body") or ""
    if body:
        out.append(f"<p class='muted'>{e(body[:600])}{'…' if len(body) > 600 else ''}</p>")
    out.append('<div class="grid">')
    facts = [("decision id", r["decision_id"]), ("batch", r["batch_id"]),
             ("published", inputs.get("published_at") or r["subject_time"]),
             ("source", inputs.get("source")),
             ("tickers", ", ".join(explanation.get("tickers") or []) or "none found"),
             ("confidence", f"{float(r['score']):.4f}"),
             ("signed score (positive − negative)", explanation.get("signed_score")),
             ("texts classified", explanation.get("units")),
             ("recorded at", r["created_at"]), ("ledger seq", r["seq"])]
    out += [f"<div><span class='muted'>{e(k)}:</span> {e(v)}</div>" for k, v in facts
            if v is not None]
    out.append("</div>")
    if explanation.get("failure"):
        out.append(f"<p class='bad'>No label: {e(explanation['failure'])}</p>")
    probabilities = explanation.get("probabilities") or {}
    if probabilities:
        out.append("<h3>Probabilities</h3><table><tr><th>label</th><th>probability</th></tr>")
        out += [f"<tr><td>{e(label)}</td><td class='n'>{e(_fmt(p))}</td></tr>"
                for label, p in probabilities.items()]
        out.append("</table>")
    if explanation.get("rationale"):
        out.append(f"<h3>The model's rationale</h3><p>{e(explanation['rationale'])}</p>")
    words = (explanation.get("attributions") or {}).get("words") or []
    if words:
        method = (explanation.get("attributions") or {}).get("method")
        out.append(f"<h3>Words that moved the label ({e(method)}: the label's probability "
                   "lost when the word is left out)</h3><table><tr><th>word</th>"
                   "<th>weight</th></tr>")
        out += [f"<tr><td>{e(w.get('word'))}</td><td class='n'>{e(_fmt(w.get('weight')))}"
                "</td></tr>" for w in words]
        out.append("</table>")
    examples = explanation.get("nearest_training_examples") or []
    if examples:
        out.append("<h3>Nearest labelled training texts</h3><table><tr><th>#</th><th>text</th>"
                   "<th>label</th><th>similarity</th></tr>")
        out += [f"<tr><td class='n'>{i}</td><td>{e(x.get('text'))}</td><td>{e(x.get('label'))}"
                f"</td><td class='n'>{e(_fmt(x.get('similarity')))}</td></tr>"
                for i, x in enumerate(examples, 1)]
        out.append("</table>")
    aggregation = explanation.get("aggregation") or {}
    if aggregation.get("sentences"):
        out.append(f"<h3>Body sentences ({e(aggregation.get('method'))}; the heaviest "
                   "shown)</h3><table><tr><th>sentence</th><th>label</th><th>weight</th></tr>")
        out += [f"<tr><td>{e(x.get('text'))}</td><td>{e(x.get('label'))}</td>"
                f"<td class='n'>{e(_fmt(x.get('weight')))}</td></tr>"
                for x in aggregation["sentences"]]
        out.append("</table>")
    other = {k: v for k, v in explanation.items() if k not in _SENTIMENT_SHOWN}
    if other:
        out.append("<h3>Model and run</h3><table>")
        out += [f"<tr><th>{e(k.replace('_', ' '))}</th><td class='h'>"
                f"{e(v if isinstance(v, str) else canonical_json(v))}</td></tr>"
                for k, v in other.items()]
        out.append("</table>")
    out += _versions_and_reviews(r, reviews)
    return "\n".join(out)


def _versions_and_reviews(r: Mapping[str, Any], reviews: list[dict[str, Any]]) -> list[str]:
    e = _esc
    out = ["<h3>Versions and hashes</h3><table>"]
    for k in ("model_version", "index_version", "input_hash", "prev_hash", "hash"):
        out.append(f"<tr><th>{e(k.replace('_', ' '))}</th><td class='h'>{e(r[k])}</td></tr>")
    out.append("</table><h3>Reviews</h3>")
    if reviews:
        out.append("<table><tr><th>when</th><th>reviewer</th><th>label</th><th>comment</th>"
                   "</tr>")
        for rv in reviews:
            out.append(f"<tr><td>{e(rv['created_at'])}</td><td>{e(rv['reviewer'])}</td>"
                       f"<td>{e(rv['label'])}</td><td>{e(rv['comment'] or '')}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p class='muted'>not reviewed</p>")
    out.append("</section>")
    return out


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.4f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
    return str(value)


def _badge(decision: str) -> str:
    # Fraud: alert red, pass green; news: negative red, positive green, the rest grey.
    css = {"alert": "alert", "negative": "alert", "pass": "pass", "positive": "pass"}.get(
        decision, "other")
    return f'<span class="badge {css}">{_esc(decision)}</span>'


def _gauge(score: float, threshold: float) -> str:
    """Score against threshold on a 0..1 bar."""
    width, x0, bar = 420, 10, 400
    sx, tx = x0 + bar * min(max(score, 0), 1), x0 + bar * min(max(threshold, 0), 1)
    colour = "#c0392b" if score >= threshold else "#2e8b57"
    return (f'<svg width="{width}" height="44" viewBox="0 0 {width} 44" role="img" '
            f'aria-label="score {score:.4f} against threshold {threshold:.4f}">'
            f'<rect x="{x0}" y="8" width="{bar}" height="14" fill="#eef0f4" rx="3"/>'
            f'<rect x="{x0}" y="8" width="{sx - x0:.1f}" height="14" fill="{colour}" rx="3"/>'
            f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="3" y2="27" stroke="#1d2330" '
            f'stroke-width="2"/><text x="{x0}" y="40" font-size="11">score {score:.4f}</text>'
            f'<text x="{min(tx, width - 110):.1f}" y="40" font-size="11">threshold '
            f"{threshold:.4f}</text></svg>")


def _feature_chart(features: Mapping[str, Mapping[str, Any]]) -> str:
    """Horizontal bars, this transaction (dark) against the card's usual value (light), each
    feature scaled to the larger of the two (features have different units)."""
    label_w, bar_w, row_h = 290, 330, 22
    height = row_h * len(features) + 24
    width = label_w + bar_w + 140
    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           'aria-label="features against the card\'s usual values">',
           f'<rect x="{label_w}" y="2" width="10" height="10" fill="#2c4a7a"/>'
           f'<text x="{label_w + 14}" y="11" font-size="11">this transaction</text>'
           f'<rect x="{label_w + 130}" y="2" width="10" height="10" fill="#b9c4d6"/>'
           f'<text x="{label_w + 144}" y="11" font-size="11">card usual</text>']
    for i, (name, v) in enumerate(features.items()):
        y = 20 + i * row_h
        value, usual = v.get("value"), v.get("card_usual")
        scale = max(abs(value or 0.0), abs(usual or 0.0)) or 1.0
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" font-size="11" '
                   f'text-anchor="end">{_esc(name)}</text>')
        for offset, number, colour in ((2, value, "#2c4a7a"), (11, usual, "#b9c4d6")):
            if number is None:
                continue
            length = bar_w * abs(number) / scale
            out.append(f'<rect x="{label_w}" y="{y + offset}" width="{length:.1f}" height="8" '
                       f'fill="{colour}"/>')
        out.append(f'<text x="{label_w + bar_w + 6}" y="{y + 13}" font-size="11">'
                   f"{_esc(_fmt(value))} / {_esc(_fmt(usual))}</text>")
    out.append("</svg>")
    return "".join(out)

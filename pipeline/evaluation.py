"""The fraud handbook's prequential evaluation protocol (Le Borgne et al., ch. 5.2-5.3).

One fold: train on ``train_days`` days, wait ``delay_days`` days (labels not known yet), test on
the next ``test_days`` days. Fold 0 tests from ``test_start``; each further fold steps back
``test_days`` days. A test day leaves out the cards already known to be compromised: those with a
fraud in the training period or in the delay period up to that test day minus the delay (the
handbook's ``get_train_test_set``: for test day t, frauds on days before t - delay). Metrics per
fold: AUC ROC, Average Precision and Card Precision@k over the fold's test rows; the summary is
their mean and (population, as scikit-learn's grid search reports) standard deviation over folds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from pipeline import schema
from pipeline.metrics import average_precision, card_precision_at_k, roc_auc

DAY = "_day"
METRICS = ("auc_roc", "average_precision", "card_precision_at_k")


@dataclass(frozen=True)
class ProtocolConfig:
    """The handbook's defaults: 7 days train, 7 days label delay, 7 days test, 4 folds, CP@100."""

    train_days: int = 7
    delay_days: int = 7
    test_days: int = 7
    folds: int = 4
    top_k: int = 100

    def __post_init__(self) -> None:
        for name in ("train_days", "test_days", "folds", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.delay_days < 0:
            raise ValueError(f"delay_days must be >= 0, got {self.delay_days}")


class Scorer(Protocol):
    """What the protocol evaluates: fit on a training frame, score a test frame (higher = more
    likely fraud). Frames carry the canonical columns and the handbook features.

    ``history`` is the labelled data a scorer may consult as evidence beside its training rows:
    every transaction before the last test day minus the delay. A scorer must use a row's label
    only from the row's time + delay on (the rule the handbook's terminal-risk features follow);
    the model itself is fitted on ``train`` only."""

    name: str

    def fit(self, train: pl.DataFrame, history: pl.DataFrame | None = None) -> Scorer: ...

    def score(self, test: pl.DataFrame, history: pl.DataFrame | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class FoldSplit:
    """The rows of one fold: ``test`` already without the known-compromised cards."""

    fold: int
    train_start: date
    train_end: date  # exclusive
    test_start: date
    test_end: date  # exclusive
    train: pl.DataFrame
    test: pl.DataFrame
    test_rows_removed: int
    cards_removed: int


def with_day(frame: pl.DataFrame) -> pl.DataFrame:
    """Add the calendar day of each transaction (the handbook's TX_TIME_DAYS, as a date)."""
    if DAY in frame.columns:
        return frame
    return frame.with_columns(pl.col(schema.TX_TIME).dt.date().alias(DAY))


def fold_test_starts(test_start: date, config: ProtocolConfig) -> list[date]:
    """Test start of each fold: fold 0 at ``test_start``, then ``test_days`` earlier each."""
    return [test_start - timedelta(days=i * config.test_days) for i in range(config.folds)]


def split_fold(frame: pl.DataFrame, test_start: date, config: ProtocolConfig, fold: int = 0,
               *, check_coverage: bool = True) -> FoldSplit:
    """Training rows and (known-compromised cards removed) test rows of the fold testing from
    ``test_start``. ``frame`` needs tx_time, customer_id and is_fraud."""
    frame = with_day(frame)
    train_start = test_start - timedelta(days=config.delay_days + config.train_days)
    train_end = train_start + timedelta(days=config.train_days)
    test_end = test_start + timedelta(days=config.test_days)
    if check_coverage:
        _check_coverage(frame, train_start, test_end, fold, config)
    day = pl.col(DAY)
    train = frame.filter((day >= train_start) & (day < train_end))
    # First fraud day of each card from the training start on: a card is known compromised on
    # test day t when that day is before t - delay (the delay period's frauds become known one
    # day at a time, as in the handbook).
    first_fraud = (
        frame.filter((pl.col(schema.IS_FRAUD) == 1) & (day >= train_start)
                     & (day < test_end - timedelta(days=config.delay_days)))
        .group_by(schema.CUSTOMER_ID).agg(day.min().alias("_first_fraud"))
    )
    test_all = frame.filter((day >= test_start) & (day < test_end))
    known = (
        test_all.select(schema.CUSTOMER_ID, DAY)
        .join(first_fraud, on=schema.CUSTOMER_ID, how="left", maintain_order="left")
        .select(pl.col("_first_fraud").is_not_null()
                & (pl.col("_first_fraud") < pl.col(DAY) - timedelta(days=config.delay_days)))
        .to_series()
    )
    test = test_all.filter(~known)
    return FoldSplit(
        fold=fold, train_start=train_start, train_end=train_end, test_start=test_start,
        test_end=test_end, train=train, test=test, test_rows_removed=int(known.sum()),
        cards_removed=test_all.filter(known)[schema.CUSTOMER_ID].n_unique(),
    )


def _check_coverage(frame: pl.DataFrame, train_start: date, test_end: date, fold: int,
                    config: ProtocolConfig) -> None:
    """Refuse a fold the data does not cover, saying which way to move ``--test-start``."""
    first, last = frame[DAY].min(), frame[DAY].max()
    last_test_day = test_end - timedelta(days=1)
    if first is not None and first <= train_start and last_test_day <= last:
        return
    needs = (f"fold {fold} needs data from {train_start} to {last_test_day} (training start to "
             "last test day), but the data covers ")
    if first is None:
        raise ValueError(needs + "no day at all")
    span = (last - first).days + 1
    needs += f"{first} to {last} ({span} days); "
    needed = config.train_days + config.delay_days + config.folds * config.test_days
    earliest = first + timedelta(days=needed - config.test_days)
    latest = last - timedelta(days=config.test_days - 1)
    if needed > span:
        raise ValueError(
            needs + f"{config.folds} fold(s) of {config.train_days} training, "
            f"{config.delay_days} delay and {config.test_days} test days need at least {needed} "
            "days: use fewer --folds or shorter periods, or more data")
    if last_test_day > last:
        raise ValueError(
            needs + f"its test days run past the data's last day {last}: choose an earlier "
            f"--test-start ({latest} at the latest)")
    raise ValueError(
        needs + f"its training starts before the data's first day {first}: choose a later "
        f"--test-start ({earliest} at the earliest with {config.folds} folds) or fewer --folds")


def check_split(split: FoldSplit) -> None:
    """Refuse a fold that cannot be trained or tested: no rows, or training rows of one class
    (a classifier cannot learn from them; a constant score's AUC 0.5 is no result)."""
    last_train_day = split.train_end - timedelta(days=1)
    days = f"{split.train_start} to {last_train_day}"
    if split.train.height == 0:
        raise ValueError(f"fold {split.fold}: no training rows from {days}")
    if split.test.height == 0:
        raise ValueError(f"fold {split.fold}: no test rows from {split.test_start} to "
                         f"{split.test_end - timedelta(days=1)} (after removing known-"
                         "compromised cards)")
    frauds = int(split.train[schema.IS_FRAUD].cast(pl.Int64).sum())
    if frauds in (0, split.train.height):
        what = "no fraud" if frauds == 0 else "only frauds"
        raise ValueError(
            f"fold {split.fold}: the training days {days} hold {what} ({split.train.height} "
            "rows): a scorer cannot learn from one class; choose another --test-start, more "
            "--train-days or fewer --folds")


def labelled_history(frame: pl.DataFrame, split: FoldSplit, config: ProtocolConfig
                     ) -> pl.DataFrame:
    """The rows whose label can be known at some moment of the fold's test period: transaction
    time + delay before the end of the last test day. When the test period is longer than the
    delay, its first days are among them: a scorer uses a row's label only from its
    transaction time + delay on (the index's and the terminal evidence's rule), so a test row
    never sees its own label or a later one."""
    end = datetime.combine(split.test_end, datetime.min.time())
    return frame.filter(pl.col(schema.TX_TIME) < end - timedelta(days=config.delay_days))


def prequential_splits(frame: pl.DataFrame, test_start: date, config: ProtocolConfig
                       ) -> list[FoldSplit]:
    frame = with_day(frame)
    return [split_fold(frame, start, config, fold)
            for fold, start in enumerate(fold_test_starts(test_start, config))]


@dataclass(frozen=True)
class FoldResult:
    fold: int
    train_start: str
    train_end: str
    test_start: str
    test_end: str
    train_rows: int
    train_frauds: int
    test_rows: int
    test_frauds: int
    test_rows_removed: int
    cards_removed: int
    auc_roc: float
    average_precision: float
    card_precision_at_k: float
    card_precision_per_day: list[float]
    fit_seconds: float
    score_seconds: float


def fold_metrics(test: pl.DataFrame, scores: np.ndarray, top_k: int) -> dict[str, Any]:
    """AUC ROC, AP and CP@k of ``scores`` on the rows of ``test``."""
    test = with_day(test)
    labels = test[schema.IS_FRAUD].to_numpy()
    cp, per_day = card_precision_at_k(test[DAY].to_numpy(), test[schema.CUSTOMER_ID].to_numpy(),
                                      labels, scores, top_k)
    return {"auc_roc": roc_auc(labels, scores),
            "average_precision": average_precision(labels, scores),
            "card_precision_at_k": cp, "card_precision_per_day": per_day}


def evaluate_fold(split: FoldSplit, scorer: Scorer, config: ProtocolConfig,
                  history: pl.DataFrame | None = None) -> FoldResult:
    check_split(split)
    started = time.perf_counter()
    scorer.fit(split.train, history)
    fitted = time.perf_counter()
    scores = np.asarray(scorer.score(split.test, history), dtype=np.float64)
    scored = time.perf_counter()
    if scores.shape != (split.test.height,):
        raise ValueError(f"scorer {scorer.name!r} returned {scores.shape} scores for "
                         f"{split.test.height} test rows")
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"scorer {scorer.name!r} returned {bad} non-finite scores (NaN or "
                         f"infinite) for the {split.test.height} test rows of fold {split.fold}")
    metrics = fold_metrics(split.test, scores, config.top_k)
    return FoldResult(
        fold=split.fold, train_start=split.train_start.isoformat(),
        train_end=split.train_end.isoformat(), test_start=split.test_start.isoformat(),
        test_end=split.test_end.isoformat(), train_rows=split.train.height,
        train_frauds=int(split.train[schema.IS_FRAUD].sum()), test_rows=split.test.height,
        test_frauds=int(split.test[schema.IS_FRAUD].sum()),
        test_rows_removed=split.test_rows_removed, cards_removed=split.cards_removed,
        **metrics, fit_seconds=round(fitted - started, 3), score_seconds=round(scored - fitted, 3),
    )


def summarise(folds: list[FoldResult]) -> dict[str, dict[str, float]]:
    """Mean and population standard deviation over folds of each metric."""
    out = {}
    for name in METRICS:
        values = np.array([getattr(f, name) for f in folds], dtype=np.float64)
        out[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    out["seconds"] = {"mean": float(np.mean([f.fit_seconds + f.score_seconds for f in folds])),
                      "std": float(np.std([f.fit_seconds + f.score_seconds for f in folds]))}
    return out


@dataclass
class EvaluationReport:
    scorer: str
    settings: dict[str, Any]
    folds: list[FoldResult]
    summary: dict[str, dict[str, float]]
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"scorer": self.scorer, "settings": self.settings,
                "summary": self.summary, "folds": [asdict(f) for f in self.folds],
                "wall_seconds": round(self.wall_seconds, 3)}


def evaluate(frame: pl.DataFrame, make_scorer: Callable[[], Scorer], test_start: date,
             config: ProtocolConfig | None = None, *, settings: dict[str, Any] | None = None,
             on_fold: Callable[[FoldResult], None] | None = None) -> EvaluationReport:
    """Run the protocol: a fresh scorer per fold, fitted on its training rows only."""
    config = config or ProtocolConfig()
    started = time.perf_counter()
    frame = with_day(frame)
    splits = prequential_splits(frame, test_start, config)  # checks every fold's coverage first
    for split in splits:  # and that each can be trained and tested, before fitting any
        check_split(split)
    results = []
    name = "?"
    for split in splits:
        scorer = make_scorer()
        name = scorer.name
        result = evaluate_fold(split, scorer, config, labelled_history(frame, split, config))
        results.append(result)
        if on_fold:
            on_fold(result)
    all_settings = {"test_start": test_start.isoformat(), "protocol": asdict(config),
                    **(settings or {})}
    return EvaluationReport(scorer=name, settings=all_settings, folds=results,
                            summary=summarise(results),
                            wall_seconds=time.perf_counter() - started)


def parse_day(value: str | date | datetime) -> date:
    """A test start as a date: ``2018-07-25`` (a time of day is refused: folds are whole days)."""
    if isinstance(value, datetime):
        if value.time() != datetime.min.time():
            raise ValueError(f"test start must be a day, got {value.isoformat()}")
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"test start: expected a day such as 2018-07-25, got {value!r}") from None


def load_featured(path: str | Path, label_delay_days: int = 7) -> tuple[pl.DataFrame, dict]:
    """Read transactions (quarantining bad rows) and compute the handbook features over the
    whole file, as the handbook does before splitting; then keep the labelled rows, the ones the
    protocol trains and tests on. Rows whose label is not known yet still count in their card's
    and terminal's windows (as when scoring in production): dropping them first would change
    the features of every other row of that card and terminal. Returns the labelled frame and a
    record of what was read (path, sha256, rows in, accepted, unlabelled, quarantined, first
    and last labelled day)."""
    from pipeline.artifacts import sha256_file
    from pipeline.features import compute_features
    from pipeline.ingest import read_transactions

    ingested = read_transactions(path, require_labels=False)
    if schema.IS_FRAUD not in ingested.accepted.columns and ingested.accepted.height:
        read_transactions(path, require_labels=True)  # raises, naming the missing label column
    featured = compute_features(ingested.accepted, label_delay_days=label_delay_days)
    unlabelled = (featured[schema.IS_FRAUD].null_count() if schema.IS_FRAUD in featured.columns
                  else featured.height)
    frame = with_day(featured.filter(pl.col(schema.IS_FRAUD).is_not_null())
                     if unlabelled else featured)
    if frame.height == 0:
        raise ValueError(f"{path}: no labelled transaction to evaluate on ({ingested.rows_in} "
                         f"rows: {unlabelled} without a label, {ingested.quarantined.height} "
                         "quarantined)")
    record = {"data": str(path), "data_sha256": sha256_file(path),
              "rows_in": ingested.rows_in, "rows_accepted": frame.height,
              "rows_unlabelled": unlabelled,
              "rows_quarantined": ingested.quarantined.height,
              "data_first_day": frame[DAY].min().isoformat(),
              "data_last_day": frame[DAY].max().isoformat()}
    return frame, record


def library_versions() -> dict[str, str]:
    """The versions behind the numbers: this package and the libraries the scorers run on."""
    from contextlib import suppress
    from importlib.metadata import PackageNotFoundError, version
    from platform import python_version

    import pipeline

    out = {"finsentinel": pipeline.__version__, "python": python_version()}
    for name in ("polars", "numpy", "scikit-learn", "xgboost", "faiss-cpu", "faiss-gpu",
                 "faiss-gpu-cu12", "sentence-transformers"):
        with suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def run_settings(record: dict[str, Any], scorer: str, config: ProtocolConfig, n_jobs: int,
                 command: str) -> dict[str, Any]:
    """What a report's ``settings`` hold beside the test start and protocol: the data read,
    the scorer, threads, library versions and the command that makes the report again."""
    return {**record, "scorer": scorer, "folds": config.folds, "n_jobs": n_jobs,
            "versions": library_versions(), "command": command}


def evaluate_file(path: str | Path, test_start: str | date, scorer: str, output: str | Path,
                  config: ProtocolConfig | None = None, *, n_jobs: int = 1,
                  on_fold: Callable[[FoldResult], None] | None = None) -> EvaluationReport:
    """``finsentinel evaluate``: the protocol on a file, the report written as JSON."""
    from pipeline.models import make_scorer

    config = config or ProtocolConfig()
    start = parse_day(test_start)
    make_scorer(scorer, n_jobs=n_jobs)  # an unknown name fails before the data is read
    frame, record = load_featured(path, config.delay_days)
    settings = run_settings(record, scorer, config, n_jobs,
                            command_line(path, start, scorer, output, config, n_jobs=n_jobs))
    report = evaluate(frame, lambda: make_scorer(scorer, n_jobs=n_jobs,
                                                 label_delay_days=config.delay_days),
                      start, config,
                      settings=settings, on_fold=on_fold)
    write_report(report, output)
    return report


def write_report(report: EvaluationReport, output: str | Path) -> Path:
    from pipeline.artifacts import atomic_write_bytes

    # An undefined metric (AUC ROC or AP of a fold without fraud) is NaN in memory and null in
    # the file: NaN is not JSON, and strict readers refuse the whole report.
    text = json.dumps(_nan_to_none(report.to_dict()), indent=2, sort_keys=False,
                      allow_nan=False)
    return atomic_write_bytes(output, (text + "\n").encode())


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def command_line(path: str | Path, start: date, scorer: str, output: str | Path,
                 config: ProtocolConfig, *, n_jobs: int = 1) -> str:
    """The ``finsentinel evaluate`` command that makes this report again, quoted for a
    shell: every protocol option that differs from its default is named, and ``--jobs``."""
    from shlex import quote

    parts = ["finsentinel evaluate", f"--data {quote(str(path))}",
             f"--test-start {start.isoformat()}", f"--folds {config.folds}",
             f"--scorer {quote(scorer)}", f"--output {quote(str(output))}"]
    default = ProtocolConfig()
    for name in ("train_days", "delay_days", "test_days", "top_k"):
        if getattr(config, name) != getattr(default, name):
            parts.append(f"--{name.replace('_', '-')} {getattr(config, name)}")
    if n_jobs != 1:
        parts.append(f"--jobs {n_jobs}")
    return " ".join(parts)

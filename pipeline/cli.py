"""The ``finsentinel`` command line: one entry point for every job."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.sentiment.cli import sentiment_app

app = typer.Typer(help="finsentinel: fraud scoring by nearest-neighbour evidence, with an audit "
                       "ledger.", no_args_is_help=True, pretty_exceptions_enable=False)
index_app = typer.Typer(help="Build FAISS indexes of labelled history.",
                        no_args_is_help=True)
audit_app = typer.Typer(help="Audit ledger: verify, anchor, replay, export, review.",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(audit_app, name="audit")
app.add_typer(sentiment_app, name="sentiment")
dashboard_app = typer.Typer(help="The analysts' dashboard (Streamlit): start it, or make a "
                                 "password hash for $FINSENTINEL_DASHBOARD_USERS.")
app.add_typer(dashboard_app, name="dashboard")
# soft_wrap: messages stay on one line whatever the terminal width, so they can be grepped.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

DB_SCHEMES = ("sqlite", "sqlite+pysqlite", "postgresql", "postgres", "postgresql+psycopg")


def check_db_url(value: str | None) -> str | None:
    """--db (or $FINSENTINEL_DB when it is absent): a URL of a kind the ledger runs on. Only
    the scheme of a rejected URL is shown, never the rest (it may hold a password)."""
    from pipeline.ledger import DEFAULT_DB_ENV

    given = value or os.environ.get(DEFAULT_DB_ENV) or None
    if given is None:
        return value
    where = "--db" if value else f"${DEFAULT_DB_ENV}"
    expected = "expected sqlite:///PATH or postgresql://USER@HOST/DB"
    if "://" not in given:
        hint = f" (for that file: sqlite:///{Path(given).resolve()})" if given.endswith(
            (".sqlite", ".db", ".sqlite3")) else ""
        _fail(f"{where}: {expected}, got {given!r}{hint}")
    scheme = given.split("://", 1)[0].lower()
    if scheme not in DB_SCHEMES:
        _fail(f"{where}: {expected}, got a {scheme!r} URL")
    return value


def existing_ledger(db: str | None, what: str) -> str:
    """The ledger URL for a command that reads an existing ledger: a SQLite file that is not
    there, or a database without a ledger in it, is refused (opening it would create an empty
    ledger, and a typo would verify as an intact empty chain)."""
    from pipeline.audit import require_ledger
    from pipeline.ledger import LedgerError

    try:
        return require_ledger(db, what)
    except LedgerError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def check_input(path: Path | None, option: str) -> None:
    """A file to read: a directory is named as such (not as an unknown file type)."""
    if path is not None and path.is_dir():
        _fail(f"{option}: {path} is a directory; expected a file")


def check_output(path: Path, option: str, suffixes: tuple[str, ...] | None = None,
                 why: str = "") -> None:
    """A file to write, checked before any work: not a directory, an expected suffix, a
    folder that exists (created, as every command does) and can be written in."""
    import tempfile

    if path.is_dir():
        _fail(f"{option}: {path} is a directory; expected a file to write"
              + (f" ({' or '.join(suffixes)})" if suffixes else ""))
    if suffixes and path.suffix.lower() not in suffixes:
        _fail(f"{option}: {path}: expected a {' or '.join(suffixes)} file{why}, got "
              f"{path.suffix or 'no suffix'!r}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        _fail(f"{option}: cannot write in folder {folder}: it is not a folder")
    except OSError as exc:
        _fail(f"{option}: cannot write in folder {folder} ({exc.strerror or exc})")


TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")

DbOption = Annotated[str | None, typer.Option(
    "--db", callback=check_db_url,
    help="Ledger database URL (sqlite:///path or postgresql://…); default "
         "$FINSENTINEL_DB, else ledger.sqlite in $FINSENTINEL_WORKDIR "
         "(default finsentinel-work).")]
RootOption = Annotated[Path | None, typer.Option(
    "--root", help="Directory of indexes (default $FINSENTINEL_INDEXES or ./indexes).")]


def _fail(message: str, code: int = 2) -> None:
    _error(message)
    raise typer.Exit(code)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from pipeline.artifacts import ArtifactError
    from pipeline.ingest import InputError
    from pipeline.ledger import LedgerError

    return (InputError, ArtifactError, LedgerError, ValueError, FileNotFoundError)


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{option}: expected an ISO-8601 time such as 2018-07-01 or 2018-07-01T12:00, "
              f"got {value!r}")
    if parsed.tzinfo is not None:
        from datetime import UTC

        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


@app.command()
def generate(
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file to write.")],
    customers: int = typer.Option(5000, help="Number of customers (cards)."),
    terminals: int = typer.Option(10000, help="Number of terminals (merchants)."),
    days: int = typer.Option(183, help="Number of days."),
    start: str = typer.Option("2018-04-01", help="First day (YYYY-MM-DD)."),
    seed: int = typer.Option(0, help="Random seed: same seed, same file."),
) -> None:
    """Write synthetic labelled transactions (the handbook's simulation, plus merchant text)."""
    from datetime import date

    from rich.progress import Progress

    from pipeline.synthetic import SyntheticConfig, max_days, write_parquet

    for option, value in (("--customers", customers), ("--terminals", terminals),
                          ("--days", days)):
        if value < 1:
            _fail(f"{option}: expected a whole number >= 1, got {value}")
    if seed < 0:
        _fail(f"--seed: expected a whole number >= 0, got {seed}")
    try:  # a day: a time of day (2018-04-01T10:00) would be dropped without a word
        first_day = date.fromisoformat(start)
    except ValueError:
        _fail(f"--start: expected a day such as 2018-04-01, got {start!r}")
    if days > max_days(first_day):
        _fail(f"--days: {days} days from {first_day} end past {date.max}: at most "
              f"{max_days(first_day)} from that --start")
    check_output(output, "--output", (".parquet",))
    config = SyntheticConfig(n_customers=customers, n_terminals=terminals, n_days=days,
                             start_date=first_day, seed=seed)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generating days", total=days)
        rows = write_parquet(config, output,
                             progress=lambda done, total: progress.update(task, completed=done))
    out.print(f"wrote {rows:,} transactions to {output}", markup=False)


@app.command()
def features(
    input: Annotated[Path, typer.Option("--input", "-i", help="Transactions (parquet/csv/jsonl).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the features.")],
    label_delay_days: int = typer.Option(7, help="Label delay for the terminal risk."),
) -> None:
    """Compute the handbook's 14 features for every accepted transaction."""
    from pipeline.jobs import features_job, quarantine_path

    check_input(input, "--input")
    check_output(output, "--output", TABLE_SUFFIXES)
    with console.status("computing features"):
        ingested, path = features_job(input, output, label_delay_days)
    _print_counts(ingested)
    out.print(f"features of {ingested.accepted.height:,} transactions written to {path}",
              markup=False)
    if ingested.quarantined.height:
        out.print(f"quarantined rows in {quarantine_path(path)}", markup=False)


def _print_counts(ingested) -> None:
    c = ingested.counts
    console.print(f"rows in {c['rows_in']:,} = accepted {c['accepted']:,} + quarantined "
                  f"{c['quarantined']:,}")


INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
INDEX_SCORERS = ("knn", "knn-stacked")


@index_app.command("build")
def index_build(
    input: Annotated[Path, typer.Option("--input", "-i", help="Labelled history.")],
    name: Annotated[str, typer.Option("--name", help="Index name (a directory under --root).")],
    until: Annotated[str | None, typer.Option(
        "--until", help="Label cutoff: index only transactions whose label was known by then "
                        "(transaction time + label delay). Default: all.")] = None,
    root: RootOption = None,
    encoder: Annotated[str | None, typer.Option(
        help="Sentence-transformers model: local directory (default: packaged "
             "all-MiniLM-L6-v2).")] = None,
    text_dim: int = typer.Option(8, help="PCA dimension of the text embedding (0: no text)."),
    kind: str = typer.Option("auto", help="auto | flat | hnsw | ivf"),
    label_delay_days: int = typer.Option(7, help="Days until a label is known."),
    db: Annotated[str | None, typer.Option(
        "--db", callback=check_db_url,
        help="Ledger whose analyst reviews relabel the history (confirmed-fraud -> 1, "
             "false-positive -> 0, known from the review time); default $FINSENTINEL_DB; "
             "neither: no reviews applied.")] = None,
    scorer: Annotated[str, typer.Option(
        "--scorer", help="knn: the similarity-weighted neighbour vote (default); knn-stacked: "
                         "learned vector weights plus an XGBoost model over neighbour evidence "
                         "and features, stored in the index (see docs/benchmarks.md).")] = "knn",
    gpu_float16: Annotated[bool, typer.Option(
        "--gpu-float16", help="Where an exact (flat) index is searched on a GPU, hold its "
                              "vectors there in half precision: half the memory and faster "
                              "brute force, distances no longer exact. No effect on the CPU "
                              "or on approximate indexes.")] = False,
) -> None:
    """Build a FAISS index of labelled history and save it with a manifest."""
    from pipeline import jobs
    from pipeline.artifacts import ArtifactError, check_name
    from pipeline.encoder import TextEncoder
    from pipeline.index import IndexConfig
    from pipeline.ingest import read_transactions
    from pipeline.vectors import VectorConfig

    cutoff = _parse_time(until, "--until")
    # Checked before the history is read (a large file takes minutes), naming the option.
    if kind not in INDEX_KINDS:
        _fail(f"--kind: expected one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if scorer not in INDEX_SCORERS:
        _fail(f"--scorer: expected one of {', '.join(INDEX_SCORERS)}, got {scorer!r}")
    try:
        check_name(name, "--name")  # an index is one folder directly under --root
    except ArtifactError as exc:
        _fail(str(exc))
    check_input(input, "--input")
    with console.status("reading history"):
        ingested = read_transactions(input, require_labels=True)
    _print_counts(ingested)
    feedback = None
    if db or os.environ.get("FINSENTINEL_DB"):
        from pipeline.audit import feedback_labels
        from pipeline.ledger import Ledger, missing_sqlite_ledger

        missing = missing_sqlite_ledger(db)
        if missing is not None:  # not created: a typo must not make an empty ledger
            console.print(f"no ledger at {missing} yet: no analyst reviews applied",
                          markup=False)
        else:
            with Ledger(db) as ledger:
                feedback = feedback_labels(ledger)
    began = time.perf_counter()
    with console.status("building the index") as status:
        def stage(name: str) -> None:  # a line each (kept in logs), and on the spinner
            console.print(f"{time.perf_counter() - began:6.1f} s  {name}", markup=False)
            status.update(name)

        report = jobs.build_index(
            ingested, name, root=root, encoder=TextEncoder(encoder) if text_dim else None,
            until=cutoff, vector_config=VectorConfig(text_dim=text_dim),
            config=IndexConfig(kind=kind, label_delay_days=label_delay_days,
                               gpu_float16=gpu_float16), feedback=feedback,
            scorer=scorer, stage=stage)
    if feedback is not None:
        console.print(f"analyst reviews: {feedback.frame.height:,} reviewed transactions, "
                      f"{report.feedback_applied:,} history rows relabelled")
    recall = "" if report.recall_at_10 is None else f", recall@10 {report.recall_at_10:.3f}"
    out.print(f"index {report.name}@{report.version}: {report.vectors:,} vectors "
              f"({report.frauds:,} frauds, {report.faiss_index}{recall}) at {report.path}",
              markup=False)


@app.command()
def score(
    input: Annotated[Path, typer.Option("--input", "-i", help="Transactions to score.")],
    index: Annotated[str, typer.Option("--index", help="Index name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Scores file to write.")],
    batch_id: Annotated[str | None, typer.Option(
        "--batch-id", help="Batch id in the ledger (default: derived from the input rows, "
                           "so re-scoring the same rows adds nothing).")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="Alert when score >= X (default 0.5).")] = None,
    alerts_per_day: Annotated[int | None, typer.Option(
        "--alerts-per-day", help="Alert on the N highest scores of each day.")] = None,
    k: int = typer.Option(20, help="Neighbours per transaction."),
    history: Annotated[Path | None, typer.Option(
        help="Extra recent transactions for the feature windows.")] = None,
    root: RootOption = None,
    db: DbOption = None,
    partitions: Annotated[int | None, typer.Option(
        "--partitions", help="Score a large Parquet file in N time partitions (each with the "
                             "history its feature windows need) on a Dask cluster; one ledger "
                             "batch per day of the file.")] = None,
    dask_address: Annotated[str | None, typer.Option(
        "--dask-address", envvar="FINSENTINEL_DASK_ADDRESS",
        help="Dask scheduler for --partitions (tcp://host:8786); default: a local cluster.")
    ] = None,
    dask_workers: Annotated[int, typer.Option(
        "--dask-workers", help="Worker processes of the local cluster for --partitions.")] = 2,
) -> None:
    """Score transactions by nearest labelled neighbours; record every decision in the ledger."""
    from pipeline import jobs
    from pipeline.index import FraudIndex
    from pipeline.ingest import read_transactions
    from pipeline.ledger import Ledger
    from pipeline.scoring import ScoringConfig

    if threshold is not None and alerts_per_day is not None:
        _fail("give either --threshold or --alerts-per-day, not both")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        _fail(f"--threshold: expected a score in [0, 1], got {threshold}")
    if alerts_per_day is not None and alerts_per_day < 1:
        _fail(f"--alerts-per-day: expected a whole number >= 1, got {alerts_per_day}")
    if k < 1:
        _fail(f"--k: expected a whole number of neighbours >= 1, got {k}")
    check_input(input, "--input")
    check_input(history, "--history")
    check_output(output, "--output", TABLE_SUFFIXES)
    config = ScoringConfig(k=k, threshold=0.5 if threshold is None else threshold,
                           alerts_per_day=alerts_per_day)
    if partitions is not None:
        _score_partitioned(input, index, output, partitions, dask_address, dask_workers,
                           history=history, root=root, db=db, config=config, batch_id=batch_id)
        return
    with console.status(f"loading index {index}"):
        fraud_index = FraudIndex.load(index, root)
    extra = read_transactions(history).accepted if history else None
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar, Ledger(db) as ledger:
        task = bar.add_task("features", total=None)
        report = jobs.score_file(
            input, fraud_index, output, ledger=ledger, batch_id=batch_id, config=config,
            history=extra, progress=lambda stage, done, total: bar.update(
                task, description=stage, completed=done, total=total))
    _print_score_report(report)
    _ledger_kept(jobs.ledger_warning(report), report.ledger_differing)


def _score_partitioned(input: Path, index: str, output: Path, partitions: int,
                       dask_address: str | None, dask_workers: int, *, history: Path | None,
                       root: Path | None, db: str | None, config, batch_id: str | None) -> None:
    from pydantic import SecretStr

    from flows.score_dataset import score_dataset_on_dask

    if partitions < 1:
        _fail(f"--partitions: expected a whole number >= 1, got {partitions}")
    if dask_workers < 1:
        _fail(f"--dask-workers: expected a whole number >= 1, got {dask_workers}")
    if history is not None:
        _fail("--history cannot be combined with --partitions: each partition reads the "
              "history its windows need from the input itself")
    from pipeline.partitions import plan_partitions

    plan_partitions(input, partitions)  # a bad input fails here, before a cluster starts
    from pipeline import artifacts, jobs
    from pipeline.index import default_root

    artifacts.current_version(root or default_root(), index)  # and an unknown index
    report = score_dataset_on_dask(
        address=dask_address, workers=dask_workers, input=str(input), index=index,
        output=str(output), partitions=partitions, db=SecretStr(db) if db else None,
        root=str(root) if root else None, threshold=config.threshold,
        alerts_per_day=config.alerts_per_day, k=config.k, batch_id=batch_id)
    console.print(f"rows in {report.rows_in:,} = scored {report.rows_scored:,} + quarantined "
                  f"{report.rows_quarantined:,}")
    batches = [b for r in report.partitions for b in r.batch_ids]  # none for an empty file
    span = f" {batches[0]} … {batches[-1]}" if len(batches) > 1 else "".join(
        f" {b}" for b in batches)
    out.print(f"{len(report.partitions)} partitions: {report.alerts:,} alerts; ledger "
              f"+{report.ledger_added:,} records ({report.ledger_already_present:,} already "
              f"present) in {len(batches):,} daily batches{span}; scores in {report.output}",
              markup=False)
    if report.quarantine:
        out.print(f"quarantined rows in {report.quarantine}", markup=False)
    _ledger_kept(jobs.ledger_warning(report), report.ledger_differing)


def _ledger_kept(warning: str | None, differing: int) -> None:
    """Warn that the ledger already held the batch with other decisions (which the output
    file then holds too; see pipeline.reconcile): exit 1, a failed check, when decisions
    differ, so that a script cannot take the file for this run's decisions."""
    if warning is None:
        return
    from rich.markup import escape

    console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if differing:
        raise typer.Exit(1)


def _print_score_report(report) -> None:
    console.print(f"rows in {report.rows_in:,} = scored {report.rows_scored:,} + quarantined "
                  f"{report.rows_quarantined:,}")
    out.print(f"batch {report.batch_id}: {report.alerts:,} alerts; ledger +{report.ledger_added:,} "
              f"records ({report.ledger_already_present:,} already present); "
              f"scores in {report.output}", markup=False)
    if report.quarantine:
        out.print(f"quarantined rows in {report.quarantine}", markup=False)


FromOption = Annotated[str | None, typer.Option(
    "--from", help="First day (2024-05-01) or time, UTC, of records created; inclusive.")]
ToOption = Annotated[str | None, typer.Option(
    "--to", help="Last day or time, UTC, inclusive (a date covers its whole day).")]


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="Labelled transactions (parquet/csv/jsonl)."
                                       )],
    test_start: Annotated[str, typer.Option(
        "--test-start", help="First test day of the latest fold (YYYY-MM-DD); each further "
                             "fold tests one test period earlier.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON report to write.")],
    folds: Annotated[int, typer.Option("--folds", help="Number of prequential folds.")] = 4,
    scorer: Annotated[str, typer.Option(
        "--scorer", help="logreg | random-forest | xgboost | knn | knn-text | knn-weighted | "
                         "knn-stacked")] = "knn-stacked",
    train_days: Annotated[int, typer.Option("--train-days")] = 7,
    delay_days: Annotated[int, typer.Option("--delay-days")] = 7,
    test_days: Annotated[int, typer.Option("--test-days")] = 7,
    top_k: Annotated[int, typer.Option("--top-k", help="k of Card Precision@k.")] = 100,
    jobs: Annotated[int, typer.Option("--jobs", help="Threads for the models.")] = 1,
) -> None:
    """The fraud handbook's prequential evaluation: per fold train, wait out the label delay,
    test (known-compromised cards removed); AUC ROC, Average Precision, Card Precision@k."""
    from datetime import date, timedelta

    from pipeline.evaluation import ProtocolConfig, evaluate_file

    try:
        date.fromisoformat(test_start)
    except ValueError:
        _fail(f"--test-start: expected a day such as 2018-07-25, got {test_start!r}")
    for option, value in (("--folds", folds), ("--top-k", top_k), ("--train-days", train_days),
                          ("--test-days", test_days)):
        if value < 1:
            _fail(f"{option}: expected a whole number >= 1, got {value}")
    if delay_days < 0:
        _fail(f"--delay-days: expected a whole number of days >= 0, got {delay_days}")
    check_input(data, "--data")
    check_output(output, "--output", (".json",), " (the JSON report)")
    config = ProtocolConfig(train_days=train_days, delay_days=delay_days, test_days=test_days,
                            folds=folds, top_k=top_k)

    def show(fold) -> None:
        last_day = date.fromisoformat(fold.test_end) - timedelta(days=1)  # test_end: exclusive
        console.print(f"fold {fold.fold}: test {fold.test_start} to {last_day} "
                      f"AUC {fold.auc_roc:.3f} AP {fold.average_precision:.3f} "
                      f"CP@{top_k} {fold.card_precision_at_k:.3f}")

    report = evaluate_file(data, test_start, scorer, output, config, n_jobs=jobs, on_fold=show)
    left_out = [f"{report.settings[key]:,} {what}" for key, what in (
        ("rows_unlabelled", "rows without a label (they count in the features only)"),
        ("rows_quarantined", "rows quarantined as invalid")) if report.settings.get(key)]
    if left_out:
        console.print(f"not evaluated: {'; '.join(left_out)}")
    s = report.summary
    out.print(f"{report.scorer}: AUC ROC {s['auc_roc']['mean']:.3f} ± {s['auc_roc']['std']:.3f}"
              f", AP {s['average_precision']['mean']:.3f} ± "
              f"{s['average_precision']['std']:.3f}, CP@{top_k} "
              f"{s['card_precision_at_k']['mean']:.3f} ± {s['card_precision_at_k']['std']:.3f}"
              f" over {len(report.folds)} folds; report in {output}", markup=False)


@audit_app.command("verify")
def audit_verify(
    db: DbOption = None,
    from_: FromOption = None,
    to: ToOption = None,
    anchors: Annotated[list[Path] | None, typer.Option(
        "--anchors", help="Anchor file(s) written by `audit anchor` or `audit export`: the "
                          "ledger must still hold those chain heads.")] = None,
) -> None:
    """Recompute the ledger's hash chains (decisions, reviews); exit 1 and name the first bad
    record if broken. A range is checked together with the link into it."""
    from rich.markup import escape

    from pipeline.audit import time_range
    from pipeline.ledger import Ledger

    since, until = time_range(from_, to)
    expected = [a for path in anchors or [] for a in _read_anchor_file(path)]
    url = existing_ledger(db, "audit verify")
    with Ledger(url) as ledger:
        report = ledger.verify(since, until, anchors=expected)
    if report.ok:
        extra = f", {report.feedback_checked:,} reviews" if report.feedback_checked else ""
        extra += f", {len(expected):,} anchors matched" if expected else ""
        out.print(f"ledger OK: {report.checked:,} records{extra}, chain intact")
        return
    what = "review" if report.chain == "feedback" else "decision"
    out.print(f"[bold red]ledger BROKEN[/] at {escape(report.chain)} record "
              f"seq={report.first_bad_seq} ({what} {escape(str(report.first_bad_decision_id))}): "
              f"{escape(report.reason)}")
    raise typer.Exit(1)


def _read_anchor_file(path: Path) -> list:
    from pipeline.audit import read_anchors

    check_input(path, "--anchors")
    if not path.exists():
        _fail(f"--anchors: {path}: no such file")
    try:
        return read_anchors(path)
    except UnicodeDecodeError:
        _fail(f"--anchors: {path}: not an anchor file (expected the JSON written by "
              "`audit anchor` or `audit export`)")


@audit_app.command("anchor")
def audit_anchor(
    output: Annotated[Path, typer.Option("--out", "-o", help="Anchor file (JSON) to write.")],
    db: DbOption = None,
    from_: FromOption = None,
    to: ToOption = None,
) -> None:
    """Write each day's chain head (day, last seq, head hash) to a file kept outside the
    database, so that `audit verify --anchors` catches a ledger rebuilt with new hashes.
    The range is verified first, and against the anchors of an anchor file already at --out:
    exit 1, writing nothing, if it does not verify (the heads of a broken or rebuilt chain
    are no anchors, and the anchors they would replace are the evidence)."""
    from pipeline.audit import previous_anchors, time_range, write_anchors
    from pipeline.ledger import Ledger

    since, until = time_range(from_, to)
    check_output(output, "--out")
    previous = previous_anchors(output)
    with Ledger(existing_ledger(db, "audit anchor")) as ledger:
        report = ledger.verify(since, until, anchors=previous)
        if not report.ok:
            _broken(report, f"no anchors written ({output} kept)" if previous
                    else "no anchors written")
        found = ledger.anchors(since, until)
    path = write_anchors(output, found)
    out.print(f"{len(found):,} day anchors written to {path}", markup=False)


def _broken(report, consequence: str) -> None:
    """Say where the ledger breaks and what was (not) done; exit 1, a failed check."""
    from rich.markup import escape

    what = "review" if report.chain == "feedback" else "decision"
    out.print(f"[bold red]ledger BROKEN[/] at {escape(report.chain)} record "
              f"seq={report.first_bad_seq} ({what} {escape(str(report.first_bad_decision_id))}): "
              f"{escape(report.reason)}; {escape(consequence)}")
    raise typer.Exit(1)


@audit_app.command("replay")
def audit_replay(
    decision_id: Annotated[str, typer.Argument(help="Decision id (from the ledger or an "
                                                    "export).")],
    db: DbOption = None,
    root: RootOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Recompute a decision's score from its recorded inputs with the exact index version and
    encoder weights it names; exit 1 if it differs or an artefact is missing or changed."""
    from rich.markup import escape

    from pipeline.audit import replay
    from pipeline.ledger import Ledger

    url = existing_ledger(db, "audit replay")
    with console.status("replaying"), Ledger(url) as ledger:
        result = replay(ledger, decision_id, root=root)
    if as_json:
        out.print_json(json.dumps(asdict(result), default=str))
    else:
        table = Table(show_header=True, title=f"decision {escape(decision_id)}")
        for col in ("", "recorded", "replayed"):
            table.add_column(col)
        table.add_row("score", repr(result.recorded_score), repr(result.replayed_score))
        table.add_row("threshold", repr(result.recorded_threshold),
                      repr(result.replayed_threshold))
        table.add_row("decision", str(result.recorded_decision), str(result.replayed_decision))
        table.add_row("index", escape(result.index_version), "")
        table.add_row("model", escape(result.model_version), "")
        if result.replay_precision is not None:  # an index with a text part
            table.add_row("encoder precision", str(result.recorded_precision or "not recorded"),
                          result.replay_precision)
        out.print(table)
        status = "[green]REPRODUCED[/]" if result.ok else "[bold red]NOT REPRODUCED[/]"
        out.print(f"{status}: {escape(result.reason)}")
    if not result.ok:
        raise typer.Exit(1)


EXPORT_SUFFIXES = {"csv": (".csv",), "jsonl": (".jsonl",), "parquet": (".parquet",),
                   "html": (".html", ".htm")}


@audit_app.command("export")
def audit_export(
    output: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
    format: Annotated[str, typer.Option(
        "--format", "-f", help="csv | jsonl | parquet | html (a self-contained case report)")],
    from_: FromOption = None,
    to: ToOption = None,
    db: DbOption = None,
    reveal: bool = typer.Option(False, "--reveal", help="Export raw card and terminal ids "
                                                       "(default: keyed pseudonyms)."),
    batch: Annotated[str | None, typer.Option("--batch", help="Only this batch.")] = None,
    decision: Annotated[list[str] | None, typer.Option(
        "--decision", help="Only this decision (repeatable).")] = None,
    alerts_only: bool = typer.Option(False, "--alerts-only", help="Only alert decisions."),
) -> None:
    """Export decisions recorded in a range, with their latest review; card and terminal ids
    pseudonymised with $FINSENTINEL_PSEUDONYM_KEY unless --reveal. The day anchors of the range
    go beside it (OUT.anchors.json)."""
    from pipeline.audit import ExportRefused, export, time_range
    from pipeline.ledger import Ledger

    since, until = time_range(from_, to)
    suffixes = EXPORT_SUFFIXES.get(format.lower())
    check_output(output, "--out", suffixes, f" for --format {format.lower()}")
    url = existing_ledger(db, "audit export")
    try:
        with console.status("exporting"), Ledger(url) as ledger:
            report = export(ledger, output, format.lower(), since, until, reveal=reveal,
                            batch_id=batch, decision_ids=decision or None,
                            alerts_only=alerts_only)
    except ExportRefused as exc:
        _broken(exc.verified, f"the existing export {output} and its anchors were kept, "
                              "nothing was written")
    ids = "pseudonymised" if report.pseudonymised else "raw (--reveal)"
    held = (f"; {report.quarantined:,} quarantined rows in {report.quarantine_path}"
            if report.quarantine_path else "")
    out.print(f"{report.rows:,} decisions exported to {report.path} ({report.format}, ids "
              f"{ids}){held}; {report.anchors:,} day anchors in {report.anchors_path}",
              markup=False)
    if not report.verified:  # written, stating so; a failed check all the same
        from rich.markup import escape

        out.print(f"[bold red]the ledger does not verify[/]: {escape(report.verify_reason)}")
        raise typer.Exit(1)


@audit_app.command("review")
def audit_review(
    decision_id: Annotated[str, typer.Argument(help="Decision id to review.")],
    label: Annotated[str, typer.Option(
        "--label", help="confirmed-fraud | false-positive (fraud decisions); confirmed | "
                        "incorrect (other kinds, e.g. sentiment).")],
    comment: Annotated[str | None, typer.Option("--comment", help="Why.")] = None,
    reviewer: Annotated[str | None, typer.Option(
        "--reviewer", help="Who (default $FINSENTINEL_REVIEWER, else the OS user).")] = None,
    db: DbOption = None,
) -> None:
    """Record an analyst's review of a decision (append-only, hash-chained); the next index
    build with --db uses fraud reviews as labels."""
    from pipeline.audit import default_reviewer
    from pipeline.ledger import Ledger

    if reviewer is not None:
        reviewer = reviewer.strip()
        if not reviewer:
            _fail("--reviewer: expected the reviewer's name, got a blank one")
    with Ledger(existing_ledger(db, "audit review")) as ledger:
        receipt = ledger.record_feedback(decision_id, label, comment,
                                         reviewer or default_reviewer())
    out.print(f"review #{receipt.seq} recorded: {receipt.label} by {receipt.reviewer} for "
              f"{receipt.kind} decision {receipt.decision_id} (subject {receipt.subject_id})",
              markup=False)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("finsentinel-work/demo"), help="Where the demo's files go."),
    customers: int = typer.Option(1500, help="Synthetic customers."),
    terminals: int = typer.Option(3000, help="Synthetic terminals."),
    days: int = typer.Option(42, help="Days of data; the last 7 are scored."),
    seed: int = typer.Option(7, help="Random seed."),
    db: DbOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Generate data, build the index on history, score the last week through the Prefect
    flows, verify the ledger, and report."""
    from pipeline.demo import DemoConfig, run_demo

    try:  # checked before any work or any file
        config = DemoConfig(workdir=workdir, customers=customers, terminals=terminals,
                            days=days, seed=seed, db=db)
    except ValueError as exc:
        _fail(str(exc))
    report = run_demo(config, log=console.print)
    if as_json:
        out.print_json(json.dumps(asdict(report), default=str))
        return
    # Paths go below the table, whole, one a line: a table cell cuts them at the terminal's
    # width (80 columns in a log), and they are there to be copied.
    paths = ("ledger", "scores_file", "quarantine_file")
    table = Table(title="finsentinel demo", show_header=False)
    for key, value in asdict(report).items():
        if key != "top_alerts" and key not in paths:
            table.add_row(key.replace("_", " "), f"{value:.4f}" if isinstance(value, float)
                          else str(value))
    out.print(table)
    out.print(f"work folder: {config.workdir.resolve()}", markup=False)
    for key in paths:
        if getattr(report, key) is not None:
            out.print(f"{key.replace('_', ' ')}: {getattr(report, key)}", markup=False)
    if report.top_alerts:
        top = Table(title="top alerts")
        for col in report.top_alerts[0]:
            top.add_column(col)
        for row in report.top_alerts:
            top.add_row(*(str(v) for v in row.values()))
        out.print(top)


@dashboard_app.callback(invoke_without_command=True)
def dashboard(
    ctx: typer.Context,
    db: DbOption = None,
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8501,
    address: Annotated[str, typer.Option(
        "--address", help="Address to listen on (default only this machine; put a TLS proxy "
                          "in front to serve others).")] = "127.0.0.1",
    root: RootOption = None,
) -> None:
    """Start the dashboard on the ledger database. Analysts sign in with the users in
    $FINSENTINEL_DASHBOARD_USERS (name:hash pairs); with none configured it does not start."""
    if ctx.invoked_subcommand is not None:
        return
    from pipeline.dashboard.auth import Users, idle_minutes
    from pipeline.index import INDEXES_ENV
    from pipeline.ledger import DEFAULT_DB_ENV, resolve_db_url

    Users.from_env()  # no users, or a malformed entry: a clear error, and nothing starts
    idle_minutes()  # and a bad idle time-out
    if not 1 <= port <= 65535:
        _fail(f"--port: expected 1-65535, got {port}")
    env = dict(os.environ)
    # The URL (maybe with a password) goes to the app through the environment, not argv.
    env[DEFAULT_DB_ENV] = resolve_db_url(db)
    if root is not None:
        env[INDEXES_ENV] = str(root.resolve())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    app_path = Path(__file__).resolve().parent / "dashboard" / "app.py"
    argv = [sys.executable, "-m", "streamlit", "run", str(app_path),
            "--server.headless", "true", "--server.port", str(port),
            "--server.address", address, "--server.fileWatcherType", "none",
            "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
            "--client.toolbarMode", "minimal"]
    console.print(f"finsentinel dashboard on http://{address}:{port}", markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


@dashboard_app.command("hash-password")
def dashboard_hash_password(
    user: Annotated[str | None, typer.Option(
        "--user", help="Print NAME:HASH, ready for $FINSENTINEL_DASHBOARD_USERS.")] = None,
) -> None:
    """Read a password (prompted, or the first line of stdin) and print its salted scrypt
    hash; the password itself is never printed or stored."""
    from pipeline.dashboard.auth import _NAME, Users, hash_password

    if user is not None and not _NAME.match(user):  # before the password is asked for
        _fail(f"--user: expected a name of letters, digits and . _ @ - (starting with a letter "
              f"or digit, up to 64 characters), got {user!r}")
    if sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    encoded = hash_password(password)
    if user is not None:
        Users.parse(f"{user}:{encoded}")  # the name must be one the dashboard accepts
        encoded = f"{user}:{encoded}"
    out.print(encoded, markup=False, highlight=False)


@app.command()
def serve(
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Serve only this deployment (repeatable); default: all of them.")] = None,
) -> None:
    """Run the scheduled deployments (score hourly, build index daily, classify news every 15
    minutes, export audit monthly, evaluate weekly) on this machine until stopped; the same
    deployments as prefect.yaml. Set PREFECT_API_URL to register them with a Prefect server."""
    from prefect import serve as prefect_serve

    from flows.deployments import build_deployments, select
    from pipeline.artifacts import keep_versions
    from pipeline.inbox import settle_interval

    chosen = select(only)
    # The runs read these when they start: a bad value is refused now, not by every run.
    check_db_url(None)
    settle_interval()
    keep_versions()
    table = Table(title="finsentinel schedules (UTC)")
    for col in ("deployment", "cron", "flow"):
        table.add_column(col)
    for spec in chosen:
        table.add_row(spec.name, spec.cron, spec.entrypoint)
    out.print(table)
    prefect_serve(*build_deployments([s.name for s in chosen]))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sqlalchemy.exc import SQLAlchemyError

    try:
        app()
    except _expected_errors() as exc:
        _error(str(exc))
        sys.exit(2)
    except SQLAlchemyError as exc:  # an unreachable or refusing database: say so, no traceback
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        _error(f"ledger database error ({type(exc).__name__}): {reason}")
        sys.exit(2)
    except OSError as exc:  # unreadable input, unwritable output, full disk
        _error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        sys.exit(2)


def _error(message: str) -> None:
    """Print an error for the user: markup in it is shown as text, and no secret is shown."""
    from rich.markup import escape

    from pipeline.ledger import DEFAULT_DB_ENV
    from pipeline.privacy import redact, url_password

    secrets = [url_password(os.environ.get(DEFAULT_DB_ENV)), os.environ.get("PGPASSWORD")]
    # A URL given as `--db URL` or `--db=URL` (whose query may hold `password=` itself).
    secrets += [url_password(form) for arg in sys.argv if "://" in arg
                for form in (arg, arg.split("=", 1)[-1])]
    console.print(f"[bold red]error:[/] {escape(redact(message, secrets))}")


if __name__ == "__main__":
    main()

"""``finsentinel sentiment train | classify | evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

sentiment_app = typer.Typer(help="News sentiment: train, classify (to the ledger and the "
                                 "per-ticker daily table), evaluate.", no_args_is_help=True)
# soft_wrap: messages stay on one line whatever the terminal width, as in pipeline.cli.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _check_db_url(value: str | None) -> str | None:
    from pipeline.cli import check_db_url

    return check_db_url(value)


DbOption = Annotated[str | None, typer.Option(
    "--db", callback=_check_db_url,
    help="Ledger database URL (sqlite:///path or postgresql://…); default "
         "$FINSENTINEL_DB, else ledger.sqlite in $FINSENTINEL_WORKDIR "
         "(default finsentinel-work).")]
ModelsRoot = Annotated[Path | None, typer.Option(
    "--root", help="Directory of models for --model NAME (default $FINSENTINEL_MODELS or "
                   "./models).")]
Backend = Annotated[str, typer.Option(help="encoder (a trained model name or directory) | hf "
                                           "(a local Hugging Face checkpoint directory) | llm "
                                           "(a local causal-LM directory, or a model name with "
                                           "--endpoint)")]
Endpoint = Annotated[str | None, typer.Option(
    help="OpenAI-compatible server URL for --backend llm (e.g. http://127.0.0.1:8000/v1).")]
LabelMap = Annotated[str | None, typer.Option(
    "--label-map", help="RAW=LABEL pairs, e.g. 0=negative,1=positive,2=neutral.")]
Format = Annotated[str, typer.Option(
    "--format", help="auto | phrasebank (sentence@label) | twitter (text,label with 0 bearish, "
                     "1 bullish, 2 neutral) | csv (text,label)")]
Lines = Annotated[Path | None, typer.Option(
    "--lines", help="PhraseBank only: file of 0-based line numbers to use (a split).")]


def _check_choices(backend: str | None = None, format: str | None = None) -> None:
    """--backend and --format, refused by their option names before any work."""
    from pipeline.cli import _fail
    from pipeline.sentiment.backends import BACKENDS
    from pipeline.sentiment.data import FORMATS

    for option, value, allowed in (("--backend", backend, BACKENDS),
                                   ("--format", format, FORMATS)):
        if value is not None and value not in allowed:
            _fail(f"{option}: expected one of {', '.join(allowed)}, got {value!r}")


def _check_model_output(output: Path) -> None:
    """``sentiment train --output models/NAME``, checked before the data is read and the
    model trained (minutes): a plain name, in a folder that is one or can be made one, and a
    version-keeping setting that publishing will accept."""
    import os

    from pipeline.artifacts import ArtifactError, check_name, keep_versions
    from pipeline.cli import _fail

    try:
        check_name(output.name, "--output: model name")
        keep_versions()
    except ArtifactError as exc:
        _fail(str(exc))
    for folder in (output, *output.parents):
        if folder.exists():
            if not folder.is_dir():
                _fail(f"--output: {output}: {folder} is a file, not a folder (--output is "
                      "models/NAME, a folder of model versions)")
            if not os.access(folder, os.W_OK | os.X_OK):
                _fail(f"--output: cannot write in folder {folder}")
            return


def _load(backend: str, model: str, root: Path | None, endpoint: str | None,
          label_map: str | None, quantize: bool = False):
    from pipeline.sentiment.backends import load_classifier
    from pipeline.sentiment.data import parse_label_map

    kwargs = {"quantize": True} if quantize and backend == "encoder" else {}
    return load_classifier(backend, model, root=root, endpoint=endpoint,
                           label_map=parse_label_map(label_map) if backend == "hf" else None,
                           **kwargs)


@sentiment_app.command("train")
def train(
    data: Annotated[Path, typer.Option("--data", help="Labelled texts: PhraseBank file, the "
                                                      "Twitter CSV, or any text,label CSV.")],
    output: Annotated[Path, typer.Option("--output", help="models/NAME: published as a new "
                                                          "version of model NAME.")],
    format: Format = "auto",
    label_map: LabelMap = None,
    lines: Lines = None,
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", help="Held-out labelled texts: metrics go into the model card.")] = None,
    eval_lines: Annotated[Path | None, typer.Option(
        "--eval-lines", help="PhraseBank line numbers for --eval-data.")] = None,
    epochs: int = typer.Option(3, help="Passes over the training data."),
    learning_rate: float = typer.Option(1.5e-4, "--learning-rate",
                                         help="Top encoder layer's learning rate."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_length: int = typer.Option(64, "--max-length", help="Tokens per text (truncated)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction",
                                       help="Stratified validation share (best epoch, "
                                            "calibration)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(2, help="CPU threads for torch."),
) -> None:
    """Fine-tune the packaged MiniLM encoder as a 3-way classifier and publish it."""
    from pipeline.cli import check_input
    from pipeline.sentiment.data import load_labelled
    from pipeline.sentiment.train import TrainConfig, evaluate_trained, train_classifier

    _check_choices(format=format)
    check_input(data, "--data")
    check_input(eval_data, "--eval-data")
    _check_model_output(output)
    labelled = load_labelled(data, format=format, label_map=label_map, lines=lines)
    console.print(f"{len(labelled):,} labelled texts from {data}: {labelled.counts()}",
                  markup=False)
    config = TrainConfig(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                         max_length=max_length, val_fraction=val_fraction, seed=seed,
                         threads=threads)

    def epoch_done(message: str) -> None:  # kept on screen and in logs, not only a spinner
        record = json.loads(message)
        accuracy = (f", validation accuracy {record['val_accuracy']:.4f}"
                    if "val_accuracy" in record else "")
        console.print(f"epoch {record['epoch']}/{epochs}: train loss "
                      f"{record['train_loss']:.4f}{accuracy} ({record['seconds']:.0f} s)",
                      markup=False)

    console.print(f"fine-tuning for {epochs} epochs (a line as each ends) …", markup=False)
    with console.status("fine-tuning"):
        trained = train_classifier(labelled, config, progress=epoch_done)
    extra = {}
    if eval_data is not None:
        held = load_labelled(eval_data, format=format,
                             label_map=label_map or labelled.label_map, lines=eval_lines)
        extra["test_metrics"] = evaluate_trained(trained, held)
    version, directory = trained.publish(output, extra)
    val = trained.validation
    out.print(f"model {output.name}@{version} in {directory} ({trained.seconds:.0f} s); "
              f"validation accuracy {val.get('accuracy', float('nan')):.4f}, temperature "
              f"{trained.head.temperature:.3f}", markup=False)
    if "test_metrics" in extra:
        m = extra["test_metrics"]
        out.print(f"held-out: accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}, "
                  f"weighted F1 {m['weighted_f1']:.4f} on {m['n']:,} texts")


@sentiment_app.command("classify")
def classify(
    input: Annotated[Path, typer.Option("--input", "-i", help="News items (jsonl/csv/parquet).")],
    model: Annotated[str, typer.Option("--model", help="Model name or directory (see "
                                                       "--backend).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Results file to write.")],
    backend: Backend = "encoder",
    endpoint: Endpoint = None,
    label_map: LabelMap = None,
    companies: Annotated[Path | None, typer.Option(
        help="JSON map of company names to tickers, added to the built-in one.")] = None,
    batch_id: Annotated[str | None, typer.Option(
        "--batch-id", help="Batch id in the ledger (default: derived from the input rows and "
                           "the model, so re-classifying the same rows adds nothing).")
    ] = None,
    quantize: bool = typer.Option(False, help="encoder: int8 dynamic quantisation on CPU."),
    root: ModelsRoot = None,
    db: DbOption = None,
) -> None:
    """Label news items; every classification to the ledger, per-ticker days to the database."""
    from rich.markup import escape

    from pipeline.cli import TABLE_SUFFIXES, check_input, check_output
    from pipeline.ledger import Ledger
    from pipeline.news_store import NewsStore
    from pipeline.sentiment.jobs import classify_file, ledger_warning
    from pipeline.tickers import TickerExtractor

    _check_choices(backend=backend)
    check_input(input, "--input")
    check_output(output, "--output", TABLE_SUFFIXES)
    extractor = TickerExtractor.from_file(companies)
    with console.status(f"loading {escape(backend)} model {escape(model)}"):
        classifier = _load(backend, model, root, endpoint, label_map, quantize)
    from rich.progress import Progress

    with (Progress(console=console, transient=True) as bar, Ledger(db) as ledger,
          NewsStore(ledger.url) as store):
        task = bar.add_task("classifying articles", total=None)
        report = classify_file(input, classifier, output, ledger=ledger, store=store,
                               batch_id=batch_id, extractor=extractor,
                               progress=lambda done, total: bar.update(
                                   task, completed=done, total=total))
    console.print(f"rows in {report.rows_in:,} = classified {report.rows_classified:,} + "
                  f"quarantined {report.rows_quarantined:,}")
    out.print(f"batch {report.batch_id} ({report.model_id}): {report.labels}, "
              f"{report.failures} failures; ledger +{report.ledger_added:,} "
              f"({report.ledger_already_present:,} already present); {report.daily_rows} "
              f"ticker-days updated; results in {report.output}", markup=False)
    if report.quarantine:
        out.print(f"quarantined rows in {report.quarantine}", markup=False)
    if report.per_ticker:
        table = Table(title="tickers in this batch")
        for col in report.per_ticker[0]:
            table.add_column(col)
        for row in report.per_ticker:
            table.add_row(*(escape(str(v)) for v in row.values()))
        out.print(table)
    from pipeline.cli import _ledger_kept

    _ledger_kept(ledger_warning(report), report.ledger_differing)


@sentiment_app.command("evaluate")
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="Labelled texts (as for train).")],
    model: Annotated[str, typer.Option("--model", help="Model name or directory.")],
    output: Annotated[Path, typer.Option("--output", help="Metrics JSON to write.")],
    backend: Backend = "encoder",
    endpoint: Endpoint = None,
    format: Format = "auto",
    label_map: LabelMap = None,
    model_label_map: Annotated[str | None, typer.Option(
        "--model-label-map", help="hf: the checkpoint's output names, e.g. LABEL_0=negative,"
                                  "LABEL_1=neutral,LABEL_2=positive (default: --label-map)")
    ] = None,
    lines: Lines = None,
    quantize: bool = typer.Option(False, help="encoder: int8 dynamic quantisation on CPU."),
    root: ModelsRoot = None,
) -> None:
    """Accuracy, macro and weighted F1 and the confusion matrix on labelled data. Numeric
    labels are read with --label-map, else with the map the model was trained with; an hf
    checkpoint's outputs with --model-label-map where its names say nothing."""
    from pipeline.cli import check_input, check_output
    from pipeline.sentiment.data import load_labelled
    from pipeline.sentiment.jobs import evaluate as run_evaluation
    from pipeline.sentiment.jobs import write_json

    _check_choices(backend=backend, format=format)
    check_input(data, "--data")
    check_output(output, "--output", (".json",), " (the metrics report)")
    classifier = _load(backend, model, root, endpoint,
                       None if backend != "hf" else model_label_map or label_map, quantize)
    trained_map = (getattr(classifier, "manifest", None) or {}).get("data", {}).get("label_map")
    labelled = load_labelled(data, format=format, label_map=label_map or trained_map,
                             lines=lines)
    with console.status(f"evaluating on {len(labelled):,} texts"):
        report = run_evaluation(classifier, labelled)
    write_json(report, output)
    out.print(f"{classifier.model_id} on {data} ({report['n']:,} texts): accuracy "
              f"{report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}, weighted F1 "
              f"{report['weighted_f1']:.4f}; {report['failures']} failures; written to {output}",
              markup=False)
    out.print(json.dumps(report["confusion_matrix"]), markup=False)

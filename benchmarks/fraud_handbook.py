"""Fraud-detection quality on the fraud handbook's data with the handbook's own protocol:
the baselines re-run with this code next to the published numbers, and the kNN ablation.

    python -m benchmarks.fraud_handbook [--data FILE] [--test-start DAY] [--folds 4] [--jobs 2]
                                        [--scorers a,b,...]

The test start defaults to the last full test week of the data (its last day minus 6 days), so
the folds sit in the data's last weeks; nothing here depends on particular dates. Writes its
section of docs/benchmarks.md (between the fraud-handbook markers; other sections are left as
they are) and every fold's numbers to docs/benchmarks-fraud-handbook.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline.evaluation import (
    EvaluationReport,
    ProtocolConfig,
    evaluate,
    fold_metrics,
    load_featured,
    prequential_splits,
)
from pipeline.models import KnnStacked, make_scorer
from pipeline.stacking import StackingConfig

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "fraud-handbook" / "raw-2018-04-01_2018-07-31.parquet"
DOC = REPO / "docs" / "benchmarks.md"
RAW = REPO / "docs" / "benchmarks-fraud-handbook.json"
START, END = "<!-- fraud-handbook:start -->", "<!-- fraud-handbook:end -->"

# Handbook §5.3, prequential 4-fold test on the full set: AUC ROC, AP, CP@100.
PUBLISHED = {"logreg": (0.868, 0.623, 0.297), "random-forest": (0.870, 0.678, 0.299),
             "xgboost": (0.869, 0.687, 0.303), "knn": (0.80, 0.58, 0.28)}
TARGETS = {"auc_roc": 0.875, "average_precision": 0.70, "card_precision_at_k": 0.31}
CONTROL = "evidence-xgboost"
ORDER = ("logreg", "random-forest", "xgboost", "knn", "knn-text", "knn-weighted", CONTROL,
         "knn-stacked")
LABELS = {
    "logreg": "logistic regression (C=0.1)",
    "random-forest": "random forest (100 trees, depth 20)",
    "xgboost": "XGBoost (100 trees, depth 3, lr 0.1, exact, base_score 0.5)",
    "knn": "numeric-only kNN (pipeline score, k=20, training week indexed)",
    "knn-text": "+ text embedding",
    "knn-weighted": "+ learned weights and amount ratios",
    CONTROL: "control: XGBoost on features + ratios + terminal neighbours, no kNN inputs",
    "knn-stacked": "+ stacking (XGBoost over kNN statistics at k=5/20/50, terminal "
                   "neighbours, features)",
}


def factory(name: str, jobs: int):
    if name == CONTROL:
        return lambda: KnnStacked(CONTROL, StackingConfig(use_knn=False), n_jobs=jobs)
    return lambda: make_scorer(name, n_jobs=jobs)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 1) for x in os.getloadavg()], "commit": commit,
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def fmt(summary: dict, metric: str) -> str:
    return f"{summary[metric]['mean']:.3f} ± {summary[metric]['std']:.3f}"


def section(reports: dict[str, EvaluationReport], record: dict, env: dict, args, config,
            oracle: float | None = None, reachable: float | None = None) -> str:
    start = reports[next(iter(reports))].settings["test_start"]
    folds = reports[next(iter(reports))].folds
    first_test = min(f.test_start for f in folds)
    first_train = min(f.train_start for f in folds)
    lines = [
        START,
        "## Fraud detection: the handbook's protocol (fraud-handbook data)",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores, Python {env['python']}; load average at "
        f"start {', '.join(map(str, env['load_average_at_start']))} (the cores were shared "
        f"with other jobs, so run times are pessimistic). Date {env['date']}, commit "
        f"{env['commit']}. Command: `python -m benchmarks.fraud_handbook --folds {config.folds}"
        f" --jobs {args.jobs}` (= `finsentinel evaluate --data {Path(record['data']).name} "
        f"--test-start {start} --folds {config.folds} --scorer NAME` per row).",
        "",
        f"Data: `{Path(record['data']).name}` ({record['rows_accepted']:,} transactions, "
        f"{record['data_first_day']} to {record['data_last_day']}, sha256 "
        f"{record['data_sha256'][:12]}…). Protocol (handbook ch. 5.2–5.3): train "
        f"{config.train_days} days, label delay {config.delay_days} days, test "
        f"{config.test_days} days; {config.folds} folds, the latest testing from {start}, each "
        f"earlier one a week before (test weeks {first_test} … {folds[0].test_end} exclusive, "
        f"training from {first_train}); cards known compromised (a fraud from the training "
        "start up to the test day minus the delay) removed from each test day; metrics per fold "
        f"AUC ROC, Average Precision, Card Precision@{config.top_k} (per day: max score and "
        "label per card, top cards, cards caught earlier removed), then mean ± standard "
        "deviation over folds. Run time: fit + score per fold, mean.",
        "",
        "### Baselines re-run against the published numbers",
        "",
        "| model | AUC ROC | AP | CP@100 | published (full set, Aug–Sep test weeks) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in ("logreg", "random-forest", "xgboost", "knn"):
        if name in reports:
            s = reports[name].summary
            pub = PUBLISHED[name]
            lines.append(f"| {name} | {fmt(s, 'auc_roc')} | {fmt(s, 'average_precision')} | "
                         f"{fmt(s, 'card_precision_at_k')} | {pub[0]:.3f} / {pub[1]:.3f} / "
                         f"{pub[2]:.3f} |")
    gaps = {m: max(abs(reports[n].summary[m]["mean"] - PUBLISHED[n][i])
                   for n in ("logreg", "random-forest", "xgboost") if n in reports)
            for i, m in enumerate(("auc_roc", "average_precision", "card_precision_at_k"))
            if any(n in reports for n in ("logreg", "random-forest", "xgboost"))}
    if gaps:
        lines += ["", "Largest gap to the published numbers over the three baselines: AUC "
                  f"{gaps['auc_roc']:.3f}, AP {gaps['average_precision']:.3f}, CP@100 "
                  f"{gaps['card_precision_at_k']:.3f}. The published test weeks (August to early "
                  "September) are not in the four-month file, so these folds are other weeks of "
                  "the same simulation. Hyper-parameters are fixed values from the handbook's "
                  "grids, not re-selected here."]
    lines += [
        "",
        "### kNN ablation",
        "",
        "| scorer | what it adds | AUC ROC | AP | CP@100 | run time per fold |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ORDER:
        if name in reports and name not in ("logreg", "random-forest"):
            s = reports[name].summary
            lines.append(f"| `{name}` | {LABELS[name]} | {fmt(s, 'auc_roc')} | "
                         f"{fmt(s, 'average_precision')} | {fmt(s, 'card_precision_at_k')} | "
                         f"{s['seconds']['mean']:.0f} s |")
    lines += ["", *target_lines(reports), ""]
    if oracle is not None:
        lines += [f"Card Precision@{config.top_k} of a perfect ranking (the labels as scores) on "
                  f"these folds: {oracle:.3f}. Frauds at a terminal compromised within the last "
                  f"{config.delay_days} days carry no known label yet, so part of that is out "
                  "of reach of any scorer here.", ""]
    if reachable is not None:
        lines += [f"Card Precision@{config.top_k} of a scorer that finds exactly the frauds "
                  "that known labels could reveal (every amount and leaked-card fraud; a "
                  "compromised-terminal fraud only once an earlier fraud of the same compromise "
                  f"is {config.delay_days} days old, so its label is known): {reachable:.3f}. "
                  "This is an estimate of the ceiling under the label delay (a scorer can still "
                  "catch a few younger ones by chance); `python -m benchmarks.fraud_handbook "
                  "--render-only` recomputes it from the data's fraud scenario column.", ""]
    lines += [*findings(reports), *NOTES, END]
    return "\n".join(lines)


def findings(reports: dict) -> list[str]:
    """What the ablation says, computed from the numbers (nothing here is typed in)."""
    if not {"knn", "knn-weighted", CONTROL, "knn-stacked", "xgboost"} <= set(reports):
        return []

    def ap(name: str) -> float:
        return reports[name].summary["average_precision"]["mean"]

    def auc(name: str) -> float:
        return reports[name].summary["auc_roc"]["mean"]

    knn_inputs = ap("knn-stacked") - ap(CONTROL)
    if knn_inputs > 0.005:
        verdict = ("they add to the terminal neighbours and amount ratios, which carry the rest "
                   "of the gain")
    else:
        verdict = ("so the gain comes from the terminal neighbours (the terminal's recent "
                   "labelled transactions) and the amount ratios, not from the distance-based "
                   "votes, which a booster over the same features already captures")
    return [
        "Findings:",
        "",
        f"- Learned weights and the amount ratios lift the plain kNN vote from AP "
        f"{ap('knn'):.3f} to {ap('knn-weighted'):.3f} (AUC {auc('knn'):.3f} to "
        f"{auc('knn-weighted'):.3f}): what the neighbours see matters more than how they vote.",
        f"- The stacked model beats XGBoost by {ap('knn-stacked') - ap('xgboost'):+.3f} AP and "
        f"{auc('knn-stacked') - auc('xgboost'):+.3f} AUC. The feature-space kNN statistics "
        f"change AP by {knn_inputs:+.3f} against the control without them: {verdict}.",
        "",
    ]


def target_lines(reports: dict[str, EvaluationReport]) -> list[str]:
    if "knn-stacked" not in reports or "xgboost" not in reports:
        return ["Targets: not checked (knn-stacked and xgboost were not both run)."]
    best, base = reports["knn-stacked"].summary, reports["xgboost"].summary
    parts = []
    for metric, target in TARGETS.items():
        value, ref = best[metric]["mean"], base[metric]["mean"]
        met = value >= target and value > ref
        parts.append(f"{metric} {value:.3f} (target ≥ {target}, XGBoost {ref:.3f}): "
                     f"{'met' if met else 'NOT met'}")
    return ["Targets for `knn-stacked` (mean over folds, and above XGBoost in the same run): "
            + "; ".join(parts) + "."]


NOTES = [
    "Notes:",
    "",
    "- The handbook data has no descriptive text (merchant name, category, channel), so "
    "`knn-text` has nothing to embed and equals `knn` here; the text part is exercised on the "
    "project's synthetic data (tests/test_models.py).",
    "- Learned weights: each vector feature is weighted by the square root of its share of a "
    "shallow XGBoost's split gain on the training week; the vector adds log(amount / the "
    "card's mean amount) over 1, 7 and 30 days.",
    "- Evidence and time: the models are fitted on the training week only. Terminal neighbours "
    "(the terminal's last labelled transactions, with how long ago its last fraud and its "
    "current run of frauds were) use a label only from its transaction time + 7 days on — "
    "the same rule as the handbook's TERMINAL_ID_RISK features, which every baseline uses. "
    "Feature-space neighbours are the training week's transactions from other cards and "
    "terminals.",
    "- The control row is the stacked model without the feature-space kNN inputs: the "
    "difference between it and `knn-stacked` is what the kNN statistics add to the booster; "
    "the difference between it and `xgboost` is what the ratios and terminal neighbours add.",
    "- Design choices (vector, neighbour statistics, booster capacity) were made on earlier "
    "folds (test weeks four weeks before these), never on these test weeks.",
]


def perfect_card_precision(frame, start: date, config: ProtocolConfig) -> float:
    """Mean CP@k over the folds when the labels themselves are the scores."""
    values = []
    for split in prequential_splits(frame, start, config):
        labels = split.test["is_fraud"].to_numpy().astype(float)
        values.append(fold_metrics(split.test, labels, config.top_k)["card_precision_at_k"])
    return sum(values) / len(values)


def label_reachable(frame, delay_days: int):
    """Per row: whether a fraud is one that labels known in time could reveal. A compromised-
    terminal fraud (scenario 2) is reachable only once an earlier fraud of the same compromise
    episode (frauds on the terminal with no gap over 10 days) has its label known, i.e. at
    least ``delay_days`` after it. Other frauds are reachable (amount, card history)."""
    import polars as pl

    fraud2 = (pl.col("fraud_scenario") == 2) & (pl.col("is_fraud") == 1)
    episodes = (
        frame.filter(fraud2).select("terminal_id", "tx_time").sort("terminal_id", "tx_time")
        .with_columns(((pl.col("tx_time").diff().over("terminal_id")
                        > timedelta(days=10)).fill_null(True))
                      .cum_sum().over("terminal_id").alias("_episode"))
        .with_columns(pl.col("tx_time").min().over("terminal_id", "_episode").alias("_start"))
        .unique(["terminal_id", "tx_time"], keep="first")
    )
    joined = frame.join(episodes, on=["terminal_id", "tx_time"], how="left",
                        maintain_order="left")
    return joined.select(
        (pl.col("is_fraud") == 1)
        & (~fraud2 | (pl.col("_start") + timedelta(days=delay_days) <= pl.col("tx_time")))
    ).to_series().to_numpy()


def reachable_card_precision(frame, start: date, config: ProtocolConfig) -> float | None:
    """Mean CP@k over the folds of a scorer that finds exactly the frauds that known labels
    could reveal (``label_reachable``): an estimate of the ceiling under the label delay.
    None when the data has no fraud scenario column."""
    if "fraud_scenario" not in frame.columns:
        return None
    import polars as pl

    # Episodes start before the test weeks: mark rows on the whole data, then split.
    frame = frame.with_columns(pl.Series("_reachable", label_reachable(frame, config.delay_days)))
    values = []
    for split in prequential_splits(frame, start, config):
        reachable = split.test["_reachable"].to_numpy().astype(float)
        values.append(fold_metrics(split.test, reachable, config.top_k)["card_precision_at_k"])
    return sum(values) / len(values)


class _Saved:
    """A report read back from the JSON file, with what section() needs."""

    def __init__(self, data: dict):
        self.summary, self.settings = data["summary"], data["settings"]
        self.folds = [SimpleNamespace(**f) for f in data["folds"]]


def write_section(text: str) -> None:
    current = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if START in current and END in current:
        head, rest = current.split(START, 1)
        _, tail = rest.split(END, 1)
        updated = head + text + tail
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    DOC.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--test-start", help="default: the data's last day minus 6 days")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scorers", default=",".join(ORDER))
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the docs section from docs/benchmarks-fraud-handbook.json")
    args = parser.parse_args()
    config = ProtocolConfig(folds=args.folds)
    env = machine()
    frame, record = load_featured(args.data, config.delay_days)
    last = date.fromisoformat(record["data_last_day"])
    start = (date.fromisoformat(args.test_start) if args.test_start
             else last - timedelta(days=config.test_days - 1))
    oracle = perfect_card_precision(frame, start, config)
    reachable = reachable_card_precision(frame, start, config)
    print(f"CP@{config.top_k}: perfect ranking {oracle:.3f}, reachable under the label delay "
          f"{reachable if reachable is None else round(reachable, 3)}", flush=True)
    if args.render_only:  # rewrite the section from the last run's numbers
        saved = json.loads(RAW.read_text())
        reports = {k: _Saved(v) for k, v in saved["reports"].items()}
        write_section(section(reports, record, saved["machine"], args, config, oracle,
                              reachable))
        print(f"rewrote {DOC} from {RAW}")
        return
    reports: dict[str, EvaluationReport] = {}
    for name in args.scorers.split(","):
        began = time.perf_counter()
        report = evaluate(frame, factory(name, args.jobs), start, config,
                          settings={**record, "scorer": name})
        reports[name] = report
        s = report.summary
        print(f"{name:18s} AUC {fmt(s, 'auc_roc')}  AP {fmt(s, 'average_precision')}  "
              f"CP@100 {fmt(s, 'card_precision_at_k')}  {time.perf_counter() - began:.0f} s",
              flush=True)
        RAW.write_text(json.dumps({"machine": env, "reports": {
            k: v.to_dict() for k, v in reports.items()}}, indent=2) + "\n")
    write_section(section(reports, record, env, args, config, oracle, reachable))
    print(f"wrote {DOC} and {RAW}")


if __name__ == "__main__":
    main()

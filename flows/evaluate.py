"""Prefect flow: the handbook's prequential evaluation of one scorer, fold by fold as tasks, with
the same library code as ``finsentinel evaluate``."""

from __future__ import annotations

import time
from dataclasses import asdict

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from pipeline.evaluation import (
    EvaluationReport,
    FoldResult,
    FoldSplit,
    ProtocolConfig,
    command_line,
    evaluate_fold,
    labelled_history,
    load_featured,
    parse_day,
    prequential_splits,
    summarise,
    write_report,
)
from pipeline.models import make_scorer


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def load(data: str, delay_days: int):
    return load_featured(data, delay_days)


@task(cache_policy=NO_CACHE)
def run_fold(split: FoldSplit, history, scorer: str, config: ProtocolConfig, n_jobs: int
             ) -> FoldResult:
    return evaluate_fold(split, make_scorer(scorer, n_jobs=n_jobs), config, history)


@flow(name="evaluate_fraud_scorer", log_prints=True)
def evaluate_scorer(data: str, test_start: str, output: str, scorer: str = "knn-stacked",
                    folds: int = 4, n_jobs: int = 1) -> dict:
    """Evaluate ``scorer`` on ``data`` with folds testing from ``test_start`` backwards; write
    the JSON report to ``output`` and return it."""
    started = time.perf_counter()
    config = ProtocolConfig(folds=folds)
    start = parse_day(test_start)
    make_scorer(scorer, n_jobs=n_jobs)  # an unknown name fails before the data is read
    frame, record = load(data, config.delay_days)
    splits = prequential_splits(frame, start, config)
    results = []
    for split in splits:
        result = run_fold(quote(split), quote(labelled_history(frame, split, config)), scorer,
                          config, n_jobs)
        print(f"fold {result.fold}: AUC {result.auc_roc:.3f} AP {result.average_precision:.3f} "
              f"CP@{config.top_k} {result.card_precision_at_k:.3f}")
        results.append(result)
    report = EvaluationReport(
        scorer=scorer,
        settings={"test_start": start.isoformat(), "protocol": asdict(config), **record,
                  "scorer": scorer, "folds": folds, "n_jobs": n_jobs,
                  "command": command_line(data, start, scorer, output, config)},
        folds=results, summary=summarise(results), wall_seconds=time.perf_counter() - started)
    write_report(report, output)
    create_table_artifact(
        key="fraud-evaluation",
        table=[{"metric": name, "mean": round(v["mean"], 4), "std": round(v["std"], 4)}
               for name, v in report.summary.items()],
        description=f"{scorer} on {data}, test start {start}, {folds} folds",
    )
    return report.to_dict()

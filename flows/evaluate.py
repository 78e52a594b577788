"""Prefect flow: the handbook's prequential evaluation of one scorer, fold by fold as tasks, with
the same library code as ``finsentinel evaluate``."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import date, timedelta

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.score_transactions import readable_retry
from pipeline.evaluation import (
    DAY,
    EvaluationReport,
    FoldResult,
    FoldSplit,
    ProtocolConfig,
    check_split,
    command_line,
    evaluate_fold,
    labelled_history,
    load_featured,
    parse_day,
    prequential_splits,
    run_settings,
    summarise,
    write_report,
)
from pipeline.models import make_scorer
from pipeline.settings import JobSettings


def latest_test_start(frame, config: ProtocolConfig) -> date:
    """The first day of the data's last ``test_days`` days: the newest fold a week's data allows."""
    return frame[DAY].max() - timedelta(days=config.test_days - 1)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=readable_retry, cache_policy=NO_CACHE)
def load(data: str, delay_days: int):
    return load_featured(data, delay_days)


@task(cache_policy=NO_CACHE)
def run_fold(split: FoldSplit, history, scorer: str, config: ProtocolConfig, n_jobs: int
             ) -> FoldResult:
    return evaluate_fold(split, make_scorer(scorer, n_jobs=n_jobs,
                                            label_delay_days=config.delay_days),
                         config, history)


@flow(name="evaluate_fraud_scorer", log_prints=True)
def evaluate_scorer(data: str | None = None, test_start: str | None = None,
                    output: str | None = None, scorer: str = "knn-stacked", folds: int = 4,
                    n_jobs: int = 1) -> dict:
    """Evaluate ``scorer`` on ``data`` with folds testing from ``test_start`` backwards; write
    the JSON report to ``output`` and return it. Scheduled (weekly) runs leave them out:
    ``data`` is ``$FINSENTINEL_HISTORY``, the latest fold tests the data's last
    ``test_days`` days, and the report goes to ``$FINSENTINEL_EVALUATIONS`` (where the
    dashboard reads reports) as ``<scorer>-<test start>.json``."""
    started = time.perf_counter()
    config = ProtocolConfig(folds=folds)
    settings = JobSettings.from_env()
    data = data or str(settings.history)
    start = parse_day(test_start) if test_start else None
    make_scorer(scorer, n_jobs=n_jobs)  # an unknown name fails before the data is read
    frame, record = load(data, config.delay_days)
    if start is None:
        start = latest_test_start(frame, config)
    output = output or str(settings.evaluations / f"{scorer}-{start.isoformat()}.json")
    splits = prequential_splits(frame, start, config)
    for split in splits:  # every fold can be trained and tested, before fitting any
        check_split(split)
    results = []
    for split in splits:
        result = run_fold(quote(split), quote(labelled_history(frame, split, config)), scorer,
                          config, n_jobs)
        print(f"fold {result.fold}: AUC {result.auc_roc:.3f} AP {result.average_precision:.3f} "
              f"CP@{config.top_k} {result.card_precision_at_k:.3f}")
        results.append(result)
    report = EvaluationReport(
        scorer=scorer,
        settings={"test_start": start.isoformat(), "protocol": asdict(config),
                  **run_settings(record, scorer, config, n_jobs,
                                 command_line(data, start, scorer, output, config,
                                              n_jobs=n_jobs))},
        folds=results, summary=summarise(results), wall_seconds=time.perf_counter() - started)
    write_report(report, output)
    create_table_artifact(
        key="fraud-evaluation",
        table=[{"metric": name, "mean": round(v["mean"], 4), "std": round(v["std"], 4)}
               for name, v in report.summary.items()],
        description=f"{scorer} on {data}, test start {start}, {folds} folds",
    )
    return report.to_dict()

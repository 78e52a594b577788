"""The scheduled deployments, one per flow: what ``finsentinel serve`` runs on one machine and
what ``prefect.yaml`` declares for a Prefect server with a work pool (a test keeps the two
equal). Paths are not parameters: each flow reads them from the environment when a run starts
(pipeline.settings), so the same deployments serve any machine."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from prefect import Flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy


@dataclass(frozen=True)
class ScheduledFlow:
    name: str        # the deployment's name
    entrypoint: str  # path/to/module.py:flow_function, relative to the repository root
    cron: str        # UTC
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        path, _, _ = self.entrypoint.partition(":")
        return path.removesuffix(".py").replace("/", ".")

    @property
    def function(self) -> str:
        return self.entrypoint.partition(":")[2]

    def load_flow(self) -> Flow:
        """The flow object, imported from the installed package (works from any directory)."""
        found = getattr(importlib.import_module(self.module), self.function)
        if not isinstance(found, Flow):
            raise TypeError(f"{self.entrypoint} is not a Prefect flow")
        return found


SCHEDULES: tuple[ScheduledFlow, ...] = (
    ScheduledFlow("score-hourly", "flows/score_transactions.py:score_inbox", "0 * * * *",
                  "Score the transaction files waiting in $FINSENTINEL_INBOX.",
                  {"threshold": 0.5, "k": 20}),
    ScheduledFlow("build-index-daily", "flows/build_index.py:build_index", "30 1 * * *",
                  "Rebuild the index from $FINSENTINEL_HISTORY with analysts' reviews.",
                  {"kind": "auto", "text_dim": 8, "scorer": "knn"}),
    ScheduledFlow("classify-news-15min", "flows/classify_news.py:classify_inbox",
                  "*/15 * * * *",
                  "Classify the news files waiting in $FINSENTINEL_NEWS_INBOX.",
                  {"backend": "encoder"}),
    ScheduledFlow("export-audit-monthly", "flows/export_audit.py:export_audit", "0 3 1 * *",
                  "Verify the ledger and export last month's decisions with day anchors.",
                  {"format": "jsonl"}),
    ScheduledFlow("evaluate-weekly", "flows/evaluate.py:evaluate_scorer", "0 4 * * 1",
                  "Prequential evaluation of the scorer on the latest weeks of history.",
                  {"scorer": "knn-stacked", "folds": 4}),
)


def select(only: list[str] | None = None) -> list[ScheduledFlow]:
    """The schedules named in ``only`` (all when empty); an unknown name is an error."""
    if not only:
        return list(SCHEDULES)
    names = {s.name for s in SCHEDULES}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"unknown deployment(s) {', '.join(unknown)}; expected one of "
                         f"{', '.join(sorted(names))}")
    return [s for s in SCHEDULES if s.name in only]


# One run of a deployment at a time: a run that fires while the previous one is still going
# (a large inbox file past the hour, say) is cancelled, not started beside it on the same files.
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1,
                                       collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def build_deployments(only: list[str] | None = None) -> list[Any]:
    """``RunnerDeployment`` objects for ``prefect.serve``, with the schedules above."""
    return [s.load_flow().to_deployment(name=s.name, cron=s.cron, parameters=s.parameters,
                                        description=s.description, tags=["finsentinel"],
                                        concurrency_limit=ONE_AT_A_TIME)
            for s in select(only)]

"""A small ledger for the dashboard tests, built with the real pipeline: synthetic transactions,
a FAISS index of the labelled history, the last week scored into the ledger, a handbook
evaluation report, and news classified into the per-ticker tables."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import schema
from pipeline.sentiment import LABELS, Prediction

USER, PASSWORD = "alice", "correct horse battery"
# Sentiment words of the seeded headlines: a transparent lexicon classifier stands in for the
# fine-tuned model (the model itself has its own tests; here it only has to label headlines).
POSITIVE = ("beats", "jump", "record", "upgrade", "rally")
NEGATIVE = ("slides", "misses", "probe", "cut", "falls")


class LexiconClassifier:
    """Counts positive and negative words; explains itself with the words it counted."""

    def audit_fields(self) -> dict[str, Any]:
        return {"model_id": "lexicon@test", "backend": "lexicon", "index_version": None}

    def classify(self, texts, *, explain: bool = True) -> list[Prediction]:
        out = []
        for text in texts:
            words = text.lower().replace("$", " ").split()
            pos = [w for w in words if w in POSITIVE]
            neg = [w for w in words if w in NEGATIVE]
            raw = {"positive": 0.1 + len(pos), "negative": 0.1 + len(neg), "neutral": 0.5}
            total = sum(raw.values())
            probs = {label: round(raw[label] / total, 6) for label in LABELS}
            label = max(probs, key=probs.get)
            words_used = [{"word": w, "weight": 1.0} for w in pos] + \
                [{"word": w, "weight": -1.0} for w in neg]
            out.append(Prediction(label, probs, {"attributions": {"method": "lexicon",
                                                                  "words": words_used}}))
        return out


def _news(start: datetime) -> list[dict[str, Any]]:
    rows = []
    for day in range(6):
        when = start + timedelta(days=day, hours=10)
        rows.append({"id": f"a{day}", "published": when.isoformat(), "source": "wire",
                     "headline": f"$AAPL {'beats estimates, shares jump' if day % 2 == 0 else 'misses on probe, shares cut'}",  # noqa: E501
                     "tickers": ["AAPL"]})
        rows.append({"id": f"m{day}", "published": (when + timedelta(hours=2)).isoformat(),
                     "source": "blog", "headline": "$MSFT record rally after upgrade",
                     "tickers": ["MSFT"]})
    rows.append({"id": "a-extra", "published": (start + timedelta(hours=15)).isoformat(),
                 "source": "wire", "headline": "$AAPL holds annual meeting", "tickers": ["AAPL"]})
    return rows


def seed(db_url: str, work: Path) -> dict[str, Any]:
    from pipeline import jobs
    from pipeline.evaluation import ProtocolConfig, evaluate_file
    from pipeline.features import compute_features
    from pipeline.index import FraudIndex
    from pipeline.ledger import Ledger
    from pipeline.news_store import NewsStore
    from pipeline.scoring import ScoringConfig
    from pipeline.sentiment.jobs import classify_file
    from pipeline.synthetic import SyntheticConfig, generate
    from pipeline.vectors import VectorConfig

    work.mkdir(parents=True, exist_ok=True)
    data = generate(SyntheticConfig(n_customers=200, n_terminals=400, n_days=21, seed=5))
    split = data[schema.TX_TIME].min().replace(hour=0, minute=0, second=0) + timedelta(days=14)
    history = data.filter(pl.col(schema.TX_TIME) < split)
    batch = data.filter(pl.col(schema.TX_TIME) >= split)
    data.write_parquet(work / "all.parquet")
    batch.drop(schema.IS_FRAUD, schema.FRAUD_SCENARIO).write_parquet(work / "batch.parquet")

    root = work / "indexes"
    index = FraudIndex.build(compute_features(history), encoder=None,
                             vector_config=VectorConfig(text_dim=0), until=split)
    index.save("dash", root)
    with Ledger(db_url) as ledger:
        report = jobs.score_file(work / "batch.parquet", index, work / "scores.parquet",
                                 ledger=ledger, config=ScoringConfig(alerts_per_day=20))
        with NewsStore(ledger.url) as store:
            (work / "news.jsonl").write_text(
                "\n".join(json.dumps(r) for r in _news(datetime(2024, 5, 1))) + "\n")
            classify_file(work / "news.jsonl", LexiconClassifier(), work / "news.parquet",
                          ledger=ledger, store=store)
    evaluations = work / "evaluations"
    evaluate_file(work / "all.parquet", (split - timedelta(days=0)).date(), "logreg",
                  evaluations / "logreg.json", ProtocolConfig(folds=1))
    return {"db": db_url, "work": work, "indexes": root, "evaluations": evaluations,
            "index_version": index.version, "batch_id": report.batch_id,
            "scored": report.rows_scored, "batch": batch}

"""Smoke tests of the benchmark scripts at tiny sizes: each one's correctness check (the
alternative gives the same answer as the pipeline) holds, and a real difference is caught. The
speed figures themselves live in docs/benchmarks.md, not here."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from pipeline.features import compute_features
from pipeline.schema import FEATURES

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                  REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def alt():
    return load("alternatives")


def handbook_like(seed: int = 0, n: int = 1200) -> pd.DataFrame:
    """Handbook columns on an hourly grid over 50 days: ties in time within a customer, and
    pairs exactly 1, 7, 8 or 37 days apart, so window edges are hit. Integer ids, shuffled."""
    rng = np.random.default_rng(seed)
    start = datetime(2018, 4, 1)
    return pd.DataFrame({
        "TRANSACTION_ID": rng.permutation(n),
        "TX_DATETIME": pd.to_datetime([start + timedelta(hours=int(h))
                                       for h in rng.integers(0, 50 * 24, n)]).as_unit("us"),
        "CUSTOMER_ID": rng.integers(0, 20, n),
        "TERMINAL_ID": rng.integers(0, 10, n),
        "TX_AMOUNT": np.round(rng.gamma(2.0, 30.0, n), 2),
        "TX_FRAUD": (rng.random(n) < 0.2).astype(np.int8),
    })


def test_pandas_features_equal_the_pipelines(alt):
    frame = handbook_like()
    ours = compute_features(alt.canonical_handbook(pl.from_pandas(frame)))
    ids = frame["TRANSACTION_ID"].tolist()
    diffs = alt.compare_features(ours, alt.pandas_features(frame), ids)
    assert set(diffs) == set(FEATURES)
    assert max(diffs.values()) < 1e-9
    notebook = alt.handbook_notebook_features(frame.copy())
    assert max(alt.compare_features(ours, notebook.loc[frame["TRANSACTION_ID"]], ids).values()
               ) < 1e-9
    # The check can fail: one amount changed on the pandas side shows up.
    changed = frame.copy()
    changed.loc[5, "TX_AMOUNT"] += 100.0
    assert max(alt.compare_features(ours, alt.pandas_features(changed), ids).values()) > 1


def test_faiss_and_sklearn_neighbours_agree_on_pipeline_vectors(alt):
    args = argparse.Namespace(history=1000, queries=200, k=10, text_dim=0, repeat=1)
    res = alt.run_knn(args)  # raises if any query's neighbours differ beyond a tie
    assert res["dimension"] == 15 and res["history"] == 1000
    for algorithm in ("brute", "auto"):
        check = res[f"sklearn_{algorithm}"]["agreement"]
        assert check["differ"] == 0 and check["same"] + check["ties"] == 200
        assert check["same"] >= 190
    assert {a["kind"] for a in res["approximate"]} == {"hnsw", "ivf"}
    assert all(0.0 <= a["recall_at_10"] <= 1.0 for a in res["approximate"])
    assert max(a["recall_at_10"] for a in res["approximate"]) >= 0.99


def test_agreement_tells_ties_from_differences(alt):
    history = np.array([[0.0], [1.0], [-1.0], [5.0]], dtype=np.float32)
    queries = np.array([[0.0]], dtype=np.float32)
    # k = 2: 0 and either 1 or 2 (both at distance 1) — a tie either way.
    assert alt.agreement(np.array([[0, 1]]), np.array([[0, 2]]), history, queries) == {
        "same": 0, "ties": 1, "differ": 0}
    assert alt.agreement(np.array([[0, 1]]), np.array([[1, 0]]), history, queries)["same"] == 1
    assert alt.agreement(np.array([[0, 1]]), np.array([[0, 3]]), history, queries)[
        "differ"] == 1
    assert alt.recall_at(np.array([[0, 3]]), np.array([[0, 1]]), 2) == 0.5


def test_embedding_dedupe_and_cache_give_the_same_vectors(alt):
    res = alt.run_embedding(argparse.Namespace(rows=400))
    assert res["rows"] == 400 and res["unique"] < 400
    assert res["cold_encoded"] == res["unique"] and res["warm_encoded"] == 0
    assert res["max_abs_diff_cold_vs_every"] < 1e-4 and res["max_abs_diff_warm_vs_cold"] == 0
    assert res["min_cosine_cold_vs_every"] > 0.9999


def test_gpu_parts_report_not_run_without_a_gpu(alt):
    status = alt.gpu_status()
    if status["faiss_gpus"] or status["torch_cuda"]:
        pytest.skip("a GPU is present: the GPU figures are measured, not skipped")
    res = alt.run_gpu(argparse.Namespace())
    assert res["knn"] == res["encoder"] == "not run: no GPU on this machine"
    text = alt.gpu_section({"result": res})
    assert "not run: no GPU on this machine" in text and "queries/s" in text


@pytest.mark.gpu
def test_gpu_benchmark_measures_exact_and_half_precision_search(alt):
    status = alt.gpu_status()
    if not (status["faiss_has_gpu"] and status["faiss_gpus"] and status["torch_cuda"]):
        pytest.skip("needs a CUDA GPU with faiss-gpu and CUDA torch; CI has neither")
    res = alt.run_gpu(argparse.Namespace(history=50_000, queries=20_000, k=20, repeat=1,
                                         cpu_queries=500, texts=5_000))
    knn = res["knn"]
    assert knn["agreement"]["differ"] == 0 and knn["gpu_qps"] > knn["cpu_qps"]
    assert knn["float16"]["recall_at_k"] >= 0.98
    assert res["encoder"]["gpu_fp16_texts_per_s"] > res["encoder"]["cpu_texts_per_s"]
    text = alt.gpu_section({"result": res})
    assert "half precision" in text and "not run" not in text


def test_write_section_replaces_only_its_own(alt, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- other:start -->\nkeep\n<!-- other:end -->\n")
    alt.write_section("mine", "first", doc)
    alt.write_section("mine", "second", doc)
    text = doc.read_text()
    assert "keep" in text and "second" in text and "first" not in text
    assert text.count("<!-- mine:start -->") == 1


def test_end_to_end_scores_and_records_every_row(tmp_path):
    e2e = load("end_to_end")
    args = e2e.parser().parse_args(["--sizes", "400", "--history-vectors", "1500",
                                    "--customers", "60", "--max-seconds", "300"])
    res = e2e.run(args, tmp_path)
    assert res["build"]["vectors"] > 500  # ~1.93 payments a card a day holds for many cards
    [run] = res["runs"]
    assert "failed" not in run, run
    assert run["rows"] == run["scored"] == run["ledger_added"] == 400
    assert run["tx_per_s"] > 0 and run["peak_rss_mb"] >= run["rss_after_index_load_mb"] > 0
    assert {"features", "vectors", "knn", "explanations", "ledger"} <= set(run["stages"])
    assert sum(run["stages"].values()) <= run["seconds"] * 1.01
    text = e2e.section({"result": res})
    assert "| 400 |" in text


def test_sentiment_seed_study_reports_each_seed_and_their_ensemble():
    from pipeline.sentiment.data import LabelledTexts

    sentiment = load("sentiment")
    words = {0: ["loss widened", "sales fell", "profit dropped", "shares plunged"],
             1: ["meeting was held", "report was published", "office moved", "board met"],
             2: ["profit rose", "sales grew", "shares jumped", "revenue climbed"]}
    texts, labels = [], []
    for label, phrases in words.items():
        for i, phrase in enumerate(phrases * 6):
            texts.append(f"The company's {phrase} in quarter {i % 4 + 1} of year {2000 + i}.")
            labels.append(label)
    data = LabelledTexts(texts, np.array(labels), [str(i) for i in range(len(texts))], "toy")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    train, test = data.subset(order[:54]), data.subset(order[54:])

    study = sentiment.seed_study("toy", train, {"test": test}, [0, 1], threads=2)

    assert [run["seed"] for run in study["runs"]] == [0, 1]
    for run in study["runs"]:
        assert run["test"]["n"] == 18 and run["test"]["accuracy"] > 0.5  # chance: 1/3
    assert study["ensemble"]["test"]["n"] == 18
    lines = sentiment._seed_lines({**{"toy": study}, "fpb": study, "machine": {
        "cpu": "cpu", "torch_threads": 2}, "command": "cmd", "commit": "abc"})
    row = next(line for line in lines if line.startswith("| PhraseBank"))
    accuracies = [run["test"]["accuracy"] for run in study["runs"]]
    assert f"{sum(accuracies) / 2:.4f} ({min(accuracies):.4f}–{max(accuracies):.4f})" in row
    assert f"{study['ensemble']['test']['accuracy']:.4f}" in row

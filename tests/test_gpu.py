"""GPU code paths: FAISS on the GPU returns the CPU's exact neighbours, the encoder in fp16 gives
the fp32 embeddings, and scoring on a GPU index gives the CPU's scores.

Marked ``gpu`` and skipped without a CUDA GPU and faiss-gpu (CI has neither). Run them on a GPU
machine with ``pytest -m gpu`` (DEVELOPERS.md: ``../shared/gpu-kit`` packs a faiss-gpu that fits
the lent machines).
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from pipeline.index import FraudIndex, IndexConfig, gpu_available
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU and faiss-gpu "
                                                   "(pip install '.[gpu]'); CI has neither"),
]


@pytest.fixture(scope="module")
def history():
    from pipeline.features import compute_features

    return compute_features(generate(SyntheticConfig(n_customers=400, n_terminals=800,
                                                     n_days=40, seed=11)))


def _pair(history, **config):
    vector = VectorConfig(text_dim=0)
    cpu = FraudIndex.build(history, encoder=None, vector_config=vector,
                           config=IndexConfig(use_gpu=False, **config))
    gpu = FraudIndex.build(history, encoder=None, vector_config=vector,
                           config=IndexConfig(use_gpu=True, **config))
    return cpu, gpu


def test_exact_search_returns_the_same_neighbours_on_gpu_and_cpu(history):
    cpu, gpu = _pair(history, kind="flat")
    assert gpu.gpu and not cpu.gpu
    queries = cpu.vectorizer.transform(history.tail(2000))
    d_cpu, p_cpu = cpu.search(queries, 20)
    d_gpu, p_gpu = gpu.search(queries, 20)
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-4, atol=1e-4)
    # Positions agree except where two candidates are tied in distance.
    differ = p_gpu != p_cpu
    tied = np.isclose(d_cpu, np.roll(d_cpu, 1, axis=1), atol=1e-4) | np.isclose(
        d_cpu, np.roll(d_cpu, -1, axis=1), atol=1e-4)
    assert not (differ & ~tied).any()
    assert differ.mean() < 0.01


def test_scores_on_a_gpu_index_equal_the_cpu_scores(history):
    from pipeline.scoring import FraudScorer, ScoringConfig

    cutoff = history["tx_time"].max() - timedelta(days=5)
    past = history.filter(history["tx_time"] < cutoff)
    batch = history.filter(history["tx_time"] >= cutoff).drop("is_fraud", "fraud_scenario",
                                                             strict=False)
    cpu, gpu = _pair(past, kind="flat")
    config = ScoringConfig(threshold=0.5)
    a = FraudScorer(cpu, config).score(batch, past)
    b = FraudScorer(gpu, config).score(batch, past)
    np.testing.assert_allclose(b.scores["score"].to_numpy(), a.scores["score"].to_numpy(),
                               atol=1e-5)
    assert {e["search"]["device"] for e in b.inputs} == {"gpu"}


def test_ivf_on_the_gpu_reaches_the_recall_of_the_cpu_ivf(history):
    from pipeline.index import measure_recall

    cpu, gpu = _pair(history, kind="ivf", ivf_nprobe=16)
    vectors = cpu.vectorizer.transform(history)
    r_cpu = measure_recall(cpu.index, vectors, k=10, queries=500)
    r_gpu = measure_recall(gpu._search_index, vectors, k=10, queries=500)
    assert r_gpu >= 0.95 and abs(r_gpu - r_cpu) < 0.02


@pytest.mark.skipif(not _cuda(), reason="needs torch with CUDA")
def test_encoder_in_fp16_gives_the_fp32_embeddings():
    from pipeline.encoder import TextEncoder

    texts = [f"card payment at merchant {i} grocery store" for i in range(200)]
    fp32 = TextEncoder(device="cpu").encode(texts)
    fp16 = TextEncoder(device="cuda").encode(texts)
    cosine = (fp32 * fp16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(fp16, axis=1))
    assert cosine.min() > 0.999


def test_half_precision_brute_force_finds_the_exact_neighbours_on_the_gpu(history):
    from pipeline.index import measure_recall
    from pipeline.scoring import FraudScorer

    cpu, gpu = _pair(history, kind="flat", gpu_float16=True)
    assert gpu.gpu and gpu.config.gpu_float16
    vectors = cpu.vectorizer.transform(history)
    assert measure_recall(gpu._search_index, vectors, k=10, queries=1000) >= 0.98
    queries = cpu.vectorizer.transform(history.tail(500))
    d_cpu, _ = cpu.search(queries, 20)
    d_gpu, _ = gpu.search(queries, 20)
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=2e-2, atol=1e-2)

    cutoff = history["tx_time"].max() - timedelta(days=2)
    past = history.filter(history["tx_time"] < cutoff)
    batch = history.filter(history["tx_time"] >= cutoff).head(300).drop("is_fraud")
    _, half = _pair(past, kind="flat", gpu_float16=True)
    inputs = FraudScorer(half).score(batch, past).inputs
    assert {e["search"]["device"] for e in inputs} == {"gpu-float16"}


def test_a_search_deeper_than_the_gpu_allows_runs_on_the_cpu_copy(history):
    from pipeline.index import GPU_MAX_K

    cpu, gpu = _pair(history, kind="flat")
    assert gpu.size > GPU_MAX_K + 100
    queries = cpu.vectorizer.transform(history.tail(50))
    d_cpu, p_cpu = cpu.search(queries, GPU_MAX_K + 100)
    d_gpu, p_gpu = gpu.search(queries, GPU_MAX_K + 100)
    np.testing.assert_array_equal(p_gpu, p_cpu)
    np.testing.assert_array_equal(d_gpu, d_cpu)


@pytest.mark.skipif(not _cuda(), reason="needs torch with CUDA")
def test_a_decision_scored_on_cuda_replays_on_the_cpu(tmp_path):
    """Scored with the encoder on CUDA (fp16); replayed with the encoder on the CPU (fp32), as
    an auditor's machine does: reproduced, with both precisions on record. FAISS searches on
    the GPU both times: a GPU-searched decision replayed by a CPU search is another question
    (float32 distances differ by ~1e-6, see test_scores_on_a_gpu_index_equal_the_cpu_scores)."""
    from datetime import date, datetime

    import polars as pl

    from pipeline import audit, jobs, schema
    from pipeline.encoder import TextEncoder
    from pipeline.ingest import read_transactions
    from pipeline.ledger import Ledger

    start = datetime.combine(date.today() - timedelta(days=21), datetime.min.time())
    data = generate(SyntheticConfig(n_customers=120, n_terminals=240, n_days=21, seed=5,
                                    start_date=start.date()))
    tx = pl.col(schema.TX_TIME)
    data.filter(tx < start + timedelta(days=14)).write_parquet(tmp_path / "history.parquet")
    data.filter(tx >= start + timedelta(days=14)).drop(schema.IS_FRAUD, schema.FRAUD_SCENARIO
                                                        ).head(500).write_parquet(
        tmp_path / "batch.parquet")
    root = tmp_path / "idx"
    jobs.build_index(read_transactions(tmp_path / "history.parquet", require_labels=True),
                     "cards", root=root, encoder=TextEncoder(device="cpu"),
                     vector_config=VectorConfig(text_dim=8))
    cuda = TextEncoder(device="cuda")
    assert cuda.precision == "fp16"
    with Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}") as ledger:
        scored_on = FraudIndex.load("cards", root, encoder=cuda)
        assert scored_on.gpu
        jobs.score_file(tmp_path / "batch.parquet", scored_on, tmp_path / "scores.parquet",
                        ledger=ledger, batch_id="gpu")
        decisions = ledger.decisions()
        assert {d["inputs"]["encoder"]["precision"] for d in decisions} == {"fp16"}
        assert {d["inputs"]["encoder"]["device"] for d in decisions} == {"cuda"}
        picks = [decisions[0], decisions[len(decisions) // 2],
                 max(decisions, key=lambda d: d["score"])]
        results = [audit.replay(ledger, d["decision_id"], root=root,
                                encoder=TextEncoder(device="cpu")) for d in picks]
    for d, r in zip(picks, results, strict=True):
        assert r.ok, r.reason
        assert (r.recorded_precision, r.replay_precision) == ("fp16", "fp32")
        assert r.vector_max_difference <= r.vector_tolerance
        assert abs(r.replayed_score - d["score"]) <= audit.SCORE_TOLERANCE
        assert "recorded in fp16 (cuda)" in r.reason

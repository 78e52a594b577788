"""What the GPU code does with an index faiss cannot put on a GPU, checked without one: the
HNSW branch of ``pipeline.index._to_gpu`` returns before any GPU call, so it runs on the CPU."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest


def test_an_hnsw_index_stays_on_the_cpu_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """faiss has no GPU version of HNSW (its GPU cloner raises "This index type is not
    implemented on GPU"): on a GPU machine such an index is searched on the CPU. That used to
    happen without a word, so an operator who asked for the GPU saw no reason for the slower
    search; it must be said, naming HNSW and what to build instead."""
    from pipeline.index import _to_gpu

    index = faiss.IndexHNSWFlat(8, 16)
    index.add(np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="pipeline.index"):
        assert _to_gpu(index) is index
        assert _to_gpu(index, float16=True) is index
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.index"]
    assert len(messages) == 2
    assert "HNSW" in messages[0] and "CPU" in messages[0]
    assert "flat" in messages[0] and "ivf" in messages[0]

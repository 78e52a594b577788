"""A small sustained stream (benchmarks/load.py's run, 20 batches): nothing lost, no file
descriptor or thread left open per batch, resident memory flat after warm-up. The full run
(200 batches of 10k) is the benchmark, reported in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from pipeline.ledger import Ledger

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmarks_load", REPO / "benchmarks" /
                                                  "load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_stream_of_batches_keeps_handles_and_memory_flat(tmp_path):
    bench = load_benchmark()
    config = bench.LoadConfig(batches=20, batch_size=600, customers=200, terminals=400,
                              history_days=14, pool_days=7, text_dim=0, index_kind="flat",
                              workdir=tmp_path)
    result = bench.run_stream(config)
    summary = bench.summarise(result)
    stats = result.batches

    assert [s.rows for s in stats] == [600] * 20
    assert all(s.scored + s.quarantined == s.rows and s.recorded == s.scored for s in stats)
    assert result.ledger_records == summary["recorded"] == sum(s.scored for s in stats)
    with Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}") as ledger:
        assert ledger.verify().ok and len(ledger.batches()) == 20

    # A Ledger is opened and closed per batch, files are read and written: none may stay open.
    # A leak of one per batch would add 18 after warm-up; a library opening one handle once
    # for good (seen after test_models' boosters in the same process) is not a leak.
    assert summary["fds_last"] <= summary["fds_after_warmup"] + 1, summary
    assert summary["fds_max_after_warmup"] <= summary["fds_after_warmup"] + 2, summary
    assert summary["threads_max_after_warmup"] <= summary["threads_after_warmup"] + 2
    # A leak of one batch's scores or explanations (600 dicts) per batch would add
    # megabytes per batch; allow allocator noise only.
    low, high = summary["rss_mb_min_max_after_warmup"]
    assert high - low < 40, summary
    assert summary["rss_slope_mb_per_100_batches"] < 60, summary
    assert all(s.peak_rss_mb >= s.rss_mb - 1 for s in stats)  # peak is a real high-water mark

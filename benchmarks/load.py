"""Sustained-stream load run: score a long stream of transaction batches against one index, as
the score flow does (read the batch file, features, kNN scores and explanations, write the
scores, record every decision in the ledger), and watch the process for growth: resident memory
after and at peak within each batch, open file descriptors, threads, and throughput.

    python -m benchmarks.load [--batches 200] [--batch-size 10000] [--db sqlite|none|URL]

Batches are drawn in turn from a pool of days after the indexed history, each with fresh
transaction ids and its own batch id, so every batch is new to the ledger. The index is loaded
once. Writes its section of docs/benchmarks.md (between the load markers; other sections are
left as they are) and every batch's numbers to docs/benchmarks-load.json. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
RAW = REPO / "docs" / "benchmarks-load.json"
START, END = "<!-- load:start -->", "<!-- load:end -->"


@dataclass(frozen=True)
class LoadConfig:
    """The stream: ``batches`` batches of ``batch_size`` rows against an index of
    ``history_days`` days of ``customers`` cards; ``db`` "sqlite" (a fresh file in the work
    directory), "none" (no ledger), or a database URL."""

    batches: int = 200
    batch_size: int = 10_000
    customers: int = 2000
    terminals: int = 4000
    history_days: int = 28
    pool_days: int = 14
    text_dim: int = 8
    index_kind: str = "hnsw"
    db: str = "sqlite"
    seed: int = 1
    workdir: Path | None = None


@dataclass(frozen=True)
class BatchStats:
    batch: int
    rows: int
    scored: int
    quarantined: int
    recorded: int
    seconds: float
    rows_per_s: float
    rss_mb: float  # resident memory after the batch
    peak_rss_mb: float  # highest resident memory during the batch
    fds: int  # open file descriptors after the batch
    threads: int  # OS threads after the batch


@dataclass
class StreamResult:
    config: LoadConfig
    index_vectors: int
    index_kind: str
    setup_seconds: float
    batches: list[BatchStats] = field(default_factory=list)
    ledger_records: int | None = None


# --- process probes (Linux /proc) -------------------------------------------------------------

def _status(key: str) -> float:
    """A ``/proc/self/status`` value in MB (kB fields) or as a number."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            value = float(line.split()[1])
            return value / 1024 if line.rstrip().endswith("kB") else value
    raise KeyError(key)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class PeakRss:
    """Highest RSS between ``reset`` and ``read``: the kernel's high-water mark where it can be
    reset (``/proc/self/clear_refs``), else a sampling thread (every 10 ms)."""

    def __init__(self) -> None:
        self._peak = 0.0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.kernel = True
        except OSError:
            self.kernel = False

    def reset(self) -> None:
        if self.kernel:
            Path("/proc/self/clear_refs").write_text("5")
            return
        self._peak = _status("VmRSS")
        if self._sampler is None:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, _status("VmRSS"))

    def read(self) -> float:
        return _status("VmHWM") if self.kernel else max(self._peak, _status("VmRSS"))

    def close(self) -> None:
        self._stop.set()


# --- the stream -----------------------------------------------------------------------------

def prepare(config: LoadConfig, work: Path) -> tuple[Path, list[pl.DataFrame], Any]:
    """Build and save the index; return its root, the pool of batches, and the index loaded
    back (hash-checked) as the flow loads it."""
    from pipeline.encoder import TextEncoder
    from pipeline.features import compute_features
    from pipeline.index import FraudIndex, IndexConfig
    from pipeline.synthetic import SyntheticConfig, generate
    from pipeline.vectors import VectorConfig

    data = generate(SyntheticConfig(n_customers=config.customers, n_terminals=config.terminals,
                                    n_days=config.history_days + config.pool_days,
                                    seed=config.seed))
    start = data["tx_time"].min().replace(hour=0, minute=0, second=0, microsecond=0)
    split = start + timedelta(days=config.history_days)
    history = data.filter(pl.col("tx_time") < split)
    encoder = TextEncoder(device="cpu", cache_dir=work / "cache") if config.text_dim else None
    index = FraudIndex.build(compute_features(history), encoder=encoder,
                             vector_config=VectorConfig(text_dim=config.text_dim), until=split,
                             config=IndexConfig(kind=config.index_kind))
    root = work / "indexes"
    index.save("stream", root)
    pool = data.filter(pl.col("tx_time") >= split).drop("is_fraud", "fraud_scenario")
    chunks = [pool.slice(i, config.batch_size)
              for i in range(0, pool.height - config.batch_size + 1, config.batch_size)]
    if not chunks:
        raise ValueError(f"the {config.pool_days} pool days hold {pool.height} rows, fewer than "
                         f"one batch of {config.batch_size}: raise --pool-days or --customers")
    loaded = FraudIndex.load("stream", root, encoder=encoder)
    return root, chunks, loaded


def run_stream(config: LoadConfig, progress: Callable[[BatchStats], None] | None = None
               ) -> StreamResult:
    """Run the stream in this process and measure it; see the module docstring."""
    from pipeline import jobs
    from pipeline.ingest import read_transactions
    from pipeline.ledger import Ledger
    from pipeline.scoring import FraudScorer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    owned = config.workdir is None
    work = Path(tempfile.mkdtemp(prefix="fs-load-")) if owned else Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["FINSENTINEL_CACHE"] = str(work / "cache")
    db = {"sqlite": f"sqlite:///{work / 'ledger.sqlite'}", "none": None}.get(config.db,
                                                                              config.db)
    started = time.perf_counter()
    _, chunks, index = prepare(config, work)
    result = StreamResult(config, index.size, index.manifest["faiss_index"],
                          round(time.perf_counter() - started, 1))
    peak = PeakRss()
    try:
        for b in range(config.batches):
            batch = chunks[b % len(chunks)].with_columns(
                (pl.col("transaction_id").cast(pl.String) + f"-{b}").alias("transaction_id"))
            path, out = work / f"batch-{b}.parquet", work / f"scores-{b}.parquet"
            batch.write_parquet(path)
            peak.reset()
            t0 = time.perf_counter()
            if db is None:
                ingested = read_transactions(path)
                scored = FraudScorer(index).score(ingested.accepted)
                jobs.write_outputs(scored, ingested, f"load-{b}", out)
                counts = (ingested.rows_in, scored.scores.height, ingested.quarantined.height, 0)
            else:
                with Ledger(db) as ledger:  # opened per batch, as the flow's task does
                    report = jobs.score_file(path, index, out, ledger=ledger,
                                             batch_id=f"load-{b}")
                counts = (report.rows_in, report.rows_scored, report.rows_quarantined,
                          report.ledger_added)
            seconds = time.perf_counter() - t0
            stats = BatchStats(b, *counts, round(seconds, 3), round(counts[0] / seconds, 1),
                               round(_status("VmRSS"), 1), round(peak.read(), 1), open_fds(),
                               int(_status("Threads")))
            result.batches.append(stats)
            path.unlink()
            out.unlink()
            if progress:
                progress(stats)
    finally:
        peak.close()
    if db is not None:
        with Ledger(db) as ledger:
            result.ledger_records = ledger.count()
    if owned:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return result


def summarise(result: StreamResult) -> dict[str, Any]:
    """Growth after warm-up (the first tenth of the batches, at least 3): memory slope by least
    squares, and file descriptors and threads at the end against the end of the warm-up."""
    stats = result.batches
    warm = min(max(3, len(stats) // 10), len(stats) - 1)
    after = stats[warm:]
    x = np.array([s.batch for s in after], dtype=float)
    rss = np.array([s.rss_mb for s in after])
    slope = float(np.polyfit(x, rss, 1)[0] * 100) if len(after) > 1 else 0.0
    seconds = sum(s.seconds for s in stats)
    rows = sum(s.rows for s in stats)
    return {
        "batches": len(stats), "rows": rows, "scored": sum(s.scored for s in stats),
        "quarantined": sum(s.quarantined for s in stats),
        "recorded": sum(s.recorded for s in stats), "ledger_records": result.ledger_records,
        "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds, 1),
        "batch_seconds_median": round(float(np.median([s.seconds for s in stats])), 2),
        "batch_seconds_p95": round(float(np.percentile([s.seconds for s in stats], 95)), 2),
        "warmup_batches": warm,
        "rss_mb_after_warmup": stats[warm - 1].rss_mb, "rss_mb_last": stats[-1].rss_mb,
        "rss_mb_min_max_after_warmup": [float(rss.min()), float(rss.max())],
        "rss_slope_mb_per_100_batches": round(slope, 2),
        "peak_rss_mb_max": max(s.peak_rss_mb for s in stats),
        "fds_after_warmup": stats[warm - 1].fds, "fds_last": stats[-1].fds,
        "fds_max_after_warmup": max(s.fds for s in after),
        "threads_after_warmup": stats[warm - 1].threads, "threads_last": stats[-1].threads,
        "threads_max_after_warmup": max(s.threads for s in after),
    }


# --- report ---------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import faiss
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "polars": pl.__version__, "faiss": faiss.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=REPO, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def section(report: dict[str, Any]) -> str:
    m, c, s = report["machine"], report["config"], report["summary"]
    ledger = {"none": "no ledger", "sqlite": "SQLite ledger, WAL journal"}.get(
        c["db"], "ledger at " + c["db"].split("://")[0])
    lines = [
        START, "## Sustained scoring stream (reliability: memory, handles, throughput)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; Python "
        f"{m['python']}, polars {m['polars']}, faiss {m['faiss']}, torch {m['torch']}. Load "
        f"average {report['load_average_start']} at the start and {report['load_average_end']} "
        "at the end: the cores were shared with other jobs, so times are upper bounds. "
        f"Date {report['date']}, commit {report['commit']}. Command: `{report['command']}`.", "",
        f"{c['batches']} batches of {c['batch_size']:,} transactions, one after another in one "
        f"process, against one index ({report['index_kind']}, {report['index_vectors']:,} "
        f"vectors: {c['customers']:,} cards, {c['history_days']} days of history, text "
        f"dimension {c['text_dim']}), loaded once; each batch read from Parquet, scored with "
        f"explanations, its scores written, every decision recorded ({ledger}, opened per "
        "batch as the flow's task does). Index build and data generation "
        f"({report['setup_seconds']} s) are not in the times.", "",
        "| measure | value |", "| --- | --- |",
        f"| rows scored / recorded in the ledger | {s['scored']:,} / "
        f"{'—' if s['ledger_records'] is None else format(s['ledger_records'], ',')} |",
        f"| throughput (all batches) | {s['rows_per_s']:,.0f} rows/s |",
        f"| batch time, median / 95th percentile | {s['batch_seconds_median']} s / "
        f"{s['batch_seconds_p95']} s |",
        f"| resident memory after warm-up (batch {s['warmup_batches'] - 1}) → last batch | "
        f"{s['rss_mb_after_warmup']:.0f} MB → {s['rss_mb_last']:.0f} MB |",
        f"| resident memory after each batch past warm-up, min – max | "
        f"{s['rss_mb_min_max_after_warmup'][0]:.0f} – {s['rss_mb_min_max_after_warmup'][1]:.0f}"
        " MB |",
        f"| memory trend past warm-up (least squares) | {s['rss_slope_mb_per_100_batches']:+.1f}"
        " MB per 100 batches |",
        f"| highest peak within a batch | {s['peak_rss_mb_max']:.0f} MB |",
        f"| open file descriptors after warm-up → last (max) | {s['fds_after_warmup']} → "
        f"{s['fds_last']} ({s['fds_max_after_warmup']}) |",
        f"| OS threads after warm-up → last (max) | {s['threads_after_warmup']} → "
        f"{s['threads_last']} ({s['threads_max_after_warmup']}) |", "",
    ]
    step = max(1, len(report["batches"]) // 20)
    lines += [f"Every {step}th batch, and the last (all of them in "
              "`docs/benchmarks-load.json`):" if step > 1 else "Every batch:", "",
              "| batch | seconds | rows/s | RSS after (MB) | peak RSS in batch (MB) | open fds "
              "| threads |", "| --- | --- | --- | --- | --- | --- | --- |"]
    shown = report["batches"][::step]
    if shown[-1] is not report["batches"][-1]:
        shown.append(report["batches"][-1])
    for b in shown:
        lines.append(f"| {b['batch']} | {b['seconds']:.2f} | {b['rows_per_s']:,.0f} | "
                     f"{b['rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {b['fds']} | "
                     f"{b['threads']} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replace the load section of docs/benchmarks.md (or add it); other sections stay."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if START in doc and END in doc:
        before, rest = doc.split(START, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        doc = before + text + ("\n" + after if after else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc)


def rewrite(raw: Path = RAW) -> None:
    """Rewrite the docs section from the raw numbers of the last run (no new run)."""
    write_section(section(json.loads(raw.read_text())))


def main(argv: list[str] | None = None) -> None:
    defaults = LoadConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("batches", "batch_size", "customers", "terminals", "history_days", "pool_days",
                 "text_dim", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(defaults, name))
    parser.add_argument("--index-kind", default=defaults.index_kind,
                        choices=["auto", "flat", "hnsw", "ivf"])
    parser.add_argument("--db", default=defaults.db, help="sqlite | none | a database URL")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    args = parser.parse_args(argv)
    config = LoadConfig(**{k: v for k, v in vars(args).items() if k != "no_write"})

    load_start = os.getloadavg()
    result = run_stream(config, progress=lambda s: print(
        f"batch {s.batch:4d}: {s.seconds:6.2f} s, {s.rows_per_s:8,.0f} rows/s, RSS "
        f"{s.rss_mb:7.1f} MB (peak {s.peak_rss_mb:7.1f}), fds {s.fds}, threads {s.threads}",
        flush=True))
    summary = summarise(result)
    from pipeline.privacy import redact, redact_url, url_password

    command = "python -m benchmarks.load " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
        "command": redact(command, [url_password(config.db)]),
        "machine": machine(), "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "config": {**asdict(config), "db": redact_url(config.db), "workdir": None},
        "index_vectors": result.index_vectors, "index_kind": result.index_kind,
        "setup_seconds": result.setup_seconds, "summary": summary,
        "batches": [asdict(b) for b in result.batches],
    }
    print(json.dumps(summary, indent=2))
    if not args.no_write:
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps(report, indent=2) + "\n")
        write_section(section(report))
        print(f"wrote {DOC} (load section) and {RAW}")


if __name__ == "__main__":
    main()

"""Child processes for the reliability tests: each is started as a real process, and some are
killed with SIGKILL mid-write. Run as ``python tests/reliability_workers.py MODE ARGS…``.
Also ``run_cli``, the CLI run in the test's own process.

Kill points are reached by wrapping library functions inside the child only (no hook in the
library itself): the child prints ``PAUSED <point>`` and sleeps there until it is killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

PAUSE_S = 600.0


def pause(point: str) -> None:
    # The real stdout: run_cli captures sys.stdout while the CLI runs.
    print(f"PAUSED {point}", file=sys.__stdout__, flush=True)
    time.sleep(PAUSE_S)


# --- ledger batches (shared with the tests, so a re-run records exactly the same batch) ------

def ledger_batch(batch: str, size: int):
    """A batch's decisions and quarantined rows, a deterministic function of its name."""
    from pipeline.ledger import Decision, QuarantinedRow

    decisions = [
        Decision(batch_id=batch, kind="fraud", subject_id=f"{batch}-tx-{i}",
                 score=(i * 7919 % 1000) / 1000, threshold=0.5,
                 decision="alert" if i * 7919 % 1000 >= 500 else "pass",
                 model_version="m@1", index_version="idx@1",
                 input_hash=hashlib.sha256(f"{batch}:{i}".encode()).hexdigest(),
                 explanation={"neighbours": [{"transaction_id": f"n{i}", "similarity": 0.5}],
                              "note": f"row {i} of {batch}"})
        for i in range(size)
    ]
    quarantined = [QuarantinedRow(row_number=size + j, field="amount", reason="amount: negative",
                                  raw=json.dumps({"amount": -j - 1})) for j in range(2)]
    return decisions, quarantined


def record(ledger, batch: str, size: int):
    decisions, quarantined = ledger_batch(batch, size)
    return ledger.record_batch(batch, "fraud", f"input-{batch}", size + len(quarantined),
                               decisions, quarantined)


def ledger_main(url: str, mode: str, first: int, count: int, size: int) -> None:
    """Record batches b<first>…; mode ``pause`` stops inside the first batch's transaction
    right after its decisions were inserted (not committed); ``loop`` records them one after
    another."""
    import pipeline.ledger as ledger_mod
    from pipeline.ledger import Ledger

    with Ledger(url) as ledger:
        if mode == "pause":
            insert = ledger_mod._insert_decisions

            def insert_then_pause(conn, rows):  # both SQLite's executemany and PG's COPY
                insert(conn, rows)
                pause("ledger-insert")

            ledger_mod._insert_decisions = insert_then_pause

        for b in range(first, first + count):
            record(ledger, f"b{b}", size)
            print(f"RECORDED b{b}", flush=True)


# --- index publish ----------------------------------------------------------------------------

def index_main(point: str, root: str, source: str) -> None:
    """Load the index ``cards`` from the root ``source`` and save it as a new version of
    ``cards`` under ``root``; pause at ``point``:

    write     an index file is written into the staging directory, the rest are not
    staged    every file and the manifest are in staging, not yet renamed to a version
    renamed   the version directory is in place, CURRENT still names the previous version
    switched  CURRENT names the new version (the publish is done but for its clean-up)
    loop      no pause: save new versions back to back until killed
    """
    import faiss

    from pipeline import artifacts
    from pipeline.index import FraudIndex

    index = FraudIndex.load("cards", source)
    if point == "write":
        real_write = faiss.write_index

        def write_then_pause(idx, path):
            real_write(idx, path)
            pause("write")

        faiss.write_index = write_then_pause
    elif point in ("staged", "renamed", "switched"):
        real_fsync = artifacts._fsync_dir
        calls = [0]
        at = {"staged": 1, "renamed": 2, "switched": 3}[point]

        def fsync_then_pause(path):
            real_fsync(path)
            calls[0] += 1
            if calls[0] == at:
                pause(point)

        artifacts._fsync_dir = fsync_then_pause
    print("LOADED", index.size, flush=True)
    while True:
        version = index.save("cards", root)
        print(f"SAVED {version}", flush=True)
        if point != "loop":
            return


# --- sentiment model publish -------------------------------------------------------------------

def model_main(point: str, data: str, output: str) -> None:
    """``finsentinel sentiment train --data DATA --output OUTPUT`` (tiny settings), pausing at
    ``point`` of the publish:

    weights   the safetensors weights are written into staging, the tokenizer and card are not
    """
    import safetensors.torch

    if point == "weights":
        real_save = safetensors.torch.save_file

        def save_then_pause(*args, **kwargs):
            real_save(*args, **kwargs)
            pause("weights")

        safetensors.torch.save_file = save_then_pause
    code, out, err = run_cli(*model_train_args(data, output))
    print(f"EXIT {code} {out.strip()} {err.strip()}", flush=True)


def model_train_args(data: str, output: str) -> list[str]:
    return ["sentiment", "train", "--data", data, "--output", output, "--epochs", "1",
            "--max-length", "16", "--batch-size", "16", "--val-fraction", "0.25",
            "--threads", "1"]


# --- the CLI in this process (for the tests) --------------------------------------------------

def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``finsentinel ARGS`` in this process, as the console script runs it (``main()``):
    any exception other than SystemExit would reach the user as a traceback."""
    from pipeline.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with (mock.patch.object(sys, "argv", ["finsentinel", *args]),
          mock.patch.dict(os.environ, env or {}),
          contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, stdout.getvalue(), stderr.getvalue()


# --- score flows ------------------------------------------------------------------------------

def flow_main(go: str, root: str, out_dir: str, *runs: str) -> None:
    """Wait for ``go`` to exist, then run the score flow for each ``DB_URL::INPUT`` in turn (all
    against the index ``cards``) and print each report as one JSON line."""
    from flows.score_transactions import score_transactions

    while not Path(go).exists():
        time.sleep(0.01)
    for n, run in enumerate(runs):
        db, path = run.split("::")
        report = score_transactions(input=path, index="cards", root=root, db=db,
                                    output=str(Path(out_dir) / f"{n}-{Path(path).stem}.parquet"),
                                    threshold=0.3)
        print("REPORT " + json.dumps({
            "db": db, "batch_id": report.batch_id, "rows_in": report.rows_in,
            "scored": report.rows_scored, "quarantined": report.rows_quarantined,
            "added": report.ledger_added, "present": report.ledger_already_present}), flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "ledger":
        ledger_main(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    elif mode == "index":
        index_main(*args)
    elif mode == "model":
        model_main(*args)
    elif mode == "flow":
        flow_main(*args)
    else:
        raise SystemExit(f"unknown mode {mode!r}")

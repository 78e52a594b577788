"""The work-pool set-up of docs/operations.md, for real: a Prefect server on PostgreSQL, a
process work pool, `prefect deploy --all` of prefect.yaml from the repository root, and a
worker that runs the hourly scoring deployment over a file dropped in the inbox, into a
PostgreSQL ledger. Everything runs as separate processes with the commands the docs give."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import polars as pl
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from pipeline import schema
from pipeline.ledger import Ledger
from pipeline.synthetic import SyntheticConfig, generate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_database(pg_admin):
    """A database of its own for the Prefect server's tables, dropped after."""
    name = f"fs_prefect_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = pg_admin.url.set(drivername="postgresql+asyncpg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with pg_admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_a_worker_runs_the_scoring_deployment_from_a_prefect_server_on_postgresql(
        prefect_database, pg_url, tmp_path):
    data = generate(SyntheticConfig(n_customers=80, n_terminals=160, n_days=40, seed=11))
    split = data[schema.TX_TIME].min().replace(hour=0, minute=0, second=0) + timedelta(days=33)
    data.filter(pl.col(schema.TX_TIME) < split).write_parquet(tmp_path / "history.parquet")
    feed = data.filter(pl.col(schema.TX_TIME) >= split).drop(schema.LABELS)
    work = tmp_path / "work"
    (work / "inbox").mkdir(parents=True)

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PATH": f"{BIN}:{os.environ['PATH']}",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}
    server_env = base | {"PREFECT_API_DATABASE_CONNECTION_URL": prefect_database}
    env = base | {"PREFECT_API_URL": api, "FINSENTINEL_WORKDIR": str(work),
                  "FINSENTINEL_DB": pg_url, "FINSENTINEL_INDEXES": str(tmp_path / "indexes"),
                  "FINSENTINEL_PSEUDONYM_KEY": "test-key-0123456789abcdef"}

    def run(*args: str, timeout: float = 300) -> str:
        done = subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
        env=server_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)

        run("finsentinel", "index", "build", "--input", str(tmp_path / "history.parquet"),
            "--name", "fraud")
        run("prefect", "work-pool", "create", "finsentinel", "--type", "process")
        deployed = run("prefect", "--no-prompt", "deploy", "--all")
        for name in ("score-hourly", "build-index-daily", "classify-news-15min",
                     "export-audit-monthly", "evaluate-weekly"):
            assert name in deployed
        feed.write_parquet(work / "inbox" / "feed.parquet")
        arrived = time.time() - 3600  # past the inbox's settle interval
        os.utime(work / "inbox" / "feed.parquet", (arrived, arrived))
        run("prefect", "deployment", "run", "score_inbox/score-hourly")
        worker = run("prefect", "worker", "start", "--pool", "finsentinel", "--run-once",
                     timeout=400)

        runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 20}, timeout=10).json()
        states = {r["name"]: (r["state_type"], r["deployment_id"] is not None) for r in runs}
        assert ("COMPLETED", True) in states.values(), (states, worker[-3000:])
        assert all(state == "COMPLETED" for state, _ in states.values() if state != "SCHEDULED")
    finally:
        server.terminate()
        server.wait(60)
        log.close()

    assert (work / "inbox" / "done" / "feed.parquet").exists()
    scores = pl.read_parquet(work / "scores" / "feed.scores.parquet")
    assert scores.height == feed.height
    with Ledger(pg_url) as ledger:
        assert ledger.count() == feed.height and ledger.verify().ok
        (batch,) = ledger.batches()
        assert batch["rows_scored"] == feed.height
    assert make_url(pg_url).drivername.startswith("postgresql")

"""Shared fixtures: the shared public data, the PostgreSQL test server, one Prefect harness."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PG_URL = os.environ.get("FINSENTINEL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"needs the shared public data at {SHARED_DATA} (absent on this checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pg_admin():
    url = make_url(PG_URL)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any failure to reach the server means: skip, not fail
        engine.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_URL} (set FINSENTINEL_TEST_PG_URL): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin):
    """A fresh PostgreSQL schema for this test (reached through search_path), dropped after."""
    schema = f"fs_test_{uuid.uuid4().hex[:12]}"
    with pg_admin.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with pg_admin.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A fresh, empty ledger database: a SQLite file or a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def read_only():
    """Make a file or folder unwritable for one test, undone after it: chmod for a user; for
    root, whom modes do not stop, the immutable attribute (chattr +i), where the file system
    and the process's capabilities allow it (else the test is skipped)."""
    undo = []

    def make(path: Path) -> Path:
        if os.geteuid() != 0:
            mode = path.stat().st_mode
            path.chmod(0o555 if path.is_dir() else 0o444)
            undo.append(lambda: path.chmod(mode))
            return path
        chattr = shutil.which("chattr")
        done = chattr and subprocess.run([chattr, "+i", str(path)], capture_output=True,
                                         text=True)
        if not done or done.returncode != 0:
            pytest.skip(f"running as root, where chmod does not stop writes, and chattr +i "
                        f"failed here ({done.stderr.strip() if done else 'no chattr'})")
        undo.append(lambda: subprocess.run([chattr, "-i", str(path)], check=True))
        return path

    yield make
    for step in reversed(undo):
        step()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (it takes ~15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def sentiment_model(shared_data, tmp_path_factory):
    """A sentiment model fine-tuned on a small balanced slice of PhraseBank's all-agree
    sentences (2 epochs, short texts: quick on CPU), published under a temporary models root,
    with held-out sentences it never saw. Shared by the sentiment and news tests."""
    import numpy as np

    from pipeline.sentiment.data import load_labelled
    from pipeline.sentiment.train import TrainConfig, train_classifier

    data = load_labelled(shared_data / "sentiment/financial-phrasebank/Sentences_AllAgree.txt")
    rng = np.random.default_rng(7)
    train_idx, held_idx = [], []
    for label in range(3):
        members = rng.permutation(np.flatnonzero(data.labels == label))
        train_idx += members[:70].tolist()
        held_idx += members[70:120].tolist()
    train = data.subset(train_idx)
    trained = train_classifier(train, TrainConfig(epochs=2, max_length=32, batch_size=16,
                                                  val_fraction=0.15, seed=0))
    root = tmp_path_factory.mktemp("models")
    version, directory = trained.publish(root / "fpb-small")
    return {"root": root, "name": "fpb-small", "version": version, "directory": directory,
            "trained": trained, "train": train, "held_out": data.subset(held_idx)}

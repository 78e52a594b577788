"""Crash safety with real processes killed by SIGKILL: while an index or a sentiment model is
being written, and while the ledger is recording a batch. The previous
state must stay intact and loadable, and the next run must complete."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import artifacts
from pipeline.features import compute_features
from pipeline.index import FraudIndex
from pipeline.ledger import DEFAULT_DB_ENV, Ledger
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).with_name("reliability_workers.py")
sys.path.insert(0, str(WORKERS.parent))
import reliability_workers as workers  # noqa: E402


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop(DEFAULT_DB_ENV, None)
    proc = subprocess.Popen([sys.executable, str(WORKERS), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.lines = queue.Queue()  # stdout lines, read as they come (None at EOF)

    def read() -> None:
        for line in proc.stdout:
            proc.lines.put(line.strip())
        proc.lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return proc


def wait_for(proc: subprocess.Popen, prefix: str, timeout: float = 60.0) -> str:
    """The child's next stdout line starting with ``prefix`` (fails if it exits first)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = proc.lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            proc.wait(5)
            raise AssertionError(f"child exited ({proc.returncode}) before {prefix!r}: "
                                 f"{proc.stderr.read()[-3000:]}")
        if line.startswith(prefix):
            return line
    proc.kill()
    raise AssertionError(f"child never printed {prefix!r} within {timeout} s")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


# --- index publish --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    """A small and a large index of labelled history (so versions can be told apart by size);
    the large one is saved under a source root, from which the children publish it again."""
    source = tmp_path_factory.mktemp("crash-index")
    data = compute_features(generate(SyntheticConfig(n_customers=150, n_terminals=300,
                                                     n_days=25, seed=5)))
    small = FraudIndex.build(data.head(data.height // 2), encoder=None,
                             vector_config=VectorConfig(text_dim=0))
    large = FraudIndex.build(data, encoder=None, vector_config=VectorConfig(text_dim=0))
    large.save("cards", source)
    return small, large, source


def assert_live(root: Path, version: str, size: int) -> None:
    """CURRENT names ``version``, which loads (every hash checked) with ``size`` vectors."""
    assert artifacts.current_version(root, "cards") == version
    assert FraudIndex.load("cards", root).size == size


@pytest.mark.parametrize("point", ["write", "staged", "renamed", "switched"])
def test_sigkill_during_index_publish_keeps_a_loadable_version(histories, tmp_path, point):
    first, large, source = histories
    root = tmp_path / "indexes"
    previous = first.save("cards", root)

    child = start("index", point, str(root), str(source))
    wait_for(child, f"PAUSED {point}")
    kill(child)

    versions = {p.name for p in (root / "cards").iterdir() if p.is_dir()
                and not p.name.startswith(".")}
    if point == "switched":  # the new version was complete before CURRENT named it
        assert len(versions) == 2
        assert_live(root, max(versions), large.size)
    else:
        assert_live(root, previous, first.size)
        if point == "renamed":  # complete, hash-checked, just not live
            (orphan,) = versions - {previous}
            artifacts.resolve(root, "cards", orphan)
        else:
            assert versions == {previous}
            leftovers = [p for p in (root / "cards").iterdir() if p.name.startswith(".")]
            assert leftovers and all(p.is_dir() for p in leftovers)  # the dead child's staging

    # The next run completes, becomes live, and removes what the killed writer left behind.
    newest = first.save("cards", root)
    assert_live(root, newest, first.size)
    assert [p.name for p in (root / "cards").iterdir() if p.name.startswith(".")] == []


def test_sigkill_at_random_moments_of_back_to_back_publishes(histories, tmp_path):
    first, large, source = histories
    root = tmp_path / "indexes"
    first.save("cards", root)
    rng = random.Random(20240611)
    for _ in range(3):
        child = start("index", "loop", str(root), str(source))
        wait_for(child, "SAVED")
        started = time.monotonic()
        wait_for(child, "SAVED")
        one_save = time.monotonic() - started
        time.sleep(rng.uniform(0, 2 * one_save))
        kill(child)
        version = artifacts.current_version(root, "cards")
        assert_live(root, version, large.size)
    newest = first.save("cards", root)
    assert_live(root, newest, first.size)
    assert [p.name for p in (root / "cards").iterdir() if p.name.startswith(".")] == []


# --- ledger ---------------------------------------------------------------------------------

def ledger_state(url: str) -> tuple[dict[str, int], int]:
    """Decisions per batch, and the number of decisions, after checking the chain."""
    with Ledger(url) as ledger:
        report = ledger.verify()
        assert report.ok, report.reason
        per_batch: dict[str, int] = {}
        for row in ledger.decisions():
            per_batch[row["batch_id"]] = per_batch.get(row["batch_id"], 0) + 1
        recorded = {b["batch_id"]: b["rows_scored"] for b in ledger.batches()}
        assert recorded == per_batch
        quarantined = {q["batch_id"] for q in ledger.quarantined()}
        assert quarantined == set(per_batch)
        return per_batch, report.checked


def test_sigkill_inside_a_ledger_batch_leaves_it_absent_and_the_rerun_adds_it_once(db_url):
    with Ledger(db_url) as ledger:
        workers.record(ledger, "b0", 120)
    child = start("ledger", db_url, "pause", "1", "1", "300")
    wait_for(child, "PAUSED ledger-insert")
    kill(child)

    per_batch, total = ledger_state(db_url)
    # Nothing of b1, not even the decisions its transaction had already inserted.
    assert per_batch == {"b0": 120} and total == 120

    with Ledger(db_url) as ledger:  # the lock the dead writer held is free again
        assert workers.record(ledger, "b1", 300).added == 300
        again = workers.record(ledger, "b1", 300)
        assert again.added == 0 and again.already_present == 300
    per_batch, total = ledger_state(db_url)
    assert per_batch == {"b0": 120, "b1": 300} and total == 420


def test_sigkill_at_a_random_moment_of_a_stream_of_batches(db_url):
    n, size = 40, 150
    child = start("ledger", db_url, "loop", "0", str(n), str(size))
    wait_for(child, "RECORDED b1")
    time.sleep(random.Random(7).uniform(0.05, 0.4))
    kill(child)

    per_batch, _ = ledger_state(db_url)
    assert set(per_batch.values()) == {size}  # each batch whole or absent
    assert sorted(per_batch, key=lambda b: int(b[1:])) == [f"b{i}" for i in range(len(per_batch))]
    assert 2 <= len(per_batch) < n, "the kill should land mid-stream"

    with Ledger(db_url) as ledger:  # the next run records everything, each batch once
        added = [workers.record(ledger, f"b{i}", size).added for i in range(n)]
    assert added == [0] * len(per_batch) + [size] * (n - len(per_batch))
    per_batch, total = ledger_state(db_url)
    assert per_batch == {f"b{i}": size for i in range(n)} and total == n * size


# --- sentiment model publish ------------------------------------------------------------------

def tiny_sentiment_csv(path: Path) -> Path:
    """A small separable text,label file: enough for one quick epoch, not for quality."""
    import csv

    words = {"negative": ["losses widen", "profit warning", "shares plunge", "sales collapse"],
             "positive": ["record profit", "shares surge", "dividend raised", "sales beat"],
             "neutral": ["annual meeting held", "board meets", "report published", "office moved"]}
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for label, phrases in words.items():
            for i in range(16):
                writer.writerow([f"Company {chr(65 + i)} {phrases[i % 4]}", label])
    return path


def test_sigkill_while_saving_a_model_keeps_the_previous_version(tmp_path):
    from pipeline.sentiment.backends import load_classifier, resolve_model

    data = tiny_sentiment_csv(tmp_path / "tiny.csv")
    output = tmp_path / "models" / "tiny"
    code, _, err = workers.run_cli(*workers.model_train_args(str(data), str(output)))
    assert code == 0, err
    previous = artifacts.current_version(output.parent, "tiny")
    before = load_classifier("encoder", str(output)).classify(["Company Z shares surge"])

    child = start("model", "weights", str(data), str(output))
    wait_for(child, "PAUSED weights", timeout=180)
    kill(child)

    # The half-written model is a hidden staging directory; the live version is untouched.
    assert artifacts.current_version(output.parent, "tiny") == previous
    staging = [p for p in output.iterdir() if p.name.startswith(".")]
    assert staging and any((p / "model.safetensors").exists() for p in staging)
    directory, manifest = resolve_model(output)  # every file checked against the manifest
    assert directory.name == previous
    after = load_classifier("encoder", str(output)).classify(["Company Z shares surge"])
    assert after[0].probabilities == before[0].probabilities

    # The next run publishes a new live version and clears what the killed writer left.
    code, _, err = workers.run_cli(*workers.model_train_args(str(data), str(output)))
    assert code == 0, err
    newest = artifacts.current_version(output.parent, "tiny")
    assert newest != previous and resolve_model(output)[0].name == newest
    assert [p.name for p in output.iterdir() if p.name.startswith(".")] == []


def test_atomic_path_syncs_the_new_file_before_the_rename_and_the_folder_after(
        tmp_path, monkeypatch):
    """A rename is atomic for processes, not for a power loss: without the syncs, an output
    file (scores, exports) could be found renamed but empty after a crash of the machine."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: (
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(artifacts.os, "replace", lambda a, b: (
        events.append(("replace", os.path.realpath(b))), real_replace(a, b)))
    target = tmp_path / "out.csv"
    with artifacts.atomic_path(target) as tmp:
        tmp.write_text("a,b\n1,2\n")
        temporary = os.path.realpath(tmp)
    assert target.read_text() == "a,b\n1,2\n"
    assert events == [("fsync", temporary), ("replace", os.path.realpath(target)),
                      ("fsync", os.path.realpath(tmp_path))]

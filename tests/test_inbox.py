"""The inbox takes a file only once it has been quiet for the settle interval: a file still
being copied in (scp, cp, an SFTP drop) is left where it is, logged with when it will be
eligible, and a file changed or replaced while it is read is not archived as done."""

from __future__ import annotations

import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.inbox import (
    DATA_SUFFIXES,
    DEFAULT_SETTLE_SECONDS,
    SETTLE_ENV,
    drain,
    pending,
    settle_interval,
)
from pipeline.ingest import InputError


def _aged(path: Path, seconds: float) -> Path:
    """Set ``path``'s mtime to ``seconds`` ago (negative: in the future)."""
    when = time.time() - seconds
    os.utime(path, (when, when))
    return path


def _eligible(path: Path, settle: float) -> str:
    return datetime.fromtimestamp(math.ceil(path.stat().st_mtime + settle), UTC) \
        .strftime("%Y-%m-%dT%H:%M:%SZ")


class _State:
    """Just enough of a Prefect state for drain."""

    def __init__(self, value: object, ok: bool = True):
        self.value, self.ok = value, ok

    def is_completed(self) -> bool:
        return self.ok

    def result(self, raise_on_failure: bool = True) -> object:
        return self.value


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def test_pending_takes_only_files_quiet_for_the_settle_interval(inbox, capsys):
    for name, age in (("quiet.csv", 600), ("edge.parquet", 61), ("copying.csv", 5),
                      ("skewed.jsonl", -30), (".hidden.csv", 600), ("x.csv.part", 600)):
        (inbox / name).write_text("id\n1\n")
        _aged(inbox / name, age)

    assert [p.name for p in pending(inbox, settle_seconds=60)] == ["quiet.csv", "edge.parquet"]
    out = capsys.readouterr().out
    # Each file left is logged with the reason and when it becomes eligible.
    for name in ("copying.csv", "skewed.jsonl"):
        [line] = [ln for ln in out.splitlines() if name in ln]
        assert "settle interval" in line and _eligible(inbox / name, 60) in line
    assert "in the future" in out  # a producer's clock ahead of ours is named as such
    assert "quiet.csv" not in out and "hidden" not in out
    # Left in place, untouched, for the next run.
    assert sorted(p.name for p in inbox.iterdir()) == [
        ".hidden.csv", "copying.csv", "edge.parquet", "quiet.csv", "skewed.jsonl", "x.csv.part"]

    # 0 turns the check off: every data file, oldest first.
    assert [p.name for p in pending(inbox, settle_seconds=0)] == [
        "quiet.csv", "edge.parquet", "copying.csv", "skewed.jsonl"]


def test_settle_interval_comes_from_the_parameter_else_the_environment(monkeypatch):
    monkeypatch.delenv(SETTLE_ENV, raising=False)
    assert settle_interval() == DEFAULT_SETTLE_SECONDS == 60
    monkeypatch.setenv(SETTLE_ENV, " ")  # blank means unset
    assert settle_interval() == 60
    monkeypatch.setenv(SETTLE_ENV, "0")
    assert settle_interval() == 0
    monkeypatch.setenv(SETTLE_ENV, "90.5")
    assert settle_interval() == 90.5
    assert settle_interval(5) == 5 and settle_interval(0) == 0  # a flow parameter wins
    for bad in ("-1", "soon", "nan", "inf"):
        monkeypatch.setenv(SETTLE_ENV, bad)
        with pytest.raises(ValueError, match=SETTLE_ENV):
            settle_interval()
    with pytest.raises(ValueError, match="settle"):
        settle_interval(-3)


def test_a_file_written_to_after_it_was_listed_is_left_for_the_next_run(inbox, capsys):
    """Quiet when listed, written to again before this run reaches it (the copy resumed, or a
    producer appends): not read now, left in place, eligible once quiet again."""
    for age, name in ((600, "a.csv"), (590, "b.csv"), (580, "c.csv")):
        (inbox / name).write_text("id\n1\n")
        _aged(inbox / name, age)
    files = pending(inbox, settle_seconds=60)
    assert [p.name for p in files] == ["a.csv", "b.csv", "c.csv"]
    with (inbox / "b.csv").open("a") as growing:
        growing.write("2\n")
    (inbox / "c.csv").unlink()  # removed meanwhile (another run took it): skipped, not failed
    seen: list[str] = []

    def run(path: Path) -> _State:
        seen.append(path.name)
        return _State(path.name)

    assert drain(files, run, what="transactions", inbox=inbox, unusable=InputError,
                 settle_seconds=60) == ["a.csv"]
    assert seen == ["a.csv"]
    assert (inbox / "b.csv").read_text() == "id\n1\n2\n"
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.csv"]
    assert not (inbox / "failed").exists()
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if "b.csv" in ln]
    assert "settle interval" in line and _eligible(inbox / "b.csv", 60) in line


def test_a_file_replaced_while_it_is_read_stays_in_the_inbox(inbox, capsys):
    """The producer renames a new drop over the name (the documented convention) or rewrites it
    while this run reads the old one: the new file is not moved to done/ (nor failed/)
    unread; it stays for the next run."""
    for age, name in ((600, "feed.csv"), (590, "wire.csv"), (580, "other.csv")):
        (inbox / name).write_text("id\n1\n")
        _aged(inbox / name, age)
    upload = inbox.parent / "upload.csv"

    def run(path: Path) -> _State:
        if path.name == "feed.csv":  # a complete new drop renamed over it mid-read
            upload.write_text("id\n2\n3\n")
            os.replace(upload, path)
            return _State("feed")
        if path.name == "wire.csv":  # rewritten in place mid-read: what was read is garbage
            path.write_text("id\n4\n")
            return _State(InputError("wire.csv: truncated row"), ok=False)
        return _State(path.name)

    assert drain(pending(inbox), run, what="transactions", inbox=inbox,
                 unusable=InputError) == ["feed", "other.csv"]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["other.csv"]
    assert not (inbox / "failed").exists()
    assert (inbox / "feed.csv").read_text() == "id\n2\n3\n"
    assert (inbox / "wire.csv").read_text() == "id\n4\n"
    out = capsys.readouterr().out
    assert "feed.csv" in out and "wire.csv" in out and "changed while" in out


def test_inbox_files_taken_by_an_overlapping_run_are_skipped_not_crashed_on(tmp_path):
    """Two runs of an inbox job overlap (a slow hourly run, the next one starts): a file the
    other run has already moved, or moves while this one works on it, is not an error, and
    every other file is still done."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.csv", "b.csv", "c.csv", "d.csv"):
        (inbox / name).write_text("x\n")
        time.sleep(0.01)  # distinct mtimes: pending() is oldest first
    files = pending(inbox)
    other = tmp_path / "other-run-done"
    other.mkdir()
    (inbox / "a.csv").rename(other / "a.csv")  # taken before this run reaches it
    seen = []

    def run(path: Path) -> _State:
        seen.append(path.name)
        if path.name == "b.csv":  # the other run finishes it while this one scores it
            path.rename(other / path.name)
            return _State("b")
        if path.name == "c.csv":
            path.rename(other / path.name)
            return _State(InputError("c.csv: no such file"), ok=False)
        return _State(path.name)

    assert drain(files, run, what="transactions", inbox=inbox, unusable=InputError) \
        == ["b", "d.csv"]
    assert seen == ["b.csv", "c.csv", "d.csv"]  # a.csv was gone: not even tried
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["d.csv"]
    assert not (inbox / "failed").exists()
    assert sorted(p.name for p in other.iterdir()) == ["a.csv", "b.csv", "c.csv"]


def test_the_inbox_takes_every_file_type_the_readers_read(inbox):
    """A file `finsentinel score` reads (feed.pq, say) must not sit in the inbox forever,
    neither scored nor moved to failed/: the inbox takes every suffix the readers know."""
    from pipeline.ingest import _READERS

    assert set(DATA_SUFFIXES) == set(_READERS)
    (inbox / "feed.pq").write_bytes(b"PAR1")
    (inbox / "FEED.CSV").write_text("id\n1\n")
    (inbox / "notes.txt").write_text("not data")
    assert sorted(p.name for p in pending(inbox)) == ["FEED.CSV", "feed.pq"]


def test_symlinks_in_the_inbox_are_never_read_or_moved(inbox, tmp_path, capsys):
    """Whoever may drop files into the inbox could drop a link to any file the job can read
    (another feed, a secret): it was scored, its rows (quarantined ones verbatim) written to
    the outputs and the ledger, and the link moved to done/. A link is left alone, logged."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.csv"
    secret.write_text("id\n1\n")
    _aged(secret, 600)
    (inbox / "feed.csv").symlink_to(secret)
    (inbox / "dangling.csv").symlink_to(outside / "gone.csv")
    (inbox / "real.csv").write_text("id\n2\n")
    _aged(inbox / "real.csv", 600)

    assert [p.name for p in pending(inbox, settle_seconds=60)] == ["real.csv"]
    out = capsys.readouterr().out
    assert "feed.csv" in out and "symbolic link" in out and "secret" not in out

    # Made a link after it was listed (a regular file swapped for one): not read either.
    files = pending(inbox, settle_seconds=60)
    (inbox / "real.csv").unlink()
    (inbox / "real.csv").symlink_to(secret)
    seen: list[str] = []
    assert drain(files, lambda path: seen.append(path.name) or _State(path.name),
                 what="transactions", inbox=inbox, unusable=InputError,
                 settle_seconds=60) == []
    assert seen == [] and not (inbox / "done").exists() and not (inbox / "failed").exists()
    assert (inbox / "real.csv").is_symlink() and secret.read_text() == "id\n1\n"
    assert "real.csv" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["~$feed.csv", "~feed.csv"])
def test_office_lock_and_temporary_files_are_left_alone(inbox, name):
    """Excel opening feed.csv writes a ``~$feed.csv`` lock file beside it (other tools
    ``~name``): it was taken as a feed and moved to failed/ from under the editor."""
    (inbox / name).write_bytes(b"\x05alice" + b"\x00" * 40)
    _aged(inbox / name, 600)
    assert pending(inbox, settle_seconds=60) == []

"""An inbox directory for scheduled jobs: files dropped into it are picked up by the next run
and moved to ``done/`` once their results are written and recorded (or to ``failed/``, with the
reason beside them, when the file itself is unusable).

Moving happens after the ledger write, so a run that dies in between leaves the file in the
inbox; the next run scores it again and the ledger, which keys batches by their rows, adds
nothing twice.

A file is taken only once it has been quiet for the settle interval (its mtime at least that
old, checked when listed and again just before it is read), so a producer that copies straight
into the inbox (scp, cp, an SFTP drop) does not have its half-written file read as a truncated
batch; and a file changed or replaced while it was read is left for the next run rather than
archived unread.
"""

from __future__ import annotations

import math
import os
import shutil
import stat as stat_
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".parquet", ".pq", ".csv", ".jsonl", ".ndjson", ".json")  # what ingest reads
DONE = "done"
FAILED = "failed"
SETTLE_ENV = "FINSENTINEL_INBOX_SETTLE_SECONDS"
# Long enough for a copy that is still going to have touched the file since (a stalled
# transfer pausing longer than this is not caught: such producers should write a dot-file or
# .tmp/.part and rename it when complete), short against the hourly and 15-minute schedules.
DEFAULT_SETTLE_SECONDS = 60.0


def settle_interval(given: float | None = None) -> float:
    """Seconds a file must have been unmodified before the inbox jobs take it: ``given`` (a flow
    parameter), else $FINSENTINEL_INBOX_SETTLE_SECONDS, else DEFAULT_SETTLE_SECONDS; 0 turns
    the check off. A negative, non-numeric or infinite value is refused (ValueError)."""
    if given is not None:
        where, value = "settle_seconds", str(given)
    else:
        where, value = f"${SETTLE_ENV}", os.environ.get(SETTLE_ENV, "").strip()
        if not value:
            return DEFAULT_SETTLE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{where} must be a number of seconds >= 0 (0 takes files at once), "
                         f"got {value!r}")
    return seconds


def pending(inbox: str | Path, suffixes: tuple[str, ...] = DATA_SUFFIXES, *,
            settle_seconds: float = 0.0) -> list[Path]:
    """Data files directly in ``inbox``, oldest first (then by name). Hidden files and files
    still being written (``.tmp``/``.part``, or a name starting with a dot) are left alone, as
    are lock and temporary files named ``~…`` (an editor's ``~$feed.csv``) and anything but a
    regular file: a symbolic link (which could point at any file the job may read) is logged
    and never read or moved. So, with ``settle_seconds`` > 0, is a file modified less than that
    long ago (it may still be being copied in): it is logged with when it becomes eligible and
    left for a later run."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise FileNotFoundError(f"inbox {inbox} is not a directory: create it or set the "
                                "inbox setting (see docs/operations.md)")
    found = []
    now = time.time()
    for p in inbox.iterdir():
        if p.name.startswith((".", "~")) or p.suffix.lower() not in suffixes:
            continue
        stat = _stat(p)
        if stat is None:  # moved away meanwhile (an overlapping run took it)
            continue
        if not stat_.S_ISREG(stat.st_mode):
            if stat_.S_ISLNK(stat.st_mode):
                print(f"inbox {inbox}: {_not_regular(p, stat)}")
            continue
        unsettled = _unsettled(p, stat, settle_seconds, now)
        if unsettled:
            print(f"inbox {inbox}: {unsettled}")
            continue
        found.append((stat.st_mtime, p.name, p))
    return [p for _, _, p in sorted(found)]


def _unsettled(path: Path, stat: os.stat_result, settle_seconds: float, now: float
               ) -> str | None:
    """Why ``path`` is not taken yet (modified within the settle interval), with when it
    becomes eligible; None when it is quiet enough, or the check is off."""
    if settle_seconds <= 0:
        return None
    age = now - stat.st_mtime
    if age >= settle_seconds:
        return None
    eligible = datetime.fromtimestamp(math.ceil(stat.st_mtime + settle_seconds), UTC)
    when = (f"modified {age:.0f} s ago" if age >= 0 else
            f"modified {-age:.0f} s in the future (is the producer's clock ahead?)")
    return (f"leaving {path.name} ({stat.st_size} bytes) for a later run: {when}, within the "
            f"{settle_seconds:g} s settle interval (it may still be being written); eligible "
            f"from {eligible:%Y-%m-%dT%H:%M:%SZ}")


def _not_regular(path: Path, stat: os.stat_result) -> str:
    """Why ``path`` is not read (where a link points is not said)."""
    what = "a symbolic link" if stat_.S_ISLNK(stat.st_mode) else "not a regular file"
    return (f"leaving {path.name} alone: {what}; only regular files dropped into the inbox "
            "are read")


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten, appended to or replaced by another."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _stat(path: Path) -> os.stat_result | None:
    """The entry's own status (a link is not followed); None when it is gone."""
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def archive(path: str | Path, folder: str = DONE, reason: str | None = None) -> Path:
    """Move ``path`` into ``folder`` beside it (``done`` or ``failed``); a name already there
    gets a UTC time stamp so nothing is overwritten. ``reason`` is written next to it."""
    path = Path(path)
    target_dir = path.parent / folder
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    if target.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        target = target_dir / f"{path.stem}.{stamp}{path.suffix}"
    shutil.move(path, target)
    if reason is not None:
        target.with_name(target.name + ".error.txt").write_text(reason + "\n")
    return target


def output_for(path: str | Path, directory: str | Path, suffix: str) -> Path:
    """Where the results of inbox file ``path`` go: ``directory/<stem><suffix>``, or, when an
    earlier file of that stem already wrote there, ``<stem>.<file's UTC mtime><suffix>``: a
    feed dropped again under the same name keeps every drop's results (never beside an
    earlier drop's quarantine file), and a file retried run after run (same mtime) rewrites
    one name rather than adding a file per run."""
    path, directory = Path(path), Path(directory)
    target = directory / f"{path.stem}{suffix}"
    if not target.exists():
        return target
    try:
        when = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:  # taken by another run meanwhile: its run will be skipped
        when = datetime.now(UTC)
    stamp = when.strftime("%Y%m%dT%H%M%S%f")
    return directory / f"{path.stem}.{stamp}{suffix}"


def drain(files: list[Path], run: Callable[[Path], Any], *, what: str, inbox: Path,
          unusable: type[BaseException], settle_seconds: float = 0.0) -> list[Any]:
    """Run ``run(path)`` for each file, which returns a Prefect state (``return_state=True``).
    A completed file moves to ``done``; one that failed with ``unusable`` (the file itself is
    bad) moves to ``failed`` with the reason; any other failure leaves it for the next run.
    Raises after trying every file when any failed; returns the completed results.

    Just before a file is read it must still be quiet for ``settle_seconds`` (written to since
    :func:`pending` listed it: left for a later run, logged). A file that changed or was
    replaced while it was read (a new drop renamed over it, say) is not archived: what was
    read may not be what is there now, so it stays for the next run to read whole (the same
    rows again add nothing to the ledger; a file that grew is a new batch), and a failure then
    is not counted against it.

    A file that is gone before or after its run was taken by an overlapping run of the same
    job (the previous hour's run still going, say), which moves it: it is skipped, not failed;
    one that is no longer a regular file (swapped for a symbolic link) is left alone, logged."""
    results, failures, taken, waiting, changed, refused = [], [], [], [], [], []
    for path in files:
        before = _stat(path)
        if before is None:
            taken.append(path.name)
            continue
        if not stat_.S_ISREG(before.st_mode):
            print(f"{what} inbox {inbox}: {_not_regular(path, before)}")
            refused.append(path.name)
            continue
        unsettled = _unsettled(path, before, settle_seconds, time.time())
        if unsettled:
            print(f"{what} inbox {inbox}: {unsettled}")
            waiting.append(path.name)
            continue
        state = run(path)
        after = _stat(path)
        completed = state.is_completed()
        if completed:
            results.append(state.result())
        if after is None:  # another run moved it meanwhile (and any failure came from that)
            taken.append(path.name)
            continue
        if _identity(after) != _identity(before):
            print(f"{what} inbox {inbox}: {path.name} changed while it was being read "
                  f"({before.st_size} -> {after.st_size} bytes): left in the inbox for the "
                  "next run to read again")
            changed.append(path.name)
            continue
        if completed:
            if not _archive_if_present(path):
                taken.append(path.name)
            continue
        error = state.result(raise_on_failure=False)
        failures.append(f"{path.name}: {error}")
        if isinstance(error, unusable):
            _archive_if_present(path, FAILED, reason=str(error))
    print(f"{what} inbox {inbox}: {len(files)} file(s), {len(results)} done, "
          f"{len(failures)} failed"
          + (f", {len(waiting)} left to settle" if waiting else "")
          + (f", {len(changed)} changed while read, left for the next run" if changed else "")
          + (f", {len(refused)} not regular files, left alone" if refused else "")
          + (f", {len(taken)} taken by another run ({', '.join(taken)})" if taken else ""))
    if failures:
        raise RuntimeError(f"{len(failures)} {what} file(s) failed: " + "; ".join(failures))
    return results


def _archive_if_present(path: Path, folder: str = DONE, reason: str | None = None
                        ) -> Path | None:
    """:func:`archive`, or None when ``path`` is already gone (another run moved it)."""
    try:
        return archive(path, folder, reason)
    except FileNotFoundError:
        if path.exists():  # something else is missing: a real error
            raise
        return None

"""An inbox directory for scheduled jobs: files dropped into it are picked up by the next run
and moved to ``done/`` once their results are written and recorded (or to ``failed/``, with the
reason beside them, when the file itself is unusable).

Moving happens after the ledger write, so a run that dies in between leaves the file in the
inbox; the next run scores it again and the ledger, which keys batches by their rows, adds
nothing twice.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json")
DONE = "done"
FAILED = "failed"


def pending(inbox: str | Path, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> list[Path]:
    """Data files directly in ``inbox``, oldest first (then by name). Hidden files and files
    still being written (``.tmp``/``.part``, or a name starting with a dot) are left alone."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise FileNotFoundError(f"inbox {inbox} is not a directory: create it or set the "
                                "inbox setting (see docs/operations.md)")
    found = []
    for p in inbox.iterdir():
        if p.name.startswith(".") or p.suffix.lower() not in suffixes:
            continue
        try:
            if p.is_file():
                found.append((p.stat().st_mtime, p.name, p))
        except FileNotFoundError:  # moved away meanwhile (an overlapping run took it)
            continue
    return [p for _, _, p in sorted(found)]


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
          unusable: type[BaseException]) -> list[Any]:
    """Run ``run(path)`` for each file, which returns a Prefect state (``return_state=True``).
    A completed file moves to ``done``; one that failed with ``unusable`` (the file itself is
    bad) moves to ``failed`` with the reason; any other failure leaves it for the next run.
    Raises after trying every file when any failed; returns the completed results.

    A file that is gone before or after its run was taken by an overlapping run of the same
    job (the previous hour's run still going, say), which moves it: it is skipped, not failed."""
    results, failures, taken = [], [], []
    for path in files:
        if not path.exists():
            taken.append(path.name)
            continue
        state = run(path)
        if state.is_completed():
            results.append(state.result())
            if not _archive_if_present(path):
                taken.append(path.name)
            continue
        if not path.exists():  # failed because another run moved it meanwhile
            taken.append(path.name)
            continue
        error = state.result(raise_on_failure=False)
        failures.append(f"{path.name}: {error}")
        if isinstance(error, unusable):
            _archive_if_present(path, FAILED, reason=str(error))
    print(f"{what} inbox {inbox}: {len(files)} file(s), {len(results)} done, "
          f"{len(failures)} failed" + (f", {len(taken)} taken by another run ("
                                       f"{', '.join(taken)})" if taken else ""))
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

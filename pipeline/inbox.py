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
    files = [p for p in inbox.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


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


def drain(files: list[Path], run: Callable[[Path], Any], *, what: str, inbox: Path,
          unusable: type[BaseException]) -> list[Any]:
    """Run ``run(path)`` for each file, which returns a Prefect state (``return_state=True``).
    A completed file moves to ``done``; one that failed with ``unusable`` (the file itself is
    bad) moves to ``failed`` with the reason; any other failure leaves it for the next run.
    Raises after trying every file when any failed; returns the completed results."""
    results, failures = [], []
    for path in files:
        state = run(path)
        if state.is_completed():
            results.append(state.result())
            archive(path)
            continue
        error = state.result(raise_on_failure=False)
        failures.append(f"{path.name}: {error}")
        if isinstance(error, unusable):
            archive(path, FAILED, reason=str(error))
    print(f"{what} inbox {inbox}: {len(files)} file(s), {len(results)} done, "
          f"{len(failures)} failed")
    if failures:
        raise RuntimeError(f"{len(failures)} {what} file(s) failed: " + "; ".join(failures))
    return results

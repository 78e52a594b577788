"""Versioned, hash-checked artifact directories (FAISS indexes, trained models).

An artifact named NAME lives in ``<root>/NAME/<version>/`` with a ``manifest.json`` that records
the sha256 of every file. ``<root>/NAME/CURRENT`` names the live version and is replaced
atomically, so a crash while writing a new version leaves the previous one live and loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
KEEP_VERSIONS = 3


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, or does not match its manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file so that readers see either the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def new_version() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


@contextmanager
def publish(root: str | Path, name: str, manifest: dict[str, Any]) -> Iterator[Path]:
    """Write a new version of artifact ``name``: the caller fills the yielded directory; on
    success the files are hashed into the manifest, fsynced, and CURRENT is switched to it."""
    base = Path(root) / name
    base.mkdir(parents=True, exist_ok=True)
    version = new_version()
    staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{version}."))
    try:
        yield staging
        files = {}
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            rel = file.relative_to(staging).as_posix()
            files[rel] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        full = {**manifest, "name": name, "version": version, "files": files}
        (staging / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        _fsync_dir(staging)
        os.replace(staging, base / version)
        _fsync_dir(base)
        atomic_write_bytes(base / CURRENT, (version + "\n").encode())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _prune(base, keep=KEEP_VERSIONS)


def _prune(base: Path, keep: int) -> None:
    current = current_version(base.parent, base.name)
    versions = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in versions[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def current_version(root: str | Path, name: str) -> str:
    pointer = Path(root) / name / CURRENT
    if not pointer.exists():
        raise ArtifactError(f"no artifact named {name!r} under {Path(root)} (missing {pointer})")
    return pointer.read_text().strip()


def resolve(root: str | Path, name: str, version: str | None = None, *, verify: bool = True
            ) -> tuple[Path, dict[str, Any]]:
    """Locate a version (default: CURRENT) and return its directory and manifest, after checking
    every file against the manifest's sha256 (no file is trusted before that)."""
    version = version or current_version(root, name)
    directory = Path(root) / name / version
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise ArtifactError(f"artifact {name!r} version {version} is missing its manifest "
                            f"({manifest_path})")
    manifest = json.loads(manifest_path.read_text())
    if verify:
        verify_files(directory, manifest)
    return directory, manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    for rel, meta in manifest["files"].items():
        path = directory / rel
        if not path.exists():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != meta["sha256"]:
            raise ArtifactError(f"{path}: sha256 {actual[:12]}… does not match the manifest's "
                                f"{meta['sha256'][:12]}… (file changed or corrupted)")

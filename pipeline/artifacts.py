"""Versioned, hash-checked artifact directories (FAISS indexes, trained models).

An artifact named NAME lives in ``<root>/NAME/<version>/`` with a ``manifest.json`` that records
the sha256 of every file. ``<root>/NAME/CURRENT`` names the live version and is replaced
atomically, so a crash while writing a new version leaves the previous one live and loadable;
the next publish removes what the crashed writer left (its staging directory, temporary files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
# Old versions are pruned on publish. Replaying a recorded decision needs the exact version that
# scored it, so the default keeps many; $FINSENTINEL_KEEP_INDEX_VERSIONS sets it (0 keeps all).
KEEP_VERSIONS = 50
KEEP_VERSIONS_ENV = "FINSENTINEL_KEEP_INDEX_VERSIONS"


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


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write a file so that readers see either the old or the new content, never a torn one.
    ``mode``: its permission bits (default: mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_owned(path.name), suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
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
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds,
    once its content is on disk (synced before the rename, the folder after it: a power loss
    leaves the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_owned(path.name), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)


def new_version() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def check_name(value: str, what: str = "artifact name") -> str:
    """A name or version is one folder directly under its parent: never empty, ``.``, ``..``
    or a path (``../x`` from an environment variable or a ledger record would reach outside
    the root)."""
    if (not isinstance(value, str) or value.strip() in ("", ".", "..") or "/" in value
            or "\\" in value or "\x00" in value):
        raise ArtifactError(f"{what} {value!r}: expected a plain name (one folder under the "
                            "root, no '/', '\\' or '..')")
    return value


@contextmanager
def publish(root: str | Path, name: str, manifest: dict[str, Any]) -> Iterator[Path]:
    """Write a new version of artifact ``name``: the caller fills the yielded directory; on
    success the files are hashed into the manifest, fsynced, and CURRENT is switched to it.
    ``manifest`` is then updated with what was written (name, version, files): the caller's
    own version, whatever a concurrent publish has made CURRENT since. The version folder and
    CURRENT take the permissions of the artifact's folder (``root/name``)."""
    keep = keep_versions()  # a bad setting refuses the publish, before anything is live
    base = Path(root) / check_name(name)
    base.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(base)
    version = new_version()
    folder_mode = stat.S_IMODE(base.stat().st_mode)
    staging = Path(tempfile.mkdtemp(dir=base, prefix=_owned(version)))
    try:
        staging.chmod(folder_mode)  # not mkdtemp's 0700: readable by whoever reads the folder
        yield staging
        files = {}
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            rel = file.relative_to(staging).as_posix()
            files[rel] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        full = {**manifest, "name": name, "version": version, "files": files}
        with open(staging / MANIFEST, "w") as handle:
            handle.write(json.dumps(full, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(staging)
        os.replace(staging, base / version)
        _fsync_dir(base)
        atomic_write_bytes(base / CURRENT, (version + "\n").encode(), mode=folder_mode & 0o666)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest.update(name=name, version=version, files=files)
    _prune(base, keep=keep)


_HOST = socket.gethostname().replace(".", "_").replace("/", "_") or "localhost"
_OWNED = re.compile(r"\.[^/]+?\.(?P<pid>\d+)@(?P<host>[^./]+)\.[^./]*(\.tmp)?")
ABANDONED_TMP_S = 3600.0


def _owned(name: str) -> str:
    """Prefix of a temporary file or staging directory: hidden, and naming the process that
    writes it, so that what a killed writer leaves can be told from what a live one is writing."""
    return f".{name}.{os.getpid()}@{_HOST}."


def _remove_abandoned(base: Path) -> None:
    """Delete what killed writers left behind: staging directories and temporary files of
    processes of this host that no longer exist, and any temporary file older than an hour.
    Never a version directory or CURRENT."""
    for entry in base.iterdir():
        if not entry.name.startswith("."):
            continue
        match = _OWNED.fullmatch(entry.name)
        dead = match is not None and match["host"] == _HOST and not _alive(int(match["pid"]))
        if entry.is_dir() and dead:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and entry.name.endswith(".tmp") and (
                dead or time.time() - entry.stat().st_mtime > ABANDONED_TMP_S):
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def keep_versions() -> int:
    """How many versions publishing keeps: $FINSENTINEL_KEEP_INDEX_VERSIONS, else
    KEEP_VERSIONS; 0 keeps every version."""
    configured = os.environ.get(KEEP_VERSIONS_ENV, "").strip()
    if not configured:
        return KEEP_VERSIONS
    try:
        keep = int(configured)
    except ValueError:
        keep = -1
    if keep < 0:
        raise ArtifactError(f"${KEEP_VERSIONS_ENV} must be a whole number >= 0 (0 keeps every "
                            f"version), got {configured!r}")
    return keep


def _prune(base: Path, keep: int) -> None:
    if keep == 0:
        return
    current = current_version(base.parent, base.name)
    versions = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in versions[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def current_version(root: str | Path, name: str) -> str:
    pointer = Path(root) / check_name(name) / CURRENT
    if not pointer.exists():
        raise ArtifactError(f"no artifact named {name!r} under {Path(root)} (missing {pointer})")
    return check_name(pointer.read_text().strip(), f"{CURRENT} of {name!r} names version")


def resolve(root: str | Path, name: str, version: str | None = None, *, verify: bool = True,
            require: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Locate a version (default: CURRENT) and return its directory and manifest, after checking
    every file against the manifest's sha256 (no file is trusted before that). ``require``
    names the files the caller will load: each must be listed, so none is loaded unchecked."""
    version = check_name(version, "version") if version else current_version(root, name)
    directory = Path(root) / check_name(name) / version
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise ArtifactError(f"artifact {name!r} version {version} is missing its manifest "
                            f"({manifest_path})")
    manifest = read_manifest(manifest_path)
    unlisted = [rel for rel in require if rel not in manifest.get("files", {})]
    if unlisted:
        raise ArtifactError(f"artifact {name!r} version {version}: {', '.join(unlisted)} not "
                            "listed in the manifest, so it cannot be checked before loading")
    if verify:
        verify_files(directory, manifest)
    return directory, manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest, or an ArtifactError naming it where it is not one (cut short by a crash or a
    full disk, or of another shape): a JSON object whose ``files`` maps each file to its
    sha256."""
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not a readable manifest ({exc}); the artifact is "
                            "incomplete or corrupted") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(meta, dict) and isinstance(meta.get("sha256"), str)
            for meta in files.values()):
        raise ArtifactError(f"{path}: expected a JSON object whose 'files' maps each file to "
                            "its sha256; the artifact is incomplete or corrupted")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    for rel, meta in manifest["files"].items():
        path = directory / rel
        if not path.exists():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != meta["sha256"]:
            raise ArtifactError(f"{path}: sha256 {actual[:12]}… does not match the manifest's "
                                f"{meta['sha256'][:12]}… (file changed or corrupted)")

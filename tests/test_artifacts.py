"""Versioned artifacts: what a publish leaves on disk, and clear errors for broken manifests."""

from __future__ import annotations

import json
import os
import stat

import pytest

from pipeline import artifacts


def publish_text(root, name: str = "thing", text: str = "x") -> str:
    with artifacts.publish(root, name, {"kind": "test"}) as staging:
        (staging / "x.txt").write_text(text)
    return artifacts.current_version(root, name)


@pytest.mark.parametrize("content", ["", '{"kind": "test", "files": {"x.t', "[1, 2]",
                                     '{"kind": "test"}', '{"files": {"x.txt": "abc"}}'])
def test_a_broken_manifest_is_an_artifact_error_naming_it(tmp_path, content):
    """A manifest cut short (a machine crash, a full disk, a partial copy) or of another shape
    raised json's bare "Expecting value: line 1 column 1 (char 0)", a KeyError or a TypeError,
    naming neither the file nor what was expected."""
    version = publish_text(tmp_path)
    manifest = tmp_path / "thing" / version / artifacts.MANIFEST
    manifest.write_text(content)
    with pytest.raises(artifacts.ArtifactError, match=str(manifest)):
        artifacts.resolve(tmp_path, "thing", require=("x.txt",))


def test_the_manifest_is_on_disk_before_the_version_is_renamed_into_place(tmp_path,
                                                                            monkeypatch):
    """Every file was fsynced before the version became live except the manifest itself: a
    power loss after CURRENT switched could leave CURRENT naming a version whose manifest is
    empty, so that no index loads at all."""
    synced = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: (
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    renamed = []
    monkeypatch.setattr(artifacts.os, "replace", lambda a, b: (
        renamed.append((os.path.realpath(a), list(synced))), real_replace(a, b)))
    version = publish_text(tmp_path)
    staging, synced_before = renamed[0]  # the staging folder, renamed to the version
    assert (tmp_path / "thing" / version / artifacts.MANIFEST).is_file()
    assert os.path.join(staging, artifacts.MANIFEST) in synced_before
    assert os.path.join(staging, "x.txt") in synced_before


def test_a_bad_keep_versions_setting_publishes_nothing(tmp_path, monkeypatch):
    """A bad $FINSENTINEL_KEEP_INDEX_VERSIONS was found only after CURRENT had switched: the
    build failed (exit 2) while its index was live all the same."""
    first = publish_text(tmp_path, text="first")
    monkeypatch.setenv(artifacts.KEEP_VERSIONS_ENV, "many")
    with pytest.raises(artifacts.ArtifactError, match="KEEP_INDEX_VERSIONS"):
        publish_text(tmp_path, text="second")
    assert artifacts.current_version(tmp_path, "thing") == first
    left = sorted(p.name for p in (tmp_path / "thing").iterdir())
    assert left == sorted([artifacts.CURRENT, first])


def test_a_published_version_is_as_readable_as_its_folder(tmp_path):
    """The version directory came from mkdtemp (mode 0700) and CURRENT from mkstemp (0600)
    whatever the umask: an index built by the scheduled job's user could not be loaded by the
    dashboard's or an auditor's (``audit replay``). They now take the artifact folder's mode."""
    version = publish_text(tmp_path)
    base = tmp_path / "thing"
    folder = stat.S_IMODE(base.stat().st_mode)
    assert stat.S_IMODE((base / version).stat().st_mode) == folder
    assert stat.S_IMODE((base / artifacts.CURRENT).stat().st_mode) == folder & 0o666
    base.chmod(0o750)
    second = publish_text(tmp_path, text="second")
    assert stat.S_IMODE((base / second).stat().st_mode) == 0o750
    assert stat.S_IMODE((base / artifacts.CURRENT).stat().st_mode) == 0o640
    assert json.loads((base / second / artifacts.MANIFEST).read_text())["version"] == second


def test_publish_hands_back_the_manifest_it_wrote(tmp_path):
    """The caller learns its own version from the manifest, not from CURRENT, which a
    concurrent publish of the same name may already have switched to its version."""
    manifest = {"kind": "test"}
    with artifacts.publish(tmp_path, "thing", manifest) as staging:
        (staging / "x.txt").write_text("x")
    directory, written = artifacts.resolve(tmp_path, "thing", manifest["version"])
    assert written == manifest and directory.name == manifest["version"]
    assert manifest["files"]["x.txt"]["sha256"] == artifacts.sha256_file(directory / "x.txt")

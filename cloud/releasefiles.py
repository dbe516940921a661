"""Published agent releases as files, one directory per version, never changed afterwards::

    DIR/VERSION/release.tar       the release file (agent/ota/release.py)
    DIR/VERSION/manifest.cbor     the signed manifest

Two uses of one layout, as cloud/modelfiles.py for models: the release store of
:class:`cloud.storage.SQLiteStorage` (``DATA/releases``, where a SQLite endpoint has always kept
them), and every endpoint's local cache of the releases its storage holds
(:class:`cloud.releases.ReleaseRegistry` serves blocks from it). A version is put together in a
temporary directory, fsynced and renamed into place, so a reader sees it whole or not at all.
``published`` is the manifest's mtime. The files are copied or moved, never read into memory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent.errors import ModelError
from agent.modelstore.signing import check_name
from cloud.modelfiles import MANIFEST_FILE, set_aside, write_version
from cloud.storebase import ReleaseVersion, StorageUnavailable

RELEASE_FILE = "release.tar"
__all__ = ["MANIFEST_FILE", "RELEASE_FILE", "ReleaseFiles"]


class ReleaseFiles:
    """The releases under ``directory`` (the module docstring); the storage methods of
    :class:`cloud.storebase.Storage` for releases."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def version_dir(self, version: str) -> Path:
        """Raises ModelError for a version that is not one (never a path outside)."""
        return self.directory / check_name("version", version)

    def file_path(self, version: str) -> Path:
        return self.version_dir(version) / RELEASE_FILE

    def put_release(self, version: str, manifest: bytes, file: Path, published: float) -> bool:
        """Copy ``file`` in as ``version``; False when that version is there already."""
        target = self.version_dir(version)
        if target.exists():
            return False
        part = target.parent / f".{version}.{os.getpid()}.copy"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, part)
        except OSError as err:
            part.unlink(missing_ok=True)
            raise StorageUnavailable(f"{target}: cannot write the release ({err})") from err
        try:
            return self._place(target, manifest, part, published)
        finally:
            part.unlink(missing_ok=True)

    def install(self, version: str, manifest: bytes, file: Path) -> None:
        """Move ``file`` (on the same file system) into place as ``version`` with ``manifest``,
        replacing another copy (a cache's stale one)."""
        target = self.version_dir(version)
        old = None
        if target.exists():
            if self._manifest(target) == manifest:
                return  # another process put the same version in place meanwhile
            old = set_aside(target)
        placed = self._place(target, manifest, file, None)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if not placed and self._manifest(target) != manifest:
            raise StorageUnavailable(f"{target}: another copy was put in place meanwhile")

    @staticmethod
    def _place(target: Path, manifest: bytes, file: Path, published: float | None) -> bool:
        files = {RELEASE_FILE: file, MANIFEST_FILE: manifest}
        return write_version(target, files, published, "release")

    @staticmethod
    def _manifest(vdir: Path) -> bytes | None:
        try:
            return (vdir / MANIFEST_FILE).read_bytes()
        except OSError:
            return None

    def releases(self) -> list[ReleaseVersion]:
        out: list[ReleaseVersion] = []
        if not self.directory.is_dir():
            return out
        for vdir in sorted(self.directory.iterdir()):
            if vdir.name.startswith(".") or not vdir.is_dir():
                continue
            found = self.release(vdir.name)
            if found is not None:
                out.append(found)
        return out

    def release(self, version: str) -> ReleaseVersion | None:
        try:
            vdir = self.version_dir(version)
            manifest = (vdir / MANIFEST_FILE).read_bytes()
            published = (vdir / MANIFEST_FILE).stat().st_mtime
        except (ModelError, OSError):
            return None
        return ReleaseVersion(version, manifest, published)

    def release_file(self, version: str, out: Path) -> int | None:
        try:
            src = self.file_path(version)
            if not src.is_file():
                return None
            shutil.copyfile(src, out)
        except ModelError:
            return None
        except OSError as err:
            raise StorageUnavailable(f"release {version}: cannot read it ({err})") from err
        return out.stat().st_size

"""Published model versions as files, one directory per version, never changed afterwards::

    DIR/NAME/VERSION/model.tflite      the model file
    DIR/NAME/VERSION/manifest.cbor     the signed manifest (agent.modelstore.signing.SignedManifest)

Two uses of one layout: the model store of :class:`cloud.storage.SQLiteStorage` (``models/``
beside its database file: the files a SQLite endpoint has always published), and every
endpoint's local cache of the versions its storage holds (:class:`cloud.models.ModelRegistry`
serves blocks from it). A version is written into a temporary directory, fsynced and renamed
into place, so a reader sees it complete or not at all. ``published`` is the manifest's mtime.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from agent.errors import ModelError
from agent.files import fsync_dir
from agent.modelstore.signing import check_name
from cloud.storebase import ModelVersion, StorageUnavailable

MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.cbor"


def write_version(
    target: Path, files: Mapping[str, bytes | Path], published: float | None, what: str
) -> bool:
    """Write a version directory: ``files`` (name -> its bytes, or a file to move in from the
    same file system) into a temporary directory beside ``target``, each fsynced, the manifest's
    mtime set to ``published``, renamed into place. False when a version is there already
    (nothing changed); :class:`StorageUnavailable` when it cannot be written. Also the layout
    of cloud/releasefiles.py."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for fname, content in files.items():
            if isinstance(content, Path):
                os.replace(content, tmp / fname)
            else:
                (tmp / fname).write_bytes(content)
            fd = os.open(tmp / fname, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if published is not None:
            os.utime(tmp / MANIFEST_FILE, (published, published))
        fsync_dir(tmp)
        os.rename(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise StorageUnavailable(f"{target}: cannot write the {what} ({err})") from err
    fsync_dir(target.parent)
    return True


def set_aside(target: Path) -> Path:
    """Rename a stale version directory out of the way (to be removed once its replacement is
    in place); where it went."""
    old = target.parent / f".{target.name}.{os.getpid()}.old"
    shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(target, old)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageUnavailable(f"{target}: cannot replace ({err})") from err
    return old


class ModelFiles:
    """The model versions under ``directory`` (the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def version_dir(self, name: str, version: str) -> Path:
        """Raises ModelError for a name or version that is not one (never a path outside)."""
        return self.directory / check_name("name", name) / check_name("version", version)

    def file_path(self, name: str, version: str) -> Path:
        return self.version_dir(name, version) / MODEL_FILE

    def put_model(
        self, name: str, version: str, manifest: bytes, data: bytes, published: float
    ) -> bool:
        target = self.version_dir(name, version)
        if target.exists():
            return False
        return self._write(target, manifest, data, published)

    def install(self, name: str, version: str, manifest: bytes, data: bytes) -> None:
        """Put this copy of a version in place, replacing another one (a cache's stale copy)."""
        target = self.version_dir(name, version)
        if not self._write(target, manifest, data, None):
            if self._read(target / MANIFEST_FILE) == manifest:
                return  # another process put the same version in place meanwhile
            old = set_aside(target)
            self._write(target, manifest, data, None)
            shutil.rmtree(old, ignore_errors=True)

    def _write(self, target: Path, manifest: bytes, data: bytes, published: float | None) -> bool:
        """The version written beside ``target`` and renamed into place; False when a version
        is there already (nothing changed)."""
        files = {MODEL_FILE: data, MANIFEST_FILE: manifest}
        return write_version(target, files, published, "model")

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError:
            return None

    def models(self, name: str | None = None) -> list[ModelVersion]:
        out: list[ModelVersion] = []
        try:
            names = [check_name("name", name)] if name is not None else self._names()
        except (ModelError, OSError):
            return out
        for n in names:
            base = self.directory / n
            if n.startswith(".") or not base.is_dir():
                continue
            for vdir in sorted(base.iterdir()):
                found = None if vdir.name.startswith(".") else self._version(n, vdir)
                if found is not None:
                    out.append(found)
        return out

    def _names(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir())

    @staticmethod
    def _version(name: str, vdir: Path) -> ModelVersion | None:
        try:
            manifest = (vdir / MANIFEST_FILE).read_bytes()
            published = (vdir / MANIFEST_FILE).stat().st_mtime
        except OSError:
            return None
        return ModelVersion(name, vdir.name, manifest, published)

    def model(self, name: str, version: str) -> ModelVersion | None:
        try:
            vdir = self.version_dir(name, version)
        except ModelError:
            return None
        return self._version(name, vdir)

    def model_file(self, name: str, version: str) -> bytes | None:
        try:
            return self._read(self.file_path(name, version))
        except ModelError:
            return None

"""The model cache's files at rest, checked again after their install: the index rebuilt from
the files (:func:`rebuild`) and a cached model's signed manifest read again when it is first
looked up (:func:`stored_manifest`).

A cached copy that no longer verifies (damaged at rest: a bit flip, a torn or lost write) is
the device's condition, not the model's: the cache drops it and the version is fetched again;
it is never reported as a refusal of that version (``failed`` blocks it at the endpoint).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from agent.detect.inference import check_model_file
from agent.errors import ModelError
from agent.modelstore.indexfile import Record
from agent.modelstore.signing import SignedManifest

if TYPE_CHECKING:
    from agent.modelstore.cache import ModelCache

log = logging.getLogger(__name__)


def stored_manifest(cache: ModelCache, rec: Record) -> SignedManifest:
    """The signed manifest stored beside the cached file of ``rec``: read strictly, its
    signature checked (when the cache has a public key) and naming the file the index names
    (name, version, size, SHA-256). OSError or ModelError when it is not that."""
    path = cache._manifest_path(rec.ref)
    manifest = SignedManifest.read(path)
    if cache.public_key is not None:
        manifest.verify(cache.public_key, label=str(path))
    stored = (manifest.name, manifest.version, manifest.size, manifest.sha256)
    if stored != (rec.name, rec.version, rec.size, rec.sha256):
        raise ModelError(f"{path}: does not name the file the cache index names")
    return manifest


def rebuild(cache: ModelCache, missing: bool) -> None:
    """Rebuild the index from the files, verifying each one (size, SHA-256, signature)."""
    cache._records.clear()
    found = sorted(cache.files.glob("*.manifest"), key=lambda p: p.lstat().st_mtime)
    for mpath in found:
        try:  # anything a damaged or hostile file makes go wrong refuses that file only
            if mpath.is_symlink() or not mpath.is_file():
                raise ModelError("not a regular file")
            manifest = SignedManifest.read(mpath)
            ref = (manifest.name, manifest.version)
            if mpath != cache._manifest_path(ref):
                raise ModelError(f"holds the manifest of {ref[0]} {ref[1]}")
            # Without a key only the digest is checked (the listing says "unchecked").
            if cache.public_key is not None:
                manifest.verify(cache.public_key, label=str(mpath))
            check_model_file(cache._file(ref), manifest.model_entry())
            mtime = mpath.stat().st_mtime
        except Exception as err:
            log.warning("model cache file refused path=%s error=%r; deleted", mpath, str(err))
            cache._delete_files(mpath)
            continue
        cache._seq += 1
        rec = Record(
            manifest.name,
            manifest.version,
            manifest.size,
            manifest.sha256,
            mtime,
            mtime,
            cache._seq,
        )
        cache._records[rec.ref] = rec
    cache.rebuilt = not missing or bool(cache._records)
    cache._index.changed()
    if cache.rebuilt:
        log.info("model cache index rebuilt models=%d", len(cache._records))

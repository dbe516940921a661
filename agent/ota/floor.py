"""Rollback protection: the lowest rollback index a release this device takes may have.

A release's signed bundle may carry ``rollback_index`` (``edge-agent-cloud releases publish
--rollback-index N``; agent/ota/release.py). Once the device runs a release of index N and it is
confirmed (``current`` in the release root and not pending), no release below N is staged or
switched to again: a signed but known-vulnerable version cannot be assigned back by whoever can
write the desired state. The floor is the highest index of a release confirmed here, kept in
``DATA/ota/floor.json`` (``{"index", "version"}``, written atomically) so that it holds after the
device moved on. A pending release raises nothing (it may still roll back); the boot counter's
automatic rollback to the previous release is the device's own and never checked against it.

To allow an older version again on purpose (its fix is elsewhere, say), publish it again under a
new version with ``--rollback-index`` at least the floor. A damaged floor file is said and read as
0 (the confirmed release's own index still holds).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.files import read_json, write_atomic
from agent.ota import bootcheck
from agent.ota.install import MANIFEST_FILE, release_dir
from agent.ota.release import MAX_ROLLBACK_INDEX, ReleaseError, ReleaseManifest

log = logging.getLogger(__name__)

FLOOR_FILE = "floor.json"  # in DATA/ota/
OTA_DIR = "ota"


def _stored(path: Path) -> tuple[int, str | None]:
    try:
        doc = read_json(path, limit=4096)
    except FileNotFoundError:
        return 0, None
    except (OSError, ValueError) as err:
        log.warning("event=rollback_floor_unreadable path=%s error=%r", path, str(err))
        return 0, None
    index = doc.get("index") if isinstance(doc, dict) else None
    version = doc.get("version") if isinstance(doc, dict) else None
    if type(index) is not int or not 0 <= index <= MAX_ROLLBACK_INDEX:
        log.warning("event=rollback_floor_unreadable path=%s error='not an index'", path)
        return 0, None
    return index, version if isinstance(version, str) else None


def confirmed_index(root: Path) -> tuple[int, str | None]:
    """The rollback index of the release ``current`` names, when it is confirmed (not pending),
    read from its installed manifest (root's, written by the helper after it verified it)."""
    version = bootcheck.link_version(root, bootcheck.CURRENT)
    if version is None or bootcheck.name(bootcheck.load(root), "pending") == version:
        return 0, None
    try:
        data = (release_dir(root, version) / MANIFEST_FILE).read_bytes()
        manifest = ReleaseManifest.from_cbor(data, f"installed release {version}")
    except (OSError, ReleaseError):
        return 0, None  # the first install (adopted, no manifest) or not readable
    return manifest.rollback_index, version


def floor(root: Path, data_dir: Path) -> tuple[int, str | None]:
    """The floor (index, the release that set it): the stored one, raised (and stored) when
    the confirmed current release has a higher index."""
    path = data_dir / OTA_DIR / FLOOR_FILE
    stored = _stored(path)
    current = confirmed_index(root)
    if current[0] > stored[0]:
        doc = {"index": current[0], "version": current[1]}
        write_atomic(path, (json.dumps(doc) + "\n").encode())
        log.info("event=rollback_floor_raised index=%d version=%s", *current)
        return current
    return stored


def check(manifest: ReleaseManifest, root: Path, data_dir: Path) -> None:
    """ReleaseError when ``manifest``'s rollback index is below this device's floor."""
    index, version = floor(root, data_dir)
    if manifest.rollback_index < index:
        raise ReleaseError(
            f"release {manifest.version}: rollback index {manifest.rollback_index} is below this "
            f"device's floor {index} (set by release {version or '?'}, confirmed here): an "
            f"older release than a security fix; refused (publish it again under a new version "
            f"with --rollback-index {index} or more to allow it)"
        )

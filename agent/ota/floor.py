"""Rollback protection: the lowest rollback index a release this device takes may have.

A release's signed bundle may carry ``rollback_index`` (``edge-agent-cloud releases publish
--rollback-index N``; agent/ota/release.py). Once the device runs a release of index N and it is
confirmed (``current`` in the release root and not pending), no release below N is staged or
switched to again: a signed but known-vulnerable version cannot be assigned back by whoever can
write the desired state. The floor is the highest index of a release confirmed here, kept in
``DATA/ota/floors.json`` under ``edge-agent`` (agent/modelstore/floors.py, which keeps models'
floors the same way) so that it holds after the device moved on. A pending release raises
nothing (it may still roll back); the boot counter's automatic rollback to the previous release
is the device's own and never checked against it.

To allow an older version again on purpose (its fix is elsewhere, say), publish it again under a
new version with ``--rollback-index`` at least the floor. A damaged floor file is said and read as
0 (the confirmed release's own index still holds).
"""

from __future__ import annotations

from pathlib import Path

from agent.modelstore.floors import FLOORS_FILE, Floors
from agent.ota import bootcheck
from agent.ota.install import MANIFEST_FILE, release_dir
from agent.ota.release import ReleaseError, ReleaseManifest

RELEASE = "edge-agent"  # the floors file's key for agent releases
FLOOR_FILE = FLOORS_FILE  # in DATA/ota/


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
    floors = Floors(data_dir / bootcheck.READY_DIR)  # DATA/ota/
    index, version = floors.read().get(RELEASE, (0, None))
    current, by = confirmed_index(root)
    if current > index and by is not None:
        floors.raise_to(RELEASE, by, {"rollback_index": current})
        return current, by
    return index, version


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

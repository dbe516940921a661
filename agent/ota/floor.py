"""Rollback protection: the lowest rollback index a release this device takes may have.

A release's signed bundle may carry ``rollback_index`` (``edge-agent-cloud releases publish
--rollback-index N``; agent/ota/release.py). Once the device runs a release of index N and it is
confirmed (``current`` in the release root and not pending), no release below N is staged or
switched to again: a signed but known-vulnerable version cannot be assigned back by whoever can
write the desired state. A pending release raises nothing (it may still roll back); the boot
counter's automatic rollback to the previous release is the device's own and never checked
against it.

Two floors, one per side of the privilege split:

- the root helper's (:func:`hold`, :func:`check_root`), the one that decides: kept in the
  root-owned ``update.json`` (agent/ota/bootcheck.py ``floor``), raised by the boot counter when
  it confirms a release (the index :func:`bootcheck.switch` recorded from the verified manifest)
  and by the root helper before each install from the confirmed current release's installed
  manifest. It never reads the data directory, which the agent owns: deleting or rewriting
  ``DATA/ota/floors.json`` changes nothing here.
- the agent's (:func:`floor`, :func:`check`), an early check before a byte is fetched: the
  root's floor (update.json is readable) and ``DATA/ota/floors.json`` (agent/modelstore/floors.py,
  which keeps models' floors the same way), raised by the agent. Advisory: the root helper
  checks again on its own.

A release root from before the root kept its floor (no ``floor`` in update.json) is given one
the first time the root helper looks: the confirmed current release's index, or, while a
release is pending, the index of ``previous`` (the release the device ran before the switch).

To allow an older version again on purpose (its fix is elsewhere, say), publish it again under a
new version with ``--rollback-index`` at least the floor. A damaged floor file is said and its
copy holds (agent/modelstore/floors.py); both damaged read as 0 (the confirmed release's own
index and the root's floor still hold).
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.modelstore.floors import FLOORS_FILE, Floors
from agent.ota import bootcheck
from agent.ota.install import MANIFEST_FILE, release_dir
from agent.ota.release import ReleaseError, ReleaseManifest

log = logging.getLogger(__name__)

RELEASE = "edge-agent"  # the floors file's key for agent releases
FLOOR_FILE = FLOORS_FILE  # in DATA/ota/ (the agent's, advisory)

Floor = tuple[int, str | None]  # (index, the release that set it)


def installed_index(root: Path, version: str | None) -> int:
    """The rollback index in the installed manifest of ``version`` (root's: written by the
    helper after it verified it); 0 when there is none (the first install, adopted)."""
    if version is None:
        return 0
    try:
        data = (release_dir(root, version) / MANIFEST_FILE).read_bytes()
        return ReleaseManifest.from_cbor(data, f"installed release {version}").rollback_index
    except (OSError, ReleaseError):
        return 0


def confirmed_index(root: Path) -> Floor:
    """The rollback index of the release ``current`` names, when it is confirmed (not pending)."""
    version = bootcheck.link_version(root, bootcheck.CURRENT)
    if version is None or bootcheck.name(bootcheck.load(root), "pending") == version:
        return 0, None
    return installed_index(root, version), version


def root_floor(root: Path) -> Floor:
    """The root helper's floor, from the release root alone: the one in update.json, the
    confirmed current release's index, and for a root from before the floor was kept there the
    previous release's while one is pending (module docstring)."""
    doc = bootcheck.load(root)
    found = [bootcheck.floor_of(doc), confirmed_index(root)]
    if bootcheck.FLOOR not in doc:
        current = bootcheck.link_version(root, bootcheck.CURRENT)
        if current is not None and bootcheck.name(doc, "pending") == current:
            previous = bootcheck.link_version(root, bootcheck.PREVIOUS)
            found.append((installed_index(root, previous), previous))
    index, by = max(found, key=lambda f: f[0])
    return (index, by) if index else (0, None)


def hold(root: Path) -> Floor:
    """:func:`root_floor`, written into update.json when it is higher than the one kept there
    (or none is): the root helper's, before each install, so that the floor holds once the
    confirmed release is no longer current or is pending again."""
    index, by = root_floor(root)
    doc = bootcheck.load(root)
    if root.is_dir() and (bootcheck.FLOOR not in doc or index > bootcheck.floor_of(doc)[0]):
        doc[bootcheck.FLOOR] = {"index": index, "version": by}
        bootcheck.save(root, doc)
        if index:
            log.info("event=release_floor_raised index=%d version=%s", index, by)
    return index, by


def _refuse(manifest: ReleaseManifest, index: int, version: str | None) -> ReleaseError:
    return ReleaseError(
        f"release {manifest.version}: rollback index {manifest.rollback_index} is below this "
        f"device's floor {index} (set by release {version or '?'}, confirmed here): an "
        f"older release than a security fix; refused (publish it again under a new version "
        f"with --rollback-index {index} or more to allow it)"
    )


def check_root(manifest: ReleaseManifest, root: Path) -> None:
    """The root helper's check (:func:`hold`): ReleaseError when ``manifest``'s rollback index
    is below the floor kept in the release root. Nothing in the data directory is read."""
    index, version = hold(root)
    if manifest.rollback_index < index:
        raise _refuse(manifest, index, version)


def floor(root: Path, data_dir: Path) -> Floor:
    """The agent's floor (index, the release that set it): the higher of its file and the
    root's (:func:`root_floor`), its file raised (and stored) when the root's is higher."""
    floors = Floors(data_dir / bootcheck.READY_DIR)  # DATA/ota/
    index, version = floors.read().get(RELEASE, (0, None))
    higher, by = root_floor(root)
    if higher > index:
        if by is not None:
            floors.raise_to(RELEASE, by, {"rollback_index": higher})
        return higher, by
    return index, version


def check(manifest: ReleaseManifest, root: Path, data_dir: Path) -> None:
    """The agent's early check (before a byte is fetched): ReleaseError when ``manifest``'s
    rollback index is below this device's floor (:func:`floor`)."""
    index, version = floor(root, data_dir)
    if manifest.rollback_index < index:
        raise _refuse(manifest, index, version)

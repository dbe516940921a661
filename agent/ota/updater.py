"""The device side of an update: fetch a release, verify it, install it beside the running one,
switch (docs/ota.md).

:class:`ReleaseFetcher` is the model fetcher (agent/modelstore/fetch.py: Block2 by number, a
window of lanes, resumable from the last whole block) pointed at ``/releases/V/manifest|file``.
An update is done in steps that each refuse before anything changes, split by privilege:

The agent (:func:`stage`; its sandbox cannot write /opt/edge-agent):

1. the manifest: its version is the one asked for, its signature verifies with the release
   public key (``[update] public_key``), its SHA-256 is the one the operator set;
2. the disk budget: the file must fit in what the budget and the disk leave;
3. the download into ``DATA/ota/<version>.part`` (resumed after a cut or a SIGKILL; fsynced
   every :data:`PART_SYNC_BYTES`; the partials of other versions are removed first), then
   its size and SHA-256 against the signed manifest; it becomes ``<version>.release`` beside
   ``<version>.manifest``, and ``staged.json`` names it.
   A download that resumed a kept partial and then does not match is not a refusal: the partial
   may have lost blocks in a power cut (they reach the card only when synced, its size may be
   kept without them), so it is dropped and the file fetched once more from the start; only a
   whole fresh download that does not match refuses the release.
   A ``<version>.release`` already there (kept by the root helper, which had no room to install
   it) is staged again without a block fetched once its size and SHA-256 match the manifest;
   one that does not is removed and the release fetched again. The files of other versions
   (partial, kept) are removed first: ``DATA/ota`` holds one release at a time.

The root helper (:func:`apply_staged`, ``python -m agent.ota.updater apply`` run by
edge-agent-update.service when edge-agent-update.path sees ``staged.json``):

4. the signature and the file checked again (the data directory is the agent's), then the
   install (agent/ota/install.py) into ``releases/<version>``, the new release asked with its
   own Python whether it reads the data directory, and both releases which data formats they
   read and write: the running one must read what the new one writes, or a rollback would
   strand the data (agent/ota/compat.py);
5. the switch (agent/ota/bootcheck.py) and a restart of edge-agent.service into the new release,
   where the boot counter takes over.

The staged files in ``DATA/ota`` are removed once the release is switched to or refused; when
the helper has no room to install it (``waiting``) only ``staged.json`` is, and the checked file
and manifest stay for the agent to hand over again (agent/ota/controller.py). Where ``DATA/ota``
and the release root are one filesystem (the usual device), the agent's file is removed as soon
as root's checked copy of it is made, so that it does not hold room the install needs; on
``waiting`` that copy is renamed back to ``DATA/ota/<version>.release`` (no room needed). On two
filesystems the agent's file stays during the install: it takes no room from the release root.

Refusals raise :class:`~agent.ota.release.ReleaseError` (that release is not tried again); link
failures raise SyncError (the partial file stays, the next attempt resumes it), and so do the
device's own conditions as :class:`~agent.errors.NotNow` (not enough free space for the rest of
the file, a partial that cannot be written).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import ModelError, NotNow, no_room
from agent.files import loads_json, write_atomic
from agent.modelstore.fetch import FetchStats, ModelFetcher
from agent.modelstore.signing import MAX_MANIFEST_BYTES, NAME_RE
from agent.ota import bootcheck, floor
from agent.ota.compat import parse_description, rollback_problems
from agent.ota.install import install, release_dir
from agent.ota.release import ReleaseError, ReleaseManifest, check_file, take

log = logging.getLogger(__name__)

OTA_DIR = "ota"  # in the agent's data directory: partial downloads, the READY marker
STAGED_FILE = "staged.json"  # DATA/ota/staged.json: what edge-agent-update.path waits for
PART_SYNC_BYTES = 4 << 20  # the partial download is fsynced each time this much more is written
INITIAL_VERSION = "initial"  # the release name of the first install's venv (bootcheck.adopt)
MAX_STAGED_BYTES = 1 << 16  # staged.json is a few dozen bytes; the root helper reads no more
TAKEN_FILE = ".staged.release"  # in the release root: root's copy of the staged release file
MIRROR_PREFIX = "release-"  # DATA/ota/release-V.part: a gateway mirror's (gateway/releases.py)
#: the mode root's copy gets when it goes back to the agent after the agent's file was lost (a
#: power cut during an install): the agent's own files are 0600 (edge-agent.service UMask=0077)
KEPT_MODE = 0o600
#: the ``cause`` of a ``waiting`` outcome: no room to copy or install it, or the staged file gone
#: (and no copy of root's to go on from); only the first waits for more room (controller.py)
NO_ROOM = "no_room"
STAGED_FILE_MISSING = "staged_file_missing"
#: what DATA/ota holds of a release: its partial download, its verified file and manifest (kept
#: while the root helper has no room to install it, and while it is still the one wanted)
KEPT_SUFFIXES = (".part", ".release", ".manifest")


class ReleaseFetcher(ModelFetcher):
    """Fetches release manifests and files (``/releases/V/...``) with the model fetcher's
    block-wise, resumable download."""

    def uri(self, name: str, version: str, what: str) -> str:
        base = self._base() if callable(self._base) else self._base
        return f"{base.rstrip('/')}/releases/{version}/{what}"

    async def release_manifest(self, version: str) -> ReleaseManifest:
        uri = self.uri("", version, "manifest")
        resp = await self._get(uri, self.manifest_deadline)
        self._check_code(resp, uri, "release")
        m = ReleaseManifest.from_cbor(resp.payload, label=f"GET {uri}")
        if m.version != version:
            raise ReleaseError(f"GET {uri}: the manifest is for release {m.version}; refused")
        return m


class StagedFileMissing(NotNow):
    """The file ``staged.json`` names is not in ``DATA/ota`` and root has no checked copy of it
    to go on from: ``waiting``, and the agent stages it again (not a refusal: a power cut
    during an install leaves this)."""


@dataclass
class Staged:
    """A release downloaded and verified in ``DATA/ota``, waiting for the root helper."""

    version: str
    manifest: ReleaseManifest
    file: Path
    stats: FetchStats  # nothing fetched when a kept file was staged again
    root_free: int | None = None  # free bytes in the release root as it was handed over


def partial_path(data_dir: Path, version: str) -> Path:
    return data_dir / OTA_DIR / f"{version}.part"


def drop_unwanted(
    directory: Path, keep: str | None, prefix: str = "", suffixes: Sequence[str] = (".part",)
) -> list[str]:
    """Remove the files ``<prefix>VERSION<suffix>`` in ``directory`` but those of ``keep`` (a
    ``<prefix>VERSION``): by default the partial downloads of a release no longer wanted (its
    assignment moved on, or was withdrawn, while it was being fetched); with
    :data:`KEPT_SUFFIXES` also a verified release file kept for a later install, and its
    manifest. Nothing else resumes or installs them, and each could hold up to a whole release
    file (tens of MB) for as long as the device runs. Without a prefix, a gateway mirror's
    partials (:data:`MIRROR_PREFIX`, in the same directory) are left alone; the files a
    release named ``release-...`` kept are not a mirror's. The names removed."""
    dropped = []
    found = sorted(p for suffix in suffixes for p in directory.glob(f"{prefix}*{suffix}"))
    for path in found:
        stem = path.name[: -len(path.suffix)]
        mirrors = path.name.startswith(MIRROR_PREFIX) and path.suffix == ".part"
        if stem == keep or (not prefix and mirrors):  # a mirror writes only partials
            continue
        try:
            path.unlink()
        except OSError as err:
            log.warning("event=release_partial_not_removed path=%s error=%s", path, err)
            continue
        dropped.append(path.name)
        what = "partial" if path.suffix == ".part" else "kept"
        log.info("event=release_%s_removed path=%s reason=not_wanted", what, path)
    return dropped


def staged_version(data_dir: Path) -> str | None:
    """The version ``DATA/ota/staged.json`` hands to the root helper; None without one."""
    try:
        staged = loads_json((data_dir / OTA_DIR / STAGED_FILE).read_bytes()[:MAX_STAGED_BYTES])
    except (OSError, ValueError):
        return None
    version = staged.get("version") if isinstance(staged, dict) else None
    return version if isinstance(version, str) else None


async def _download(
    fetcher: ReleaseFetcher,
    manifest: ReleaseManifest,
    part: Path,
    budget_bytes: int | None,
    root: Path | None = None,
) -> FetchStats:
    """Download (or resume) ``part`` after the disk budget check; ReleaseError when it is
    refused (the partial removed), SyncError on a link failure (the partial kept)."""
    _check_budget(manifest, part, budget_bytes, root)
    sync = _PartSync(part)
    try:
        return await fetcher.download(manifest, part, sync.on_block)  # type: ignore[arg-type]
    except ModelError as err:
        _drop(part)
        raise err if isinstance(err, ReleaseError) else ReleaseError(str(err)) from err
    finally:
        await sync.close()


def _check_budget(
    manifest: ReleaseManifest, part: Path, budget_bytes: int | None, root: Path | None = None
) -> None:
    """ReleaseError when the release is larger than the disk budget; NotNow when the free space
    cannot hold the rest of it now (the device's condition: the queue may have filled the disk
    during an outage; tried again later, never reported as a refusal). With the release
    ``root``: also room there for the root helper's copy of the file and its unpacked bundle
    (twice its size; on one filesystem with DATA, on top of the download)."""
    have = part.stat().st_size if part.exists() else 0
    if budget_bytes is not None and manifest.size > budget_bytes:
        raise ReleaseError(
            f"release {manifest.version}: {manifest.size} bytes do not fit the disk budget "
            f"({budget_bytes} bytes); refused"
        )
    needs = {part.parent: manifest.size - have}
    if root is not None and root.exists():  # the root helper's copy and unpacked bundle
        if os.stat(root).st_dev == os.stat(part.parent).st_dev:
            needs[part.parent] += 2 * manifest.size
        else:
            needs[root] = 2 * manifest.size
    for where, need in needs.items():
        free = shutil.disk_usage(where).free
        if need > free:
            raise NotNow(
                f"release {manifest.version}: {need} bytes needed (the download, the root "
                f"helper's copy and its unpacked bundle), {free} bytes free in {where}; "
                "waiting for free space"
            )
    version, size = manifest.version, manifest.size
    log.info("event=release_download version=%s bytes=%d resume=%d", version, size, have)


def _drop(part: Path) -> None:
    with contextlib.suppress(OSError):
        part.unlink()


class _PartSync:
    """Fsyncs the partial download every :data:`PART_SYNC_BYTES` written, in a worker thread
    (a slow card must not hold the event loop), one at a time: a power cut then loses at most
    the blocks since the last one, not the whole download's."""

    def __init__(self, part: Path) -> None:
        self.part = part
        self.synced = 0  # bytes in the partial at the last fsync this download asked for
        self.task: asyncio.Task[None] | None = None

    def on_block(self, _num: int, have: int) -> None:
        """The fetcher's callback after each block written (and flushed) in order."""
        if have - self.synced < PART_SYNC_BYTES or (self.task and not self.task.done()):
            return
        self.synced = have
        self.task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._fsync))

    def _fsync(self) -> None:
        try:
            fd = os.open(self.part, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError as err:
            log.warning("event=release_partial_fsync_failed path=%s error=%s", self.part, err)
        finally:
            os.close(fd)

    async def close(self) -> None:
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


async def stage(
    fetcher: ReleaseFetcher,
    *,
    version: str,
    sha256: str | None,
    key: Ed25519PublicKey,
    data_dir: Path,
    budget_bytes: int | None = None,
    max_attempts: int = bootcheck.MAX_ATTEMPTS,
    health_window: int = bootcheck.HEALTH_WINDOW,
    root: Path | None = None,
) -> Staged:
    """Steps 1-3 of the module docstring, as the agent (unprivileged) does them: the verified
    file ends in ``DATA/ota/<version>.release`` beside its manifest and ``staged.json``, which
    also carries the ``[update]`` limits the root helper's switch records for the boot counter
    and the health window (the helper does not read agent.toml). With the release ``root``,
    a release below the device's rollback floor is refused first (agent/ota/floor.py)."""
    manifest = await fetcher.release_manifest(version)
    manifest.verify(key)
    if root is not None:
        floor.check(manifest, root, data_dir)  # before a byte of the file is fetched
    if sha256 is not None and manifest.sha256 != sha256.lower():
        raise ReleaseError(
            f"release {version}: the endpoint serves SHA-256 {manifest.sha256[:16]}..., the "
            f"desired agent/version says {sha256[:16]}...; refused"
        )
    ota = data_dir / OTA_DIR
    ota.mkdir(parents=True, exist_ok=True)
    drop_unwanted(ota, version, suffixes=KEPT_SUFFIXES)  # one release is staged at a time
    part, file = partial_path(data_dir, version), ota / f"{version}.release"
    fetched: Path | None = None
    if await asyncio.to_thread(_kept, manifest, file):
        _drop(part)
        _check_budget(manifest, file, budget_bytes, root)  # room for the root helper's part
        stats = FetchStats()
    else:
        stats = await _fetch(fetcher, manifest, part, budget_bytes, root)
        fetched = part
    staged = {"version": version, "max_attempts": max_attempts, "health_window": health_window}
    # (each write an fsync, tens to hundreds of ms on an SD card: off the event loop)
    free = await asyncio.to_thread(_hand_over, manifest, fetched, file, staged, root)
    log.info("event=release_staged version=%s bytes=%d", version, manifest.size)
    return Staged(version, manifest, file, stats, free)


def _hand_over(
    manifest: ReleaseManifest,
    part: Path | None,
    file: Path,
    staged: dict[str, object],
    root: Path | None,
) -> int | None:
    """The verified release handed to the root helper, in this order: the downloaded ``part``
    renamed to ``file`` (None: ``file`` is a kept one), the manifest beside it (its directory
    fsync makes the rename durable too), then ``staged.json``, which starts the helper, last.
    The free bytes in the release root as it is handed over (a retry waits for more,
    controller.py)."""
    ota = file.parent
    if part is not None:
        os.replace(part, file)
    write_atomic(ota / f"{manifest.version}.manifest", manifest.to_cbor())
    free = root_free(root)
    write_atomic(ota / STAGED_FILE, json.dumps(staged).encode())
    return free


def root_free(root: Path | None) -> int | None:
    """Free bytes in the release root (as the agent's user may use them); None without one."""
    return shutil.disk_usage(root).free if root is not None and root.exists() else None


def _kept(manifest: ReleaseManifest, file: Path) -> bool:
    """``file`` is the release the (verified) manifest signs, kept from an earlier staging the
    root helper had no room to install. One that is there and does not match (rewritten or
    torn since; or not a regular file) is removed: it is fetched again."""
    if not os.path.lexists(file):
        return False
    try:
        check_file(manifest, file)
    except (ReleaseError, OSError) as err:
        _drop(file)
        log.warning("event=release_kept_dropped version=%s error=%s", manifest.version, err)
        return False
    log.info("event=release_kept version=%s bytes=%d", manifest.version, manifest.size)
    return True


async def _fetch(
    fetcher: ReleaseFetcher,
    manifest: ReleaseManifest,
    part: Path,
    budget_bytes: int | None,
    root: Path | None,
) -> FetchStats:
    """Download ``part`` (resuming it) and check it against the manifest. A resumed partial
    that does not match is fetched once more from the start; a fresh one that does not match
    refuses the release (ReleaseError, the partial removed)."""
    stats = await _download(fetcher, manifest, part, budget_bytes, root)
    try:  # (hashing a release of tens of MB: off the event loop, which samples meanwhile)
        await asyncio.to_thread(check_file, manifest, part)
    except ReleaseError:
        _drop(part)
        if not stats.resumed_from:
            raise
        # a kept partial, perhaps torn by a power cut: once more from the start, then decide
        log.warning(
            "event=release_partial_dropped version=%s resumed_from=%d reason=sha256_mismatch",
            manifest.version,
            stats.resumed_from,
        )
        stats = await _download(fetcher, manifest, part, budget_bytes, root)
        try:
            await asyncio.to_thread(check_file, manifest, part)
        except ReleaseError:
            _drop(part)
            raise
    return stats


def apply_staged(
    root: Path,
    data_dir: Path,
    key: Ed25519PublicKey,
    *,
    python: str | None = None,
    site: Sequence[Path] = (),
) -> str | None:
    """Steps 4-5, as the root helper does them (edge-agent-update.service): verify the staged
    release again, install it, switch. The version switched to; None when nothing is staged.
    A refusal is recorded as the outcome ``refused``, the staged files are removed and so is
    a release directory the install left incomplete.

    Everything read in ``DATA/ota`` (the agent's, which may be compromised) is read with
    bootcheck.read_data (no link followed, no FIFO waited on, a regular file, bounded) and
    removed with bootcheck.remove_data; the release file is copied into the release root and
    checked as it is copied (release.take), and only that copy is unpacked. On one filesystem
    with the release root, the agent's file is removed right after that copy, and the copy
    moved back with bootcheck.give_data when there is no room to install it. When the agent's
    file is missing (a power cut during an earlier install, after it was removed), the install
    goes on from root's copy if that is still the signed file, else the outcome is ``waiting``
    (:class:`StagedFileMissing`). When the staged version is already ``current`` (a power cut
    after the switch, before the cleanup), only the staged files and root's copy are removed:
    no outcome, the pending switch left to the boot counter, no restart. The rollback floor is
    the release root's own (floor.check_root), never DATA/ota/floors.json."""
    staged_name = f"{OTA_DIR}/{STAGED_FILE}"
    try:
        staged = loads_json(bootcheck.read_data(data_dir, staged_name, MAX_STAGED_BYTES))
        version = staged["version"] if isinstance(staged, dict) else None
        if not isinstance(version, str) or not NAME_RE.match(version):
            # the file names paths this helper (root) reads and removes: only a release name
            raise ValueError(f"version: not a release name: {version!r}"[:200])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as err:
        log.error("event=release_staged_unreadable path=%s error=%s", data_dir / staged_name, err)
        with contextlib.suppress(OSError):
            bootcheck.remove_data(data_dir, staged_name)  # the agent stages again when asked
        return None
    # the agent's [update] limits, within the ranges its settings allow (agent/ota/settings.py)
    max_attempts = bootcheck.number(
        staged, "max_attempts", bootcheck.MAX_ATTEMPTS, 1, bootcheck.MAX_ATTEMPTS_LIMIT
    )
    health_window = bootcheck.number(
        staged,
        "health_window",
        bootcheck.HEALTH_WINDOW,
        bootcheck.MIN_HEALTH_WINDOW,
        bootcheck.MAX_HEALTH_WINDOW,
    )
    names = [f"{OTA_DIR}/{version}.release", f"{OTA_DIR}/{version}.manifest", staged_name]
    copy = root / TAKEN_FILE  # root's copy of the release file, the one unpacked
    leftovers = names  # removed once done: all of them but when there was no room
    freed: int | None = None  # the mode of the agent's file, when it was removed after the copy
    try:
        if bootcheck.link_version(root, bootcheck.CURRENT) == version:
            # switched to by a run a power cut stopped before its cleanup (below): its files are
            # left over; the outcome and the pending switch (the boot counter's) are not touched
            log.info("event=release_leftover_cleaned version=%s reason=already_current", version)
            return None
        data = bootcheck.read_data(data_dir, names[1], MAX_MANIFEST_BYTES)
        manifest = ReleaseManifest.from_cbor(data, f"staged release {version}")
        if manifest.version != version:
            raise ReleaseError(f"staged release {version}: the manifest is for {manifest.version}")
        manifest.verify(key)
        floor.check_root(manifest, root)
        root.mkdir(parents=True, exist_ok=True)
        copied = _take(manifest, data_dir, names[0], copy)
        if copied is None:  # the agent's file is gone: root's copy goes back if there is no room
            freed = KEPT_MODE
        elif one_filesystem(root, data_dir, names[0]):
            # the agent's file would hold room the install needs: freed now, given back if not;
            # root's copy durable first (name and data), so a power cut leaves one of the two
            bootcheck.fsync_dir(root)
            with contextlib.suppress(OSError):
                if bootcheck.remove_data(data_dir, names[0]):
                    freed = copied.st_mode
        if not (root / bootcheck.CURRENT).is_symlink():
            bootcheck.adopt(root, INITIAL_VERSION)
        rel = install(root, manifest, copy, python=python, site=site)
        _check_data(root, rel, version, data_dir)
        bootcheck.switch(
            root, version, max_attempts, health_window, data_dir, manifest.rollback_index
        )
    except (ReleaseError, bootcheck.BootError, NotNow, OSError) as err:
        # no room on the device's disk is its own condition: ``waiting``, and the agent stages
        # the release again later (controller.py); anything else is a refusal
        result = "waiting" if isinstance(err, NotNow) or no_room(err) else "refused"
        if result == "waiting":  # the checked file and manifest stay: staged again, not fetched
            leftovers = names[2:]
            if freed is not None:
                _give_back(root, data_dir, names[0], freed, version)
        log.error("event=release_%s version=%s error=%s", result, version, err)
        _drop_incomplete(root, version)
        doc = bootcheck.load(root)
        doc["outcome"] = {
            "version": version,
            "result": result,
            "reason": str(err),
            "at": time.time(),
        }
        if result == "waiting":
            missing = isinstance(err, StagedFileMissing)
            doc["outcome"]["cause"] = STAGED_FILE_MISSING if missing else NO_ROOM
        if root.is_dir():
            try:
                bootcheck.save(root, doc)
            except OSError as save_err:  # the disk still full: said here, the agent sees no outcome
                log.error("event=release_outcome_unsaved version=%s error=%s", version, save_err)
        return None
    finally:
        with contextlib.suppress(OSError):
            copy.unlink()
        for leftover in leftovers:
            with contextlib.suppress(OSError):
                bootcheck.remove_data(data_dir, leftover)
    return version


def _take(
    manifest: ReleaseManifest, data_dir: Path, relative: str, copy: Path
) -> os.stat_result | None:
    """Root's checked copy of the agent's ``data_dir/relative`` in ``copy`` (release.take);
    the status of the agent's file. When the agent's file is missing, None if ``copy`` is
    still the file the (verified) manifest signs: an install a power cut interrupted after the
    agent's file was removed (``staged.json`` goes last) goes on from it; else
    :class:`StagedFileMissing` (``waiting``: the agent stages it again), never a refusal."""
    try:
        return take(manifest, data_dir, relative, copy)
    except FileNotFoundError as err:
        gone = err
    try:
        check_file(manifest, copy)
    except (ReleaseError, OSError) as err:
        why = "is missing" if isinstance(err, FileNotFoundError) else "is not the signed file"
        raise StagedFileMissing(
            f"release {manifest.version}: the staged file {data_dir / relative} is missing "
            f"and root's copy {why}; the agent stages it again"
        ) from gone
    log.info("event=release_resumed version=%s path=%s", manifest.version, copy)
    return None


def one_filesystem(root: Path, data_dir: Path, relative: str) -> bool:
    """The release root and the directory of ``data_dir/relative`` are one filesystem (the
    usual device: /opt and /var/lib on the root filesystem); False when either cannot be
    looked at (the agent's file then stays during the install, which is always safe)."""
    try:
        return os.stat(root).st_dev == bootcheck.data_device(data_dir, relative)
    except OSError:
        return False


def _give_back(root: Path, data_dir: Path, relative: str, mode: int, version: str) -> None:
    """Root's checked copy of the release becomes the agent's ``data_dir/relative`` again (it
    was removed after the copy to leave its room to the install, which still had too little),
    renamed there with the mode it had (bootcheck.give_data). When it cannot be, that is said
    and the agent fetches the release again."""
    try:
        bootcheck.give_data(data_dir, relative, root, TAKEN_FILE, mode)
    except OSError as err:
        log.warning("event=release_kept_lost version=%s error=%s", version, err)
        return
    log.info("event=release_kept_given_back version=%s path=%s", version, data_dir / relative)


def _drop_incomplete(root: Path, version: str) -> None:
    """A refused install leaves nothing: ``releases/<version>`` without COMPLETE is removed (a
    complete one stays: it may be ``previous``, and a switch to it needs no new install)."""
    rel = release_dir(root, version)
    linked = {bootcheck.link_version(root, n) for n in (bootcheck.CURRENT, bootcheck.PREVIOUS)}
    if rel.exists() and version not in linked and not bootcheck.is_complete(root, version):
        shutil.rmtree(rel, ignore_errors=True)
        log.info("event=release_incomplete_removed version=%s path=%s", version, rel)


def _ask(python: Path, version: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(python), "-I", "-m", "agent.ota.compat", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ReleaseError(f"release {version}: cannot ask it about the data ({err})") from err


def _said(proc: subprocess.CompletedProcess[str]) -> str:
    said = proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines()[-1:]
    return "; ".join(said) or f"exit status {proc.returncode}"


def _description(python: Path, version: str) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    proc = _ask(python, version, "--describe")
    try:
        if proc.returncode != 0:
            raise ValueError(_said(proc))
        return parse_description(proc.stdout)
    except ValueError as err:
        raise ReleaseError(f"release {version} does not describe its data formats ({err})") from err


def _check_data(root: Path, rel: Path, version: str, data_dir: Path) -> None:
    """ReleaseError unless the new release, asked with its own Python, reads the data directory
    as it is, and the running release reads what the new one writes (agent/ota/compat.py):
    both decided before the switch."""
    proc = _ask(rel / "bin" / "python", version, "--data-dir", str(data_dir))
    if proc.returncode != 0:
        raise ReleaseError(
            f"release {version} cannot read the data directory: {_said(proc)}; refused"
        )
    writes, _ = _description(rel / "bin" / "python", version)
    running = bootcheck.link_version(root, bootcheck.CURRENT)
    if running is None:
        return  # the first release on this device: there is nothing to roll back to
    _, reads = _description(root / bootcheck.CURRENT / "bin" / "python", running)
    found = rollback_problems(writes, reads)
    if found:
        raise ReleaseError(f"release {version}: {'; '.join(found)}; refused")


def mark_ready(root: Path, data_dir: Path, version: str) -> bool:
    """The agent on ``version`` is READY: the marker in the data directory (naming the switch
    to ``version`` when it is pending: a marker counts for its own switch only,
    bootcheck.is_ready), then the confirmation in the release root when it can write there.
    True when it was pending."""
    doc = bootcheck.load(root)
    switch = bootcheck.switch_id(doc) if bootcheck.name(doc, "pending") == version else None
    text = bootcheck.marker_text(version, switch)
    write_atomic(bootcheck.ready_marker(data_dir, version), text.encode("ascii"))
    try:
        return bootcheck.confirm(root, version)
    except OSError:
        return False


def report(root: Path) -> dict[str, object]:
    """``agent/version`` and ``agent/update`` for the reported state."""
    doc = bootcheck.load(root)
    return {
        "version": bootcheck.link_version(root, bootcheck.CURRENT),
        "pending": bootcheck.name(doc, "pending"),
        "outcome": _plain_outcome(doc.get("outcome")),
    }


#: The fields of an outcome in update.json (bootcheck._outcome) that are reported
OUTCOME_FIELDS = ("version", "result", "reason", "at", "restored", "previous", "cause")


def _plain_outcome(outcome: object) -> dict[str, object] | None:
    """The outcome as bootcheck wrote it, its known fields of plain values only (update.json is
    read as untrusted, and the outcome goes into the reported state; ``at`` a number, which the
    controller compares); None when it is none."""
    if not isinstance(outcome, dict):
        return None
    plain: dict[str, object] = {}
    for key in OUTCOME_FIELDS:
        value = outcome.get(key)
        if isinstance(value, str) and key != "at":
            plain[key] = value[:200]
        elif (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            plain[key] = value
    return plain


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.ota.updater apply --root R --data-dir D --public-key K``."""
    import argparse

    from agent.modelstore.signing import load_public_key

    parser = argparse.ArgumentParser(prog="edge-agent-update")
    parser.add_argument("action", choices=("apply",))
    parser.add_argument("--root", default="/opt/edge-agent")
    parser.add_argument("--data-dir", default="/var/lib/edge-agent")
    parser.add_argument("--public-key", default="/etc/edge-agent/release.pub")
    parser.add_argument("--restart-unit", default=None, help="systemctl restart it after a switch")
    parser.add_argument(
        "--site", action="append", default=[], help="a directory the new venv also sees (tests)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        key = load_public_key(args.public_key)
    except ModelError as err:
        log.error("event=release_key_unreadable error=%s", err)
        return 1
    site = [Path(s) for s in args.site]
    version = apply_staged(Path(args.root), Path(args.data_dir), key, site=site)
    if version is not None and args.restart_unit:
        subprocess.run(["systemctl", "--no-block", "restart", args.restart_unit], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

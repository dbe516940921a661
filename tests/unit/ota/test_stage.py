"""Staging a release on the device (agent/ota/updater.py :func:`stage`) from a real endpoint on
loopback: a partial download torn by a power cut is fetched again instead of refusing a good
release; a file that does not match after a fresh download is still refused; the partial is
fsynced as it grows; a verified release the root helper had no room to install is kept and
handed over again, not fetched again, once there is more room."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.modelstore.fetch import FetchStats
from agent.modelstore.signing import load_public_key
from agent.ota import bootcheck, updater
from agent.ota.controller import UpdateController
from agent.ota.install import MANIFEST_FILE
from agent.ota.release import ReleaseError, ReleaseManifest
from agent.ota.settings import UpdateSettings
from agent.ota.updater import ReleaseFetcher, partial_path, stage
from agent.sync.transport import CoapTransport
from cloud.cli import main as cloud_main
from cloud.server import CloudServer
from drivers.clock import RealClock, ScaledClock

pytestmark = pytest.mark.timeout(60)

FAST = {"ack_timeout": 0.2, "block_deadline": 4.0, "manifest_deadline": 8.0}
BLOCK = 1024  # the fetcher's Block2 size


@dataclass
class Endpoint:
    server: CloudServer
    cloud: Path
    pub: Path
    file: Path  # the stored release file
    sha256: str
    downloads: list[FetchStats] = field(default_factory=list)  # of the release file, by anyone

    def fetcher(self) -> ReleaseFetcher:
        uri = f"coap://127.0.0.1:{self.server.port}"
        return CountingFetcher(CoapTransport(RealClock(), lanes=2), uri, self.downloads, **FAST)


class CountingFetcher(ReleaseFetcher):
    """The device's fetcher, counting the downloads of release files it makes."""

    def __init__(self, transport: Any, uri: str, downloads: list[FetchStats], **kw: Any) -> None:
        super().__init__(transport, uri, **kw)
        self.downloads = downloads

    async def download(self, *args: Any, **kwargs: Any) -> FetchStats:
        stats = await super().download(*args, **kwargs)
        self.downloads.append(stats)
        return stats


def make_bundle(directory: Path) -> Path:
    """A bundle of about 40 blocks (the endpoint does not look into the wheels)."""
    directory.mkdir()
    wheels = {
        "edge_agent-9.9-py3-none-any.whl": random.Random(9).randbytes(40 * BLOCK),
        "pip-26.3-py3-none-any.whl": b"pip wheel",
    }
    for name, data in wheels.items():
        (directory / name).write_bytes(data)
    files = {name: hashlib.sha256(data).hexdigest() for name, data in wheels.items()}
    meta = {"arch": "x86_64", "python": "3.11", "files": files}
    meta.update(project="edge_agent-9.9-py3-none-any.whl", pip="pip-26.3-py3-none-any.whl")
    (directory / "bundle.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[Endpoint]:
    cloud = tmp_path / "cloud"
    assert cloud_main(["releases", "keygen", "--data", str(cloud)]) == 0
    bundle = make_bundle(tmp_path / "bundle")
    assert (
        cloud_main(["releases", "publish", str(bundle), "--data", str(cloud), "--version", "2"])
        == 0
    )
    file = cloud / "releases" / "2" / "release.tar"
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    server = await CloudServer.start(cloud, "127.0.0.1", 0, allow_plain=True)
    try:
        yield Endpoint(server, cloud, cloud / "releases" / "release.key.pub", file, sha)
    finally:
        await server.stop()


def torn_partial(endpoint: Endpoint, data_dir: Path, blocks: int = 20, lost: int = 5) -> Path:
    """What a power cut leaves: the partial's size survived, block ``lost`` never reached the
    card (written, not yet synced) and reads back as zeros."""
    part = partial_path(data_dir, "2")
    part.parent.mkdir(parents=True)
    data = bytearray(endpoint.file.read_bytes()[: blocks * BLOCK])
    data[lost * BLOCK : (lost + 1) * BLOCK] = bytes(BLOCK)
    part.write_bytes(bytes(data))
    return part


async def stage_from(
    endpoint: Endpoint, data_dir: Path, root: Path | None = None
) -> updater.Staged:
    fetcher = endpoint.fetcher()
    try:
        return await stage(
            fetcher,
            version="2",
            sha256=endpoint.sha256,
            key=load_public_key(endpoint.pub),
            data_dir=data_dir,
            root=root,
        )
    finally:
        await fetcher.close()


async def test_attack_power_cut_torn_partial_is_fetched_again_not_refused(
    endpoint: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: the resume trusted the torn blocks, the SHA-256 did not match and the good, signed
    release was refused (not tried again until the desired value changed)."""
    data = tmp_path / "data"
    part = torn_partial(endpoint, data)
    staged = await stage_from(endpoint, data)
    assert staged.file.read_bytes() == endpoint.file.read_bytes()
    assert staged.stats.resumed_from == 0  # the second download started from scratch
    assert not part.exists()
    assert "event=release_partial_dropped version=2 resumed_from=20480" in caplog.text


async def test_a_downloaded_release_is_hashed_off_the_event_loop(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the SHA-256 of the whole release file (tens of MB) was computed on the agent's event
    loop, which samples and detects meanwhile (a Pi Zero hashes about 20 MB/s)."""
    hashed_on: list[int] = []
    check = updater.check_file

    def recording(manifest: object, file: Path) -> None:
        hashed_on.append(threading.get_ident())
        check(manifest, file)  # type: ignore[arg-type]

    monkeypatch.setattr(updater, "check_file", recording)
    staged = await stage_from(endpoint, tmp_path / "data")
    assert staged.file.read_bytes() == endpoint.file.read_bytes()
    assert hashed_on and threading.get_ident() not in hashed_on


async def test_a_release_is_handed_over_off_the_event_loop(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the manifest's and ``staged.json``'s atomic writes (each an fsync: tens to hundreds
    of ms on an SD card) ran on the agent's event loop, which samples meanwhile. Now they run in
    a worker thread, in their order: the manifest (and the file) before ``staged.json``, which
    starts the root helper."""
    written: list[tuple[str, int]] = []
    write = updater.write_atomic

    def recording(path: Path, data: bytes, **kw: Any) -> None:
        written.append((path.name, threading.get_ident()))
        if path.name == updater.STAGED_FILE:  # the release file is in place by then
            assert (path.parent / "2.release").read_bytes() == endpoint.file.read_bytes()
        write(path, data, **kw)

    monkeypatch.setattr(updater, "write_atomic", recording)
    staged = await stage_from(endpoint, tmp_path / "data")
    assert staged.file.read_bytes() == endpoint.file.read_bytes()
    assert [name for name, _ in written] == ["2.manifest", updater.STAGED_FILE]
    assert threading.get_ident() not in {thread for _, thread in written}


async def test_a_fresh_download_that_does_not_match_is_still_refused(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """The endpoint's stored file altered after signing: the resumed download does not match,
    nor does the fresh one after it; refused, and no partial is left."""
    data = tmp_path / "data"
    part = torn_partial(endpoint, data)
    stored = bytearray(endpoint.file.read_bytes())
    stored[30 * BLOCK] ^= 0xFF
    endpoint.file.write_bytes(bytes(stored))
    with pytest.raises(ReleaseError, match="is not the signed file"):
        await stage_from(endpoint, data)
    assert not part.exists()
    assert not (data / "ota" / updater.STAGED_FILE).exists()


def controller(endpoint: Endpoint, tmp_path: Path, clock: Any = None) -> UpdateController:
    """The agent's update stage (data in ``tmp_path / "data"``), release 2 desired."""
    settings = UpdateSettings(root=tmp_path / "opt", public_key=endpoint.pub)
    data = tmp_path / "data"
    clock = clock or RealClock()
    ctl = UpdateController(settings, data, endpoint.fetcher, clock, lambda: False)
    ctl.apply({"version": "2", "sha256": endpoint.sha256})
    return ctl


async def outcome(ctl: UpdateController, but: str | None = None) -> dict[str, Any] | None:
    """The stage loop's outcome once it has one (other than ``but``), waiting at most 30 s."""
    for _ in range(600):
        if ctl.outcome is not None and ctl.outcome["result"] != but:
            break
        await asyncio.sleep(0.05)
    return ctl.outcome


async def test_the_controller_stages_a_release_whose_partial_was_torn(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """The agent's update stage: staged, not refused (a refusal is not retried)."""
    torn_partial(endpoint, tmp_path / "data")
    ctl = controller(endpoint, tmp_path)
    loop = asyncio.create_task(ctl._stage_loop())
    try:
        await outcome(ctl)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert ctl.outcome is not None and ctl.outcome["result"] == "staged", ctl.outcome
    assert ctl._refused is None


async def test_the_partial_is_fsynced_as_it_grows(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only once at the end: a power cut then loses the blocks since the last sync."""
    monkeypatch.setattr(updater, "PART_SYNC_BYTES", 8 * BLOCK)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".part"):
            synced.append(path)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await stage_from(endpoint, tmp_path / "data")
    assert len(synced) >= 2  # periodic ones (one at a time: how many varies) and the last


async def test_attack_a_signed_release_below_the_rollback_floor_is_refused_before_a_block(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """Release 2 was published with rollback index 0; the device confirmed a release published
    with --rollback-index 3 (a security fix): assigning 2 again is refused from its signed
    manifest, before a byte of the file is fetched."""
    bundle = make_bundle(tmp_path / "fixed-bundle")
    argv = ["releases", "publish", str(bundle), "--data", str(endpoint.cloud), "--version", "3"]
    assert cloud_main([*argv, "--rollback-index", "3"]) == 0
    fixed = ReleaseManifest.from_cbor(
        (endpoint.cloud / "releases" / "3" / "manifest.cbor").read_bytes()
    )
    assert fixed.rollback_index == 3
    root, data = tmp_path / "opt", tmp_path / "data"
    rel = root / bootcheck.RELEASES / "3"
    rel.mkdir(parents=True)
    (rel / MANIFEST_FILE).write_bytes(fixed.to_cbor())
    bootcheck.mark_complete(root, "3")
    bootcheck.set_link(root, bootcheck.CURRENT, "releases/3")
    with pytest.raises(ReleaseError, match="rollback index 0 is below this device's floor 3"):
        await stage_from(endpoint, data, root)
    assert not partial_path(data, "2").exists()
    staged = await stage_from(endpoint, tmp_path / "fresh", tmp_path / "fresh-root")
    assert staged.version == "2"  # a device that never ran 3 takes it


async def test_a_release_the_free_space_cannot_hold_waits_and_is_staged_once_there_is_room(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: refused (not tried again until desired agent/version changed, and a refusal stops
    the group's roll-out) when the queue had filled the disk during an outage. The release fits
    the budget: the device reports ``waiting`` with the reason, fetches nothing, tries again,
    and stages it once there is room. Larger than the budget is still a refusal."""
    from agent.ota import controller as update_stage
    from cloud import releasestore, rollout

    room = {"free": 1000}
    no_room_but(room, monkeypatch)
    monkeypatch.setattr(update_stage, "RETRY_BASE", 0.05)
    part = partial_path(tmp_path / "data", "2")
    ctl = controller(endpoint, tmp_path)
    loop = asyncio.create_task(ctl._stage_loop())
    try:
        waiting = await outcome(ctl)
        assert waiting is not None and waiting["result"] == "waiting", waiting
        assert "waiting for free space" in waiting["reason"] and ctl._refused is None
        assert not part.exists() or part.stat().st_size == 0  # nothing fetched
        room["free"] = 1 << 40  # the queue drained
        await outcome(ctl, but="waiting")
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert ctl.outcome is not None and ctl.outcome["result"] == "staged", ctl.outcome
    # The endpoint keeps the outcome, and it does not stop a roll-out.
    row = releasestore.outcome_row(waiting)
    assert row is not None and row[:2] == ("2", "waiting")
    latest = {"pump-1": releasestore.Standing("pump-1", row[1], row[2], row[3])}
    assert rollout.stoppers(latest) == {}
    status = rollout.summary("2", latest, None)
    assert status["counts"] == {"waiting": 1} and "free space" in status["reasons"]["pump-1"]


async def test_a_release_larger_than_the_disk_budget_is_still_refused(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    fetcher = endpoint.fetcher()
    try:
        with pytest.raises(ReleaseError, match="do not fit the disk budget"):
            await stage(
                fetcher,
                version="2",
                sha256=endpoint.sha256,
                key=load_public_key(endpoint.pub),
                data_dir=tmp_path / "data",
                budget_bytes=endpoint.file.stat().st_size - 1,
            )
    finally:
        await fetcher.close()


def test_the_free_space_counts_the_root_helpers_copy_and_unpacked_bundle(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root helper copies the release file into the release root and unpacks it there
    (agent/ota/release.py take, unpack): on one filesystem with DATA that is three times the
    file, so room for the download alone is `waiting`, not a refusal by the helper later."""
    from agent.errors import NotNow

    manifest = ReleaseManifest.from_cbor(
        (endpoint.cloud / "releases" / "2" / "manifest.cbor").read_bytes()
    )
    part = partial_path(tmp_path / "data", "2")
    part.parent.mkdir(parents=True)
    root = tmp_path / "opt"
    root.mkdir()
    room = {"free": 2 * manifest.size}
    no_room_but(room, monkeypatch)
    updater._check_budget(manifest, part, None)  # the download alone fits
    with pytest.raises(NotNow, match="the root helper's copy and its unpacked bundle"):
        updater._check_budget(manifest, part, None, root)
    room["free"] = 3 * manifest.size
    updater._check_budget(manifest, part, None, root)


async def until(done: Any, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if done():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {done}")


class RecordingClock(ScaledClock):
    """The agent's intervals and backoffs at 20,000 times real speed, each one recorded."""

    def __init__(self) -> None:
        super().__init__(20_000.0)
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


def no_room_but(room: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """``shutil.disk_usage`` says ``room["free"]`` bytes are free, wherever it is asked."""
    real = updater.shutil.disk_usage

    def usage(path: object) -> object:
        u = real(path)  # type: ignore[arg-type]
        return type(u)(u.total, u.used, room["free"])

    monkeypatch.setattr(updater.shutil, "disk_usage", usage)


async def test_a_release_the_root_helper_had_no_room_for_is_kept_and_not_fetched_again(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the root helper removed the verified file, its manifest and staged.json whatever the
    outcome (the file even before the install, right after its copy), so every ``waiting``
    (ENOSPC installing) was followed by a download of the whole release again, up to every
    30 min, on a metered link, with no more room than before. Now the helper keeps the file and
    its manifest; the agent hands them over again (the SHA-256 checked again, nothing fetched)
    only once the release root has more room than at the hand-off that failed, and meanwhile
    reports ``waiting`` saying why, tried again with a backoff capped at RETRY_MAX. A refusal by
    the helper still ends it. The real helper (apply_staged) runs each time the agent stages."""
    from agent.ota import controller as update_stage

    room = {"free": 1 << 30}  # enough for the agent's own check (three times the file)
    no_room_but(room, monkeypatch)
    answers: list[Exception] = [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),  # pip, say, filled the disk
        ReleaseError("release 2: refused by the test"),
    ]

    def install(*args: object, **kwargs: object) -> None:
        raise answers.pop(0)

    monkeypatch.setattr(updater, "install", install)
    root, data = tmp_path / "opt", tmp_path / "data"
    root.mkdir()
    key = load_public_key(endpoint.pub)
    staged = data / "ota" / updater.STAGED_FILE
    clock = RecordingClock()
    ctl = controller(endpoint, tmp_path, clock)
    loop = asyncio.create_task(ctl._stage_loop())
    outcomes = []
    try:
        await until(staged.exists)
        assert updater.apply_staged(root, data, key) is None
        outcomes.append(updater.report(root)["outcome"])
        assert sorted(p.name for p in (data / "ota").iterdir()) == ["2.manifest", "2.release"]
        # no more room than before: not handed over again, nothing fetched, said, backoff capped
        await until(lambda: clock.sleeps.count(update_stage.RETRY_MAX) >= 3)
        assert max(clock.sleeps) == update_stage.RETRY_MAX
        assert not staged.exists() and len(endpoint.downloads) == 1
        said = ctl.reported()["agent/update"]
        assert said["result"] == "waiting", said
        assert "the root helper had no room to install it" in said["reason"]
        assert os.strerror(errno.ENOSPC) in said["reason"]
        room["free"] += update_stage.ROOM_GAIN  # the queue drained, say
        await until(staged.exists)
        assert len(endpoint.downloads) == 1  # the kept file, handed over again
        await until(lambda: ctl._after is not None and not ctl._after.done())  # watching it
        assert updater.apply_staged(root, data, key) is None
        outcomes.append(updater.report(root)["outcome"])
        await until(ctl._after.done)  # the refusal ends it, and holds the release (update.json)
        assert ctl._held(("2", endpoint.sha256)) and ctl._refused is None
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert [o["result"] for o in outcomes] == ["waiting", "refused"]  # type: ignore[index]
    assert os.strerror(errno.ENOSPC) in outcomes[0]["reason"]  # type: ignore[index]
    assert list((data / "ota").iterdir()) == []
    assert not (root / updater.TAKEN_FILE).exists()
    assert not (root / bootcheck.RELEASES / "2").exists()
    assert ctl._after is not None and ctl._after.done()


async def test_a_staged_file_a_power_cut_took_is_fetched_again_without_waiting_for_room(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut during the root helper's install (one filesystem: the agent's file already
    removed for it) that took root's copy too: at the next run the helper has neither. Was:
    ``refused``, the release never tried again on the device. Now the helper says ``waiting``
    with the cause ``staged_file_missing``, and the agent fetches and stages it again after the
    backoff, with the free space as it was: the room rule (handed over again only once the
    release root has ROOM_GAIN more free) is for a helper that had no room, not for this."""
    room = {"free": 1 << 30}  # enough for the agent's own check, and it never changes
    no_room_but(room, monkeypatch)
    root, data = tmp_path / "opt", tmp_path / "data"
    root.mkdir()
    key = load_public_key(endpoint.pub)
    staged = data / "ota" / updater.STAGED_FILE
    ctl = controller(endpoint, tmp_path, RecordingClock())
    loop = asyncio.create_task(ctl._stage_loop())
    try:
        await until(staged.exists)
        (data / "ota" / "2.release").unlink()  # freed for the install; the cut took the copy
        assert updater.apply_staged(root, data, key) is None  # the next boot's run
        said = updater.report(root)["outcome"]
        assert said["result"] == "waiting", said  # type: ignore[index]
        assert said["cause"] == updater.STAGED_FILE_MISSING  # type: ignore[index]
        await until(lambda: len(endpoint.downloads) == 2 and staged.exists())
        assert (data / "ota" / "2.release").read_bytes() == endpoint.file.read_bytes()
        assert ctl._refused is None and ctl._no_room is None
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_a_kept_release_is_staged_again_unfetched_and_one_altered_since_is_fetched(
    endpoint: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Staging a release whose verified file the root helper kept (it had no room) fetches no
    block; the file's size and SHA-256 are checked again first, and a kept file that no longer
    matches (altered at rest) is removed and the release fetched again."""
    caplog.set_level(logging.INFO, logger=updater.__name__)
    data = tmp_path / "data"
    ota = data / "ota"
    size = endpoint.file.stat().st_size
    await stage_from(endpoint, data)
    (ota / updater.STAGED_FILE).unlink()  # taken by the root helper, which had no room
    again = await stage_from(endpoint, data)
    assert again.stats.bytes == 0 and [d.bytes for d in endpoint.downloads] == [size]
    assert again.file.read_bytes() == endpoint.file.read_bytes()
    assert (ota / updater.STAGED_FILE).exists()
    assert "event=release_kept version=2" in caplog.text
    (ota / updater.STAGED_FILE).unlink()
    altered = bytearray(again.file.read_bytes())
    altered[7 * BLOCK] ^= 0x01
    again.file.write_bytes(bytes(altered))
    third = await stage_from(endpoint, data)
    assert third.stats.bytes == size and third.file.read_bytes() == endpoint.file.read_bytes()
    assert "event=release_kept_dropped version=2" in caplog.text


async def test_a_release_freed_during_the_install_is_given_back_and_staged_again_unfetched(
    endpoint: Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DATA and the release root on one filesystem (the usual device): the real root helper
    removes the agent's file once its checked copy is made, so the file does not hold room the
    install needs (was: it stayed during the whole install since the helper kept it for
    ``waiting``). When the install still has no room the copy is renamed back, and staging
    again fetches nothing. When it cannot be given back, that is said and the release is
    fetched again, not refused."""
    seen: list[bool] = []

    def install(*args: object, **kwargs: object) -> None:
        seen.append((data / "ota" / "2.release").exists())
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(updater, "install", install)
    root, data = tmp_path / "opt", tmp_path / "data"
    key = load_public_key(endpoint.pub)
    await stage_from(endpoint, data)
    assert updater.apply_staged(root, data, key) is None
    assert seen == [False]  # freed for the install
    assert updater.report(root)["outcome"]["result"] == "waiting"  # type: ignore[index]
    assert (data / "ota" / "2.release").read_bytes() == endpoint.file.read_bytes()
    again = await stage_from(endpoint, data)
    assert again.stats.bytes == 0 and len(endpoint.downloads) == 1  # given back, not fetched

    def lost(*args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(bootcheck, "give_data", lost)
    assert updater.apply_staged(root, data, key) is None
    assert updater.report(root)["outcome"]["result"] == "waiting"  # type: ignore[index]
    assert "event=release_kept_lost version=2" in caplog.text
    assert not (data / "ota" / "2.release").exists()
    assert not (root / updater.TAKEN_FILE).exists()
    third = await stage_from(endpoint, data)
    assert len(endpoint.downloads) == 2 and third.stats.bytes == endpoint.file.stat().st_size
    assert third.file.read_bytes() == endpoint.file.read_bytes()


async def test_a_kept_release_no_longer_wanted_is_removed(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """A kept release file counts against ``[update] disk_budget_mb``, so only the wanted one
    stays: staging another removes it, and so does withdrawing the assignment, except while
    ``staged.json`` still hands it to the root helper."""
    data = tmp_path / "data"
    ota = data / "ota"
    ota.mkdir(parents=True)
    for name in ("1.5.release", "1.5.manifest"):  # kept, then the assignment moved on to 2
        (ota / name).write_bytes(b"x" * BLOCK)
    await stage_from(endpoint, data)
    assert sorted(p.name for p in ota.iterdir()) == ["2.manifest", "2.release", "staged.json"]
    ctl = controller(endpoint, tmp_path)
    ctl.apply(None)  # withdrawn while the root helper has yet to take 2
    loop = asyncio.create_task(ctl._stage_loop())
    try:
        gone = ota / "1.6.part"  # seen gone: the stage loop has looked
        gone.write_bytes(b"x")
        await until(lambda: not gone.exists())
        assert sorted(p.name for p in ota.iterdir()) == ["2.manifest", "2.release", "staged.json"]
        (ota / updater.STAGED_FILE).unlink()  # taken; it had no room
        ctl.apply(None)
        await until(lambda: not (ota / "2.release").exists())
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert list(ota.iterdir()) == []


async def test_partials_of_releases_no_longer_wanted_do_not_pile_up(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """Each release whose assignment moved on (or was withdrawn) in the middle of its download
    left ``DATA/ota/<version>.part`` behind, up to a whole release file each, forever: nothing
    resumes a version that is not wanted. Staging another release removes them; a gateway
    mirror's partial in the same directory (``release-V.part``) is not the updater's."""
    data = tmp_path / "data"
    abandoned = [partial_path(data, f"1.{n}") for n in range(10)]
    abandoned[0].parent.mkdir(parents=True)
    for part in abandoned:
        part.write_bytes(endpoint.file.read_bytes()[: 10 * BLOCK])
    mirror = data / "ota" / "release-3.part"  # agent/gateway/releases.py names it so
    mirror.write_bytes(b"x" * BLOCK)
    staged = await stage_from(endpoint, data)
    assert staged.file.read_bytes() == endpoint.file.read_bytes()
    left = sorted(p.name for p in (data / "ota").iterdir())
    assert left == ["2.manifest", "2.release", mirror.name, updater.STAGED_FILE]


async def test_a_gateway_mirror_drops_the_partials_of_releases_no_longer_assigned(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """The same on a gateway (agent/gateway/releases.py): its scratch partials
    ``release-V.part`` of assignments that moved on mid-download are removed before the next
    fetch; the device updater's own partials beside them are not the mirror's."""
    from agent.gateway.releases import ReleaseMirror

    scratch = tmp_path / "gateway" / "ota"
    scratch.mkdir(parents=True)
    for n in range(10):
        (scratch / f"release-1.{n}.part").write_bytes(endpoint.file.read_bytes()[: 10 * BLOCK])
    own = partial_path(tmp_path / "gateway", "1.9")  # the gateway host's own update
    own.write_bytes(b"x" * BLOCK)
    storage = await CloudServer.start(tmp_path / "gateway" / "store", "127.0.0.1", 0)
    fetcher = endpoint.fetcher()
    try:
        mirror = ReleaseMirror(fetcher, storage.db, scratch)
        await mirror.fetch(await fetcher.release_manifest("2"))
        assert await storage.db(lambda s: s.release("2")) is not None
    finally:
        await fetcher.close()
        await storage.stop()
    assert sorted(p.name for p in scratch.iterdir()) == [own.name]


def test_a_kept_release_named_like_a_mirror_file_is_dropped_when_not_wanted(
    tmp_path: Path,
) -> None:
    """Disk budget: the agent's kept files of release ``release-1.0`` (a valid release name) were
    taken for a gateway mirror's and never removed once another release was wanted: up to a
    whole release file held for as long as the device runs. A mirror writes only partials
    (``release-V.part``): those alone are left to it."""
    ota = tmp_path / "ota"
    ota.mkdir()
    for name in ("release-1.0.release", "release-1.0.manifest", "release-2.0.part", "staged.json"):
        (ota / name).write_bytes(b"x")
    dropped = updater.drop_unwanted(ota, "2.0", suffixes=updater.KEPT_SUFFIXES)
    assert sorted(dropped) == ["release-1.0.manifest", "release-1.0.release"]
    assert sorted(p.name for p in ota.iterdir()) == ["release-2.0.part", "staged.json"]


async def test_after_a_power_cut_in_the_install_the_restarted_agent_does_not_fetch_it_again(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut during the root helper's install (one filesystem: the agent's file already
    removed, root's checked copy made): at the next boot the helper resumes from its copy
    (test_root_helper.py) and the agent starts again. Was: the agent staged release 2 again,
    downloading the whole file (its own was gone) while the helper installed root's copy, and
    the helper's cleanup then removed that download. Now, ``staged.json`` already naming the
    wanted release (its manifest, the wanted SHA-256, there; the file there or root's copy),
    it only watches what the helper makes of it (_after_root), and reports ``staged``. A
    ``staged.json`` left from a release no longer wanted (1.5, whose install a cut stopped
    too, then the assignment moved on) does not keep the agent from staging the wanted one."""
    root, data = tmp_path / "opt", tmp_path / "data"
    ota = data / "ota"
    ota.mkdir(parents=True)
    root.mkdir()
    (ota / updater.STAGED_FILE).write_text(json.dumps({"version": "1.5"}))
    (ota / "1.5.manifest").write_bytes(b"x" * BLOCK)
    (root / updater.TAKEN_FILE).write_bytes(b"x" * BLOCK)  # root's copy of 1.5
    first = controller(endpoint, tmp_path, RecordingClock())
    loop = asyncio.create_task(first._stage_loop())
    try:
        await until(lambda: first._after is not None)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert len(endpoint.downloads) == 1 and updater.staged_version(data) == "2"
    assert sorted(p.name for p in ota.iterdir()) == ["2.manifest", "2.release", "staged.json"]
    # the helper takes it: root's copy made, the agent's file freed; the power goes in the install
    os.replace(ota / "2.release", root / updater.TAKEN_FILE)
    (root / bootcheck.RELEASES / "2" / "bundle").mkdir(parents=True)
    agent = controller(endpoint, tmp_path, RecordingClock())  # the agent's start at the next boot
    loop = asyncio.create_task(agent._stage_loop())
    try:
        await until(lambda: agent._after is not None)
        assert len(endpoint.downloads) == 1  # not fetched again
        said = agent.reported()["agent/update"]
        assert (said["version"], said["result"]) == ("2", "staged"), said
        installed: list[bytes] = []

        def install(root: Path, manifest: ReleaseManifest, file: Path, **kw: object) -> Path:
            installed.append(file.read_bytes())
            bootcheck.mark_complete(root, manifest.version)  # the bundle unpacked, say
            return root / bootcheck.RELEASES / manifest.version

        monkeypatch.setattr(updater, "install", install)
        monkeypatch.setattr(updater, "_check_data", lambda *args: None)  # no venv to ask
        key = load_public_key(endpoint.pub)
        assert updater.apply_staged(root, data, key) == "2"  # the helper's run at that boot
        await until(agent._after.done)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert installed == [endpoint.file.read_bytes()]
    assert len(endpoint.downloads) == 1
    assert agent.reported()["agent/update"] == {"version": "2", "result": "pending"}
    assert list(ota.iterdir()) == [] and agent._refused is None

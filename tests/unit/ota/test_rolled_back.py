"""A release rolled back on the device, or refused by the root helper, is tried at most once per
assignment (agent/ota/controller.py): the agent, started again with desired ``agent/version``
still naming it, does not stage it again; it keeps reporting ``rolled_back`` or ``refused`` with
the reason. Assigning it again (withdrawn, then assigned: a new write of the key) tries it once
more; another release is staged as usual; the root helper's ``waiting`` is not held. The real
pieces on each side: a loopback endpoint counting downloads, the controller's stage loop, the
root helper (apply_staged, the install only marked complete, or failing as pip does), the boot
counter and the health timer."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.errors import NotNow
from agent.modelstore.signing import load_public_key
from agent.ota import bootcheck, updater
from agent.ota import controller as update_stage
from agent.ota.controller import UpdateController
from agent.ota.release import ReleaseError, ReleaseManifest
from cloud.cli import main as cloud_main
from tests.unit.ota import test_stage
from tests.unit.ota.test_stage import Endpoint, RecordingClock, controller, make_bundle, until

pytestmark = pytest.mark.timeout(60)

HELD = "event=release_held version=2"
endpoint = test_stage.endpoint  # the fixture: release 2 on a loopback endpoint, downloads counted


def device(
    endpoint: Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> tuple[Path, Path, Path, Any]:
    """The device runs release 1 (installed, ``current``); the root helper's install only marks
    a release complete (no venv or pip); the controller's log is captured. (The release root,
    the data directory, ``staged.json`` there, the release key.)"""
    caplog.set_level(logging.INFO, logger=update_stage.__name__)
    root, data = tmp_path / "opt", tmp_path / "data"
    (root / bootcheck.RELEASES / "1").mkdir(parents=True)
    bootcheck.mark_complete(root, "1")
    bootcheck.set_link(root, bootcheck.CURRENT, "releases/1")
    bootcheck.set_link(root, bootcheck.VENV, bootcheck.CURRENT)

    def install(root: Path, manifest: ReleaseManifest, file: Path, **kw: object) -> Path:
        rel = root / bootcheck.RELEASES / manifest.version
        rel.mkdir(parents=True, exist_ok=True)
        bootcheck.mark_complete(root, manifest.version)
        return rel

    monkeypatch.setattr(updater, "install", install)
    monkeypatch.setattr(updater, "_check_data", lambda *args: None)  # no venv to ask
    staged = data / updater.OTA_DIR / updater.STAGED_FILE
    return root, data, staged, load_public_key(endpoint.pub)


def fails(root: Path, data: Path, how: str) -> str:
    """Release 2, switched to, never reaches READY: rolled back by the boot counter (each
    start of the service counted) or by the health timer (it starts and keeps running). The
    reason recorded."""
    if how == "starts":
        while bootcheck.start(root, data) == "2":
            pass
    else:
        assert bootcheck.start(root, data) == "2"
        while bootcheck.health(root, data, 60, True) == "2":
            pass
    assert bootcheck.link_version(root, bootcheck.CURRENT) == "1"
    said = updater.report(root)["outcome"]
    assert isinstance(said, dict) and said["result"] == "rolled_back", said
    return str(said["reason"])


async def looks(ctl: UpdateController, staged: Path, caplog: pytest.LogCaptureFixture) -> bool:
    """Run the agent's stage loop until it has staged the desired release (True) or held it
    back (False, said in the log)."""
    loop = asyncio.create_task(ctl._stage_loop())
    try:
        await until(lambda: staged.exists() or HELD in caplog.text)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    return HELD not in caplog.text


async def assigned_again(
    ctl: UpdateController, endpoint: Endpoint, staged: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Release 2 withdrawn and assigned again (a new write of the key): staged once more."""
    caplog.clear()
    ctl.apply(None)
    ctl.apply({"version": "2", "sha256": endpoint.sha256})
    assert await looks(ctl, staged, caplog)


async def held_then_assigned_again(
    endpoint: Endpoint, tmp_path: Path, staged: Path, caplog: pytest.LogCaptureFixture
) -> UpdateController:
    """The agent started again (desired still 2) holds release 2; assigned again, it stages it
    once more. That agent."""
    caplog.clear()
    ctl = controller(endpoint, tmp_path, RecordingClock())
    assert not await looks(ctl, staged, caplog)
    await assigned_again(ctl, endpoint, staged, caplog)
    return ctl


@pytest.mark.parametrize("how", ["starts", "health"])
async def test_a_release_rolled_back_here_is_not_staged_again_for_the_same_assignment(
    endpoint: Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """Was: nothing in the controller read a ``rolled_back`` outcome, so each start of the
    restored agent (desired still 2: the operator has not changed it, a staged roll-out only
    stops further assignment) staged 2 again, downloading it; the helper switched to it again,
    it failed again (three starts or a 10-minute window) and was rolled back again: a loop for
    as long as the assignment stood (four starts: four downloads, four switches)."""
    root, data, staged, key = device(endpoint, tmp_path, monkeypatch, caplog)
    switched = []
    reason = ""
    for start in range(4):  # the agent's starts on release 1, desired 2 throughout
        caplog.clear()
        ctl = controller(endpoint, tmp_path, RecordingClock())
        assert ctl.running == "1"
        if await looks(ctl, staged, caplog):
            assert updater.apply_staged(root, data, key) == "2"
            switched.append(start)
            reason = fails(root, data, how)
        said = ctl.reported()["agent/update"]
        assert said is not None and (said["version"], said["result"]) == ("2", "rolled_back")
        assert said["reason"] == reason and said["restored"] == "1"
    assert switched == [0]
    assert len(endpoint.downloads) == 1
    assert "did not reach READY in 3 starts" in reason or "health window" in reason
    assert list((data / updater.OTA_DIR).iterdir()) == []


async def test_assigning_it_again_tries_it_once_more_and_another_release_is_staged(
    endpoint: Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The operator fixed the cause (say, the configuration) and wants 2 tried again: the same
    value written again is no change on the endpoint (statedoc.apply_desired), so the way is to
    withdraw it and assign it again. The agent that sees that write stages 2 once more; rolled
    back again, it is held again at the next start. Another release is staged as usual."""
    root, data, staged, key = device(endpoint, tmp_path, monkeypatch, caplog)
    assert await looks(controller(endpoint, tmp_path, RecordingClock()), staged, caplog)
    assert updater.apply_staged(root, data, key) == "2"
    fails(root, data, "starts")
    await held_then_assigned_again(endpoint, tmp_path, staged, caplog)  # the restored agent
    assert len(endpoint.downloads) == 2
    assert updater.apply_staged(root, data, key) == "2"
    fails(root, data, "health")
    caplog.clear()
    ctl = controller(endpoint, tmp_path, RecordingClock())
    assert not await looks(ctl, staged, caplog)
    assert len(endpoint.downloads) == 2
    said = ctl.reported()["agent/update"]
    assert said is not None and said["result"] == "rolled_back" and "health" in said["reason"]
    # another release (3) assigned: staged
    bundle = make_bundle(tmp_path / "bundle-3")
    argv = ["releases", "publish", str(bundle), "--data", str(endpoint.cloud), "--version", "3"]
    assert cloud_main(argv) == 0
    three = ReleaseManifest.from_cbor(
        (endpoint.cloud / "releases" / "3" / "manifest.cbor").read_bytes()
    )
    ctl.apply({"version": "3", "sha256": three.sha256})
    loop = asyncio.create_task(ctl._stage_loop())
    try:
        await until(lambda: updater.staged_version(data) == "3")
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert len(endpoint.downloads) == 3


def install_fails(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """The root helper's install of release 2 raises ``error``: a ReleaseError as a failed pip
    does (``refused``), NotNow as one with no room does (``waiting``)."""

    def install(root: Path, manifest: ReleaseManifest, file: Path, **kw: object) -> Path:
        raise error

    monkeypatch.setattr(updater, "install", install)


PIP_FAILED = "release 2: pip install failed: ERROR: No matching distribution found for numpy"


@pytest.mark.parametrize("why", ["pip", "file"])
async def test_a_release_the_root_helper_refused_is_not_staged_again_for_the_same_assignment(
    endpoint: Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    why: str,
) -> None:
    """Was: the agent remembered a refusal of the root helper (its ``refused`` in update.json:
    pip failed, the signature or floor check, a release file not the signed one) in memory only,
    so each start of the agent with desired still 2 downloaded it again (tens of MB, on a
    metered link) and handed it over again, and the helper refused it again: three starts, three
    downloads and three refusals. Now it is held, as a rolled-back one is; reported ``refused``
    with the helper's reason."""
    root, data, staged, key = device(endpoint, tmp_path, monkeypatch, caplog)
    if why == "pip":
        install_fails(monkeypatch, ReleaseError(PIP_FAILED))
    refused = []
    for start in range(3):  # the agent's starts on release 1, desired 2 throughout
        caplog.clear()
        ctl = controller(endpoint, tmp_path, RecordingClock())
        if await looks(ctl, staged, caplog):
            if why == "file":  # the agent's file no longer the signed one (a bad card, a hand)
                with (data / updater.OTA_DIR / "2.release").open("r+b") as f:
                    f.write(b"\0")
            assert updater.apply_staged(root, data, key) is None
            refused.append(start)
        else:
            assert "result=refused" in caplog.text
        said = ctl.reported()["agent/update"]
        assert said is not None and (said["version"], said["result"]) == ("2", "refused")
        assert PIP_FAILED in said["reason"] if why == "pip" else "signed" in said["reason"]
    assert refused == [0]
    assert len(endpoint.downloads) == 1
    assert bootcheck.link_version(root, bootcheck.CURRENT) == "1"
    assert list((data / updater.OTA_DIR).iterdir()) == []


async def test_a_root_refusal_is_tried_once_more_when_assigned_again(
    endpoint: Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The retry rule of a rollback: the operator withdraws 2 and assigns it again; the agent
    that sees that write stages it once more. Refused again, it is held again, by the same
    process too (from update.json: nothing of it in memory). The cause fixed (say, the wheel the
    pip install missed) and assigned again: installed and switched to."""
    root, data, staged, key = device(endpoint, tmp_path, monkeypatch, caplog)
    install = updater.install
    install_fails(monkeypatch, ReleaseError(PIP_FAILED))
    assert await looks(controller(endpoint, tmp_path, RecordingClock()), staged, caplog)
    assert updater.apply_staged(root, data, key) is None
    ctl = await held_then_assigned_again(endpoint, tmp_path, staged, caplog)  # restarted
    assert len(endpoint.downloads) == 2
    assert updater.apply_staged(root, data, key) is None  # refused again
    caplog.clear()
    ctl._wake.set()  # the same process looks again
    assert not await looks(ctl, staged, caplog)
    monkeypatch.setattr(updater, "install", install)  # the cause fixed
    await assigned_again(ctl, endpoint, staged, caplog)
    assert updater.apply_staged(root, data, key) == "2"
    assert len(endpoint.downloads) == 3


async def test_a_release_the_root_helper_had_no_room_for_is_not_held(
    endpoint: Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``waiting`` (no room to install it) is retried by design: after a restart the agent
    hands the kept file over again (no download), it is not held."""
    root, data, staged, key = device(endpoint, tmp_path, monkeypatch, caplog)
    install_fails(monkeypatch, NotNow("release 2: pip install: No space left on device"))
    assert await looks(controller(endpoint, tmp_path, RecordingClock()), staged, caplog)
    assert updater.apply_staged(root, data, key) is None
    said = updater.report(root)["outcome"]
    assert isinstance(said, dict) and said["result"] == "waiting"
    caplog.clear()
    assert await looks(controller(endpoint, tmp_path, RecordingClock()), staged, caplog)
    assert len(endpoint.downloads) == 1  # the kept file handed over again

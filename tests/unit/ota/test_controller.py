"""Desired ``agent/version`` (agent/wire/statedoc.py, agent/ota/controller.py): hostile values
are refused by both sides, an agent without a release key refuses any, and what is reported."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from agent.ota import bootcheck as bc
from agent.ota import controller as controller_mod
from agent.ota.controller import UpdateController, check_value
from agent.ota.settings import UpdateSettings
from agent.wire.statedoc import StateError, check_desired
from drivers.clock import RealClock
from tests.unit.ota.test_stage import until

pytestmark = pytest.mark.timeout(30)

GOOD = {"version": "0.2.0", "sha256": "ab" * 32}


@pytest.mark.parametrize(
    "value",
    [
        "0.2.0",  # a bare version: the operator must name the file too
        {"version": "0.2.0"},
        {"version": "0.2.0", "sha256": "AB" * 32},  # upper case is not the canonical form
        {"version": "../../etc", "sha256": "ab" * 32},  # a path as a version
        {"version": "0.2.0", "sha256": "ab" * 32, "url": "http://evil"},  # extra keys
        {"version": ["0.2.0"], "sha256": "ab" * 32},
        {"version": "v" * 65, "sha256": "ab" * 32},
    ],
)
def test_hostile_desired_versions_are_refused(value: Any) -> None:
    with pytest.raises(StateError, match="agent/version"):
        check_desired("agent/version", value)
    with pytest.raises(ValueError, match="agent/version: expected"):
        check_value(value)


def test_a_good_value() -> None:
    check_desired("agent/version", GOOD)
    assert check_value(GOOD) == ("0.2.0", "ab" * 32)
    assert check_value(None) is None


def controller(tmp_path: Path, key: Path | None) -> UpdateController:
    settings = UpdateSettings(root=tmp_path / "opt", public_key=key)
    return UpdateController(settings, tmp_path / "data", lambda: None, RealClock(), lambda: True)  # type: ignore[arg-type,return-value]


def test_without_a_release_key_every_release_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no \\[update\\] public_key"):
        controller(tmp_path, None).apply(GOOD)


def make_root(tmp_path: Path) -> Path:
    root = tmp_path / "opt"
    for version in ("1.0", "1.1"):
        (root / bc.RELEASES / version).mkdir(parents=True)
        bc.mark_complete(root, version)
    bc.set_link(root, bc.CURRENT, "releases/1.0")
    return root


def test_reported_state(tmp_path: Path) -> None:
    assert controller(tmp_path, None).reported() == {"agent/version": None, "agent/update": None}
    root = make_root(tmp_path)
    c = controller(tmp_path, tmp_path / "release.pub")  # this process runs 1.0
    assert c.reported() == {"agent/version": "1.0", "agent/update": None}
    bc.switch(root, "1.1")  # the root helper switched under the running 1.0
    assert c.reported() == {
        "agent/version": "1.0",
        "agent/update": {"version": "1.1", "result": "pending"},
    }
    bc.rollback(root, "test")
    reported = c.reported()
    assert reported["agent/update"]["result"] == "rolled_back"
    assert reported["agent/update"]["reason"] == "test"


async def test_the_old_release_never_confirms_the_new_one(tmp_path: Path) -> None:
    """1.0 reaches READY only after the helper switched to 1.1: its marker names 1.0."""
    root = make_root(tmp_path)
    c = controller(tmp_path, tmp_path / "release.pub")
    bc.switch(root, "1.1")
    c.ready()
    await c._confirm()
    assert bc.ready_marker(tmp_path / "data", "1.0").is_file()
    assert not bc.ready_marker(tmp_path / "data", "1.1").exists()
    assert bc.load(root)["pending"] == "1.1"


def test_the_newest_outcome_is_reported(tmp_path: Path) -> None:
    """Staged by the agent, then refused by the root helper: the refusal is what shows."""
    root = make_root(tmp_path)
    c = controller(tmp_path, tmp_path / "release.pub")
    c.outcome = {"version": "1.1", "result": "staged", "bytes": 1, "at": 1.0}
    assert c.reported()["agent/update"]["result"] == "staged"
    doc = bc.load(root)
    doc["outcome"] = {"version": "1.1", "result": "refused", "reason": "bad", "at": 2.0}
    bc.save(root, doc)
    assert c.reported()["agent/update"]["result"] == "refused"


async def test_an_outcome_of_this_run_shows_over_an_older_root_one_whatever_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root helper's last outcome (1.1 updated) was written before a reboot; the device came
    back with its wall clock at 1970 (no RTC, no NTP yet) and the agent refused release 1.2 (its
    key is not there). Before: the newer of the two outcomes was chosen by wall-clock time, so
    the refusal (stamped 1970) never showed; the cloud, whose roll-out stops on a refusal, saw
    1.1 updated instead, also after NTP."""
    root = make_root(tmp_path)
    doc = bc.load(root)
    doc["outcome"] = {"version": "1.1", "result": "updated", "previous": "1.0", "at": 1.79e9}
    bc.save(root, doc)
    c = controller(tmp_path, tmp_path / "missing.pub")
    monkeypatch.setattr(controller_mod.time, "time", lambda: 30.0)
    c.apply({"version": "1.2", "sha256": "ab" * 32})
    loop = asyncio.create_task(c._stage_loop())
    try:
        await until(lambda: c.outcome is not None)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    got = c.reported()["agent/update"]
    assert (got["version"], got["result"]) == ("1.2", "refused")
    doc = bc.load(root)  # the root helper writes an outcome after it: that one shows
    doc["outcome"] = {"version": "1.2", "result": "refused", "reason": "pip", "at": 31.0}
    bc.save(root, doc)
    assert c.reported()["agent/update"]["reason"] == "pip"

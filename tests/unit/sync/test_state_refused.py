"""Reported values the endpoint refuses (agent/sync/state.py) against the real endpoint on
loopback: one bad value refuses a whole reported PUT (4.00), so it must never cost the device the
other keys of that PUT.

- A value kept in the state file from before the endpoint refused such values (a text with a NUL,
  which PostgreSQL cannot store) is dropped when the file is loaded, said once with its key, and
  never sent: before, every full report sent it with the others and got 4.00 for all of them.
- A 4.00 the device cannot foresee (the endpoint's stored value of one key is damaged at rest) is
  answered by sending the halves again until the refused key is alone: the keys that changed at
  the same moment are acknowledged, only the refused one waits.
- Versions numbered while the device's wall clock ran years ahead (a bad NTP server) are refused
  by the endpoint's version bound; once the clock is set back, the device numbers from its wall
  clock again instead of from the versions it issued then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.sync import state as state_mod
from agent.sync.state import StateSync
from agent.sync.statedata import StateSettings, decode_state, encode_state
from agent.sync.transport import CoapTransport, Endpoints
from agent.wire.statedoc import Entry, decode_value
from cloud.server import CloudServer
from drivers.clock import RealClock
from tools.ports import free_port

pytestmark = pytest.mark.timeout(60)

DEVICE = "pump-01"
BAD_KEY = "sensor/bme280/error"
BAD_VALUE = "i2c\x00garbage"  # a driver's error text with a NUL, saved before the upgrade
FAST = StateSettings(report_interval=0.3, min_put_interval=0.02, deadline=2.0)
QUIET = StateSettings(report_interval=60.0, min_put_interval=0.02, deadline=2.0)


@pytest.fixture(autouse=True)
def fast_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "BACKOFF_BASE", 0.02)
    monkeypatch.setattr(state_mod, "BACKOFF_CAP", 0.2)
    monkeypatch.setattr(state_mod, "BACKOFF_FLOOR", 0.01)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", free_port(), allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


class Hooks:
    """The runtime's side: reports ``values``, applies nothing."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def reported(self) -> dict[str, Any]:
        return dict(self.values)

    def apply(self, key: str, value: Any) -> None:
        raise ValueError("this test applies nothing")


class SteppedClock(RealClock):
    """The real clock, its wall clock set ``offset`` seconds off (NTP or an operator steps it)."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


@contextlib.asynccontextmanager
async def running(
    server: CloudServer,
    path: Path,
    hooks: Hooks,
    settings: StateSettings,
    clock: RealClock | None = None,
) -> AsyncIterator[StateSync]:
    clock = clock or RealClock()
    transport = CoapTransport(clock)
    sync = StateSync(
        settings,
        transport,
        Endpoints((server.uri,), clock),
        clock,
        device_id=DEVICE,
        state_path=path,
        hooks=hooks,
    )
    sync.restore()
    task = asyncio.create_task(sync.run())
    try:
        yield sync
        assert not task.done(), task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await transport.close()


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, limit: float) -> None:
    """Poll ``condition`` until it holds (a bound on waiting, not a timing assertion)."""
    try:
        async with asyncio.timeout(limit):
            while True:
                if await condition():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(what) from None


async def at_endpoint(server: CloudServer) -> dict[str, Entry]:
    return await server.reported(DEVICE)


def lines(caplog: pytest.LogCaptureFixture, *parts: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if all(p in r.getMessage() for p in parts)]


async def test_attack_a_nul_value_saved_before_the_upgrade_is_dropped_at_restore_not_sent(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The state file holds three pending keys, one of them a text with a NUL (saved before the
    endpoint refused them); the runtime reports the same values, so nothing is numbered again.
    Before: each full report PUT the three together, got 4.00 and dropped all three, for ever."""
    caplog.set_level(logging.DEBUG, logger="agent.sync.state")
    path = tmp_path / "state.cbor"
    t = int(time.time() * 1000)
    saved = {"link/state": Entry(t, "up"), BAD_KEY: Entry(t + 1, BAD_VALUE)}
    saved["queue/depth"] = Entry(t + 2, 12)
    path.write_bytes(encode_state(DEVICE, t + 2, 0, saved, set(saved), {}, {}))
    hooks = Hooks({k: e.value for k, e in saved.items()})

    async with running(server, path, hooks, FAST) as sync:

        async def delivered() -> bool:
            got = await at_endpoint(server)
            return "link/state" in got and "queue/depth" in got and sync.status["pending"] == 0

        await wait_for(delivered, "the good saved keys acknowledged", limit=5)
        await asyncio.sleep(3 * FAST.report_interval)  # full reports go on, none refused
    got = await at_endpoint(server)
    assert got["link/state"] == Entry(t, "up") and got["queue/depth"] == Entry(t + 2, 12)
    assert BAD_KEY not in got
    assert BAD_KEY not in decode_state(path.read_bytes())["reported"]
    skipped = lines(caplog, "event=reported_key_skipped", repr(BAD_KEY))
    assert len(skipped) == 1 and "NUL character" in skipped[0]  # said once, with the key
    assert lines(caplog, "event=reported_refused") == []


async def test_attack_a_value_the_endpoints_database_refuses_costs_only_its_own_key(
    server: CloudServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The endpoint's database refuses ``queue/depth``'s new value (DataRefused, as PostgreSQL
    does a value it cannot hold): 4.00 to every PUT holding that key, which the device cannot
    foresee. ``link/state`` changes at the same moment and goes in the same PUT: before, both
    were dropped until they changed again."""
    from cloud.storage import SQLiteStorage
    from cloud.storebase import DataRefused

    caplog.set_level(logging.INFO, logger="agent.sync.state")
    hooks = Hooks({"agent/version": "1.0", "link/state": "up", "queue/depth": 1})
    async with running(server, tmp_path / "state.cbor", hooks, QUIET) as sync:

        async def settled() -> bool:
            return "queue/depth" in await at_endpoint(server) and sync.status["pending"] == 0

        await wait_for(settled, "first report", limit=10)

        real = SQLiteStorage.put_reported

        def refusing(self: Any, device: str, entries: Any, *args: Any, **kw: Any) -> Any:
            if "queue/depth" in entries:
                raise DataRefused("queue/depth: a value the database refuses")
            return real(self, device, entries, *args, **kw)

        monkeypatch.setattr(SQLiteStorage, "put_reported", refusing)
        hooks.values.update({"link/state": "down", "queue/depth": 7})
        sync.changed()

        async def link_down() -> bool:
            row = await server.db(
                lambda s: s.db.execute(
                    "SELECT value FROM reported WHERE device = ? AND key = 'link/state'",
                    (DEVICE,),
                ).fetchone()
            )
            return decode_value(row[0]) == "down" and sync.status["pending"] == 0

        await wait_for(link_down, "link/state acknowledged despite the refused key", limit=5)
    split = lines(caplog, "event=reported_refused", "code=4.00", "action=split")
    assert len(split) == 1 and "keys=link/state,queue/depth" in split[0]
    alone = lines(caplog, "event=reported_refused", "keys=queue/depth ")
    assert len(alone) == 1 and "action=next_full_report" in alone[0]


async def test_versions_numbered_while_the_clock_ran_years_ahead_do_not_freeze_reported_state(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The device's wall clock runs two years ahead: its versions are beyond the endpoint's
    bound (now + 30 days) and refused, as they should be. NTP sets the clock right and the value
    changes. Before: the version clock (persisted) went on from the versions of two years ahead,
    so every later version was refused too, for two years; the endpoint never saw the device's
    state again."""
    caplog.set_level(logging.INFO, logger="agent.sync.state")
    clock = SteppedClock()
    clock.offset = 2 * 365 * 86400.0
    hooks = Hooks({"link/state": "up"})
    async with running(server, tmp_path / "state.cbor", hooks, FAST, clock) as sync:

        async def refused() -> bool:
            return bool(lines(caplog, "event=reported_version_refused", "key=link/state"))

        await wait_for(refused, "the version of two years ahead refused", limit=5)
        assert "link/state" not in await at_endpoint(server)
        clock.offset = 0.0  # the clock is set right
        hooks.values["link/state"] = "down"
        sync.changed()

        async def stored() -> bool:
            entry = (await at_endpoint(server)).get("link/state")
            return entry is not None and entry.value == "down" and sync.status["pending"] == 0

        await wait_for(stored, "link/state stored once the clock is right", limit=10)
    entry = (await at_endpoint(server))["link/state"]
    assert entry.version <= int(time.time() * 1000) + 1000  # numbered from the wall clock again
    assert len(lines(caplog, "event=reported_clock_rewound")) == 1

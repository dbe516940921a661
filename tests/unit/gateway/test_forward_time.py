"""The gateway's asks for the cloud's time (agent/gateway/relay.py RecordForwarder._ask_time):
one entry of an empty batch per ask, as its devices in turn, at most every ASK_EVERY s, only
while its clock is neither set nor learned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.errors import SyncError
from agent.gateway.relay import RecordForwarder
from agent.sync.walltime import ASK_EVERY, EMPTY_BATCH, EndpointClock
from agent.wire.batch import IngestAck
from agent.wire.relay import RelayRefusal
from drivers.clock import VirtualClock

NOW = 1_796_600_000.0


def forwarder(tmp_path: Path, clock: EndpointClock, devices: list[str]) -> RecordForwarder:
    none: Any = None
    return RecordForwarder(
        none, none, lambda: "coap://x", tmp_path, name="gw-1", time_from=clock,
        devices=lambda: devices,
    )  # fmt: skip


def test_the_asks_go_as_each_device_in_turn_until_the_cloud_says_the_time(
    tmp_path: Path,
) -> None:
    """The cloud refuses the first device (removed there): before, every ask went as that one
    and the gateway never learned the time; now the next ask goes as the next device."""
    base = VirtualClock(start_wall=30.0, start_monotonic=1000.0)
    clock = EndpointClock(base)
    fw = forwarder(tmp_path, clock, ["gone", "pump-02", "pump-03"])
    asked: list[str] = []

    async def post(entries: list, deadline: float) -> list:  # type: ignore[type-arg]
        (entry,) = entries
        assert entry.batch == EMPTY_BATCH
        asked.append(entry.device)
        if entry.device == "gone":
            return [RelayRefusal(404, "no such device")]
        clock.learn(NOW, clock.monotonic(), clock.monotonic())
        return [IngestAck.for_seqs([], 0, 0, now=NOW)]

    fw._post = post  # type: ignore[method-assign]

    async def main() -> None:
        for _ in range(4):
            await fw._ask_time()
            await base.sleep(ASK_EVERY)

    base.run(main())
    assert asked == ["gone", "pump-02"]  # learned at the second: no more asks
    assert not clock.wants_time and clock.time() >= NOW


def test_no_ask_without_devices_or_once_the_clock_is_set(tmp_path: Path) -> None:
    base = VirtualClock(start_wall=30.0, start_monotonic=1000.0)
    clock = EndpointClock(base)
    calls: list[Any] = []

    async def post(entries: list, deadline: float) -> list:  # type: ignore[type-arg]
        calls.append(entries)
        raise SyncError("timeout")

    async def main() -> None:
        empty = forwarder(tmp_path, clock, [])
        empty._post = post  # type: ignore[method-assign]
        await empty._ask_time()  # no device to ask as
        fw = forwarder(tmp_path, clock, ["pump-01"])
        fw._post = post  # type: ignore[method-assign]
        await fw._ask_time()  # asked; the failure changes nothing
        await fw._ask_time()  # not again before ASK_EVERY
        base.step_wall(NOW)  # NTP sets the gateway's clock
        await base.sleep(ASK_EVERY)
        await fw._ask_time()

    base.run(main())
    assert len(calls) == 1

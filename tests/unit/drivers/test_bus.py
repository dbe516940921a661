"""The bus seams: how OS and library errors from a transfer become the driver error family."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import sys
import threading
import tty
from pathlib import Path

import pytest

from agent.errors import DeviceDataError, DeviceIOError, DeviceTimeout
from drivers import bus as bus_mod
from drivers.ads1115 import Ads1115
from drivers.bus import AsyncI2C, AsyncSerial, open_serial
from drivers.clock import RealClock, VirtualClock
from drivers.regmap import Register
from drivers.sim.ads1115 import Ads1115Sim
from drivers.sim.bme280 import Bme280Sim
from drivers.sim.smbus import FakeSMBus


class TimedOutAdapter(FakeSMBus):
    """An adapter that gives up at once with ETIMEDOUT (i2c-dev: clock stretching too long,
    arbitration lost), as smbus2 raises it."""

    def _read(self, address: int, register: int, length: int) -> bytes:
        raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))


class ShortReads(FakeSMBus):
    """An adapter that returns one byte too few of every block read."""

    def read_i2c_block_data(self, i2c_addr, register, length, force=None):  # type: ignore[no-untyped-def]
        return super().read_i2c_block_data(i2c_addr, register, length, force)[:-1]


def test_adapter_etimedout_is_an_io_error_not_our_deadline(vclock: VirtualClock) -> None:
    """OSError(ETIMEDOUT) is a TimeoutError subclass: it must not read as "no answer within 2 s"."""
    bus = AsyncI2C(TimedOutAdapter(), vclock, name="i2c-1")

    async def go() -> None:
        with pytest.raises(DeviceIOError) as info:
            await bus.device(0x76).read_u8(0xD0)
        assert not isinstance(info.value, DeviceTimeout)
        assert "i2c-1 0x76: the adapter gave up" in str(info.value)
        assert "(ETIMEDOUT)" in str(info.value)
        assert "within" not in str(info.value)

    try:
        vclock.run(go())
    finally:
        bus.close()


class HangsAt(FakeSMBus):
    """A bus on which every transfer to one address never returns (a hung adapter), until
    ``release`` is set."""

    def __init__(self, address: int) -> None:
        super().__init__("hang")
        self.hang_address = address
        self.release = threading.Event()
        self.reopened = 0

    def _read(self, address: int, register: int, length: int) -> bytes:
        if address == self.hang_address:
            self.release.wait(30)
        return super()._read(address, register, length)

    def reopen(self) -> None:  # as the agent's reopening wrapper: the next transfer opens anew
        self.reopened += 1


def test_a_hung_transfer_wedges_its_worker_not_the_bus(caplog: pytest.LogCaptureFixture) -> None:
    """The transfer that never returns is a DeviceTimeout; the bus gets a fresh worker and is
    reopened, so later transfers to the other part are answered; close() returns at once and
    the stuck thread, a daemon, does not hold up process exit."""
    caplog.set_level(logging.INFO, logger="drivers.bus")
    fake = HangsAt(0x77)
    fake.attach(0x76, Bme280Sim(RealClock()))
    fake.attach(0x77, Bme280Sim(RealClock()))
    bus = AsyncI2C(fake, RealClock(), name="i2c-1", timeout=0.2)
    stuck = bus._executor.thread

    async def go() -> list[int]:
        with pytest.raises(DeviceTimeout, match=r"i2c-1 0x77: no answer within 0.2 s"):
            await bus.device(0x77).read_u8(0xD0)
        return [await bus.device(0x76).read_u8(0xD0) for _ in range(3)]

    try:
        assert asyncio.run(go()) == [0x60] * 3  # the BME280's chip id, read after the hang
        assert fake.reopened == 1
        assert stuck.is_alive() and stuck.daemon
        assert bus._executor.thread is not stuck and bus._executor.thread.daemon
        wedged = [r.getMessage() for r in caplog.records if "event=bus_wedged" in r.getMessage()]
        assert len(wedged) == 1
        assert wedged[0].startswith("bus=i2c-1 event=bus_wedged at=0x77 timeout=0.2")
        bus.close()  # returns although a transfer still hangs
    finally:
        fake.release.set()
        stuck.join(5)
    assert not stuck.is_alive()  # released, the abandoned worker ends on its own


def test_a_late_transfer_of_an_abandoned_worker_cannot_drive_the_bus() -> None:
    """A transfer that missed its deadline but returns later went on with its next calls beside
    the fresh worker's transfers: two threads on one bus (one sets an address, the other reads),
    a reading from the wrong part or register taken as good. Now its next call is an I/O error
    and touches nothing."""
    fake = HangsAt(0x77)
    fake.attach(0x76, Bme280Sim(RealClock()))
    fake.attach(0x77, Bme280Sim(RealClock()))
    bus = AsyncI2C(fake, RealClock(), name="i2c-1", timeout=0.2)
    stuck = bus._executor.thread
    late: dict[str, object] = {}

    def transaction(b: object, address: int) -> int:
        b.read_byte_data(address, 0xD0)  # type: ignore[attr-defined]  # hangs
        try:  # the rest of the transaction, once the hung call returned
            late["value"] = b.write_byte_data(0x76, 0xF4, 0x27)  # type: ignore[attr-defined]
        except OSError as err:
            late["error"] = err
            raise
        return 0

    async def go() -> None:
        with pytest.raises(DeviceTimeout):
            await bus.device(0x77).transact(transaction)
        assert await bus.device(0x76).read_u8(0xD0) == 0x60  # the fresh worker's

    try:
        asyncio.run(go())
        writes = len(fake.writes) if hasattr(fake, "writes") else None
        fake.release.set()
        stuck.join(5)
        assert not stuck.is_alive()
        assert isinstance(late.get("error"), OSError) and "value" not in late
        assert "abandoned transfer" in str(late["error"])
        if writes is not None:
            assert len(fake.writes) == writes  # the late write never reached the bus
    finally:
        fake.release.set()
        bus.close()


def test_a_transfer_queued_behind_a_hung_one_runs_on_the_fresh_worker() -> None:
    """Another part's transfer, waiting behind the one that hung and still within its own
    deadline, is handed to the fresh worker: it was, but it ran with the abandoned worker's
    view of the bus and failed as an "abandoned transfer" (EIO), so every part read during
    a hang on its bus was marked degraded and re-opened."""
    fake = HangsAt(0x77)
    fake.attach(0x76, Bme280Sim(RealClock()))
    fake.attach(0x77, Bme280Sim(RealClock()))
    bus = AsyncI2C(fake, RealClock(), name="i2c-1", timeout=0.5)

    async def go() -> int:
        hung = asyncio.create_task(bus.device(0x77).read_u8(0xD0))
        await asyncio.sleep(0.1)  # the hung transfer has started; this one waits behind it
        value = await bus.device(0x76).read_u8(0xD0)
        with pytest.raises(DeviceTimeout):
            await hung
        return value

    try:
        assert asyncio.run(go()) == 0x60  # the BME280's chip id, from the fresh worker
    finally:
        fake.release.set()
        bus.close()


def test_an_adapter_that_stays_hung_leaves_a_bounded_number_of_threads() -> None:
    """Each deadline missed left its worker thread stuck and started a fresh one, whose next
    transfer hung too: while the adapter stayed hung, one more thread (and pid) per retry of
    every part on the bus, for as long as the agent ran (the systemd unit's task limit, or a
    32-bit Pi's address space, runs out within a day). Now at most MAX_STUCK_WORKERS stuck
    threads per bus: beyond them a transfer fails at once, and the bus works again as soon
    as a stuck transfer returns."""
    fake = HangsAt(0x77)
    fake.attach(0x77, Bme280Sim(RealClock()))
    bus = AsyncI2C(fake, RealClock(), name="i2c-1", timeout=0.05)

    def threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "bus-i2c-1"]

    async def go() -> None:
        for _ in range(30):  # the sampler's retries of a part on a hung adapter
            with pytest.raises(DeviceTimeout):
                await bus.device(0x77).read_u8(0xD0)

    try:
        asyncio.run(go())
        assert len(threads()) <= bus_mod.MAX_STUCK_WORKERS + 1  # the stuck ones and a fresh one
        fake.release.set()  # the adapter recovers: the stuck transfers return
        for t in threads():
            if t is not bus._executor.thread:
                t.join(5)
        assert asyncio.run(bus.device(0x77).read_u8(0xD0)) == 0x60
    finally:
        fake.release.set()
        bus.close()


HUNG_AT_EXIT = """
import asyncio, threading
from drivers.bus import AsyncI2C
from drivers.clock import RealClock
from drivers.errors import DeviceTimeout
from drivers.sim.smbus import FakeSMBus

class Hangs(FakeSMBus):
    def _read(self, address, register, length):
        threading.Event().wait()  # never returns

async def main():
    bus = AsyncI2C(Hangs(), RealClock(), timeout=0.1)
    try:
        await bus.device(0x76).read_u8(0xD0)
    except DeviceTimeout:
        print("timed out")
    bus.close()

asyncio.run(main())
"""


def test_a_hung_transfer_does_not_keep_the_process_from_exiting() -> None:
    """A hung adapter at shutdown: the process still exits (the stuck worker is a daemon)."""
    done = subprocess.run(
        [sys.executable, "-c", HUNG_AT_EXIT],
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=60,  # not a speed limit: without the fix the child never exits
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "timed out\n"), done.stderr


def test_short_register_read_is_a_data_error() -> None:
    reg = Register("config", 0x01, width=2)
    with pytest.raises(DeviceDataError, match="register config: read 1 bytes, expected 2"):
        reg.decode(b"\x85")
    assert reg.decode(b"\x85\x83") == 0x8583


def test_short_block_read_through_a_driver_is_a_data_error(vclock: VirtualClock) -> None:
    """Attack: an adapter that cuts block reads short; the driver reports it as bad data (the
    sensor degrades) instead of a ValueError from deep inside a decode."""
    fake = ShortReads()
    fake.attach(0x48, Ads1115Sim(vclock))
    bus = AsyncI2C(fake, vclock)

    async def go() -> None:
        with pytest.raises(DeviceDataError, match="read 1 bytes, expected 2"):
            await Ads1115(bus.device(0x48)).open()

    try:
        vclock.run(go())
    finally:
        bus.close()


def test_hung_up_tty_is_an_io_error_naming_the_port(vclock: VirtualClock) -> None:
    """A USB serial adapter unplugged: pyserial's tty ioctls raise termios.error, which is neither
    OSError nor SerialException; it still becomes a DeviceIOError naming the port."""
    master, slave = os.openpty()
    tty.setraw(master)
    path = os.ttyname(slave)
    os.close(slave)
    port = AsyncSerial(open_serial(path, timeout=0.2), vclock, name="usb-flow")
    os.close(master)  # unplugged: the tty hangs up

    async def go() -> None:
        for call in (lambda p: p.reset_input_buffer(), lambda p: p.flush()):
            with pytest.raises(DeviceIOError, match=r"usb-flow: port failed .*\(EIO\)"):
                await port.transact(call)

    try:
        vclock.run(go())
    finally:
        port.close()

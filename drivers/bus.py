"""The bus seams: an smbus2-compatible I2C bus and serial ports opened by URL.

Bus calls block. Each bus gets one worker thread, so transfers on a bus are serialised the way the
wire serialises them, and the event loop never waits on hardware. A driver builds a whole
transaction as a plain function and runs it with :meth:`AsyncI2C.transact`, paying one thread hop
per transaction instead of one per register.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, runtime_checkable

from drivers.clock import Clock
from drivers.errors import DeviceIOError, DeviceNotFound, DeviceTimeout, DriverError

T = TypeVar("T")

#: Default deadline for one bus transaction, seconds (a stuck bus must not stall a sensor forever).
TRANSACTION_TIMEOUT = 2.0

#: errno values with which Linux i2c-dev reports a part that does not acknowledge its address.
NACK_ERRNOS = frozenset({errno.EREMOTEIO, errno.ENXIO})


@runtime_checkable
class I2CBus(Protocol):
    """The subset of ``smbus2.SMBus`` the drivers use; the simulated bus implements the same."""

    def read_byte(self, i2c_addr: int, force: bool | None = None) -> int: ...
    def write_byte(self, i2c_addr: int, value: int, force: bool | None = None) -> None: ...
    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int: ...
    def write_byte_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None: ...
    def read_word_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int: ...
    def write_word_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None: ...
    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]: ...
    def write_i2c_block_data(
        self, i2c_addr: int, register: int, data: Sequence[int], force: bool | None = None
    ) -> None: ...
    def close(self) -> None: ...


def open_i2c_bus(number: int) -> I2CBus:
    """Open ``/dev/i2c-N`` with smbus2. Raises DeviceNotFound when the adapter is missing."""
    from smbus2 import SMBus

    try:
        return SMBus(number)
    except FileNotFoundError as err:
        raise DeviceNotFound(
            f"/dev/i2c-{number} does not exist: enable I2C (dtparam=i2c_arm=on) or fix sensor.bus"
        ) from err
    except PermissionError as err:
        raise DeviceNotFound(
            f"/dev/i2c-{number}: permission denied: run as a member of group i2c"
        ) from err


def describe_os_error(err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, "")
    return f"{err.strerror or err} ({name})" if name else str(err)


class AsyncI2C:
    """An I2C bus driven from asyncio through one worker thread."""

    def __init__(
        self,
        bus: I2CBus,
        clock: Clock,
        *,
        name: str = "i2c",
        timeout: float = TRANSACTION_TIMEOUT,
    ) -> None:
        self.bus = bus
        self.clock = clock
        self.name = name
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bus-{name}")

    async def transact(self, address: int, fn: Callable[[I2CBus], T]) -> T:
        """Run ``fn(bus)`` on the bus thread; map OS errors to DriverErrors naming the address."""

        def call() -> T:
            return fn(self.bus)

        try:
            async with asyncio.timeout(self.timeout):
                return await self.clock.run_blocking(self._executor, call)
        except TimeoutError as err:
            raise DeviceTimeout(
                f"{self.name} 0x{address:02x}: no answer within {self.timeout:g} s"
            ) from err
        except DriverError:
            raise
        except OSError as err:
            if err.errno in NACK_ERRNOS:
                raise DeviceNotFound(
                    f"{self.name} 0x{address:02x}: no acknowledge ({describe_os_error(err)}); "
                    "check wiring, power and the address"
                ) from err
            raise DeviceIOError(f"{self.name} 0x{address:02x}: {describe_os_error(err)}") from err

    def device(self, address: int) -> I2CDevice:
        return I2CDevice(self, address)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.bus.close()


class I2CDevice:
    """One address on an :class:`AsyncI2C` bus, with the common register transfers."""

    def __init__(self, bus: AsyncI2C, address: int) -> None:
        self.bus = bus
        self.address = address

    @property
    def clock(self) -> Clock:
        return self.bus.clock

    def __str__(self) -> str:
        return f"{self.bus.name}/0x{self.address:02x}"

    async def transact(self, fn: Callable[[I2CBus, int], T]) -> T:
        """Run ``fn(bus, address)`` as one transaction on the bus thread."""
        return await self.bus.transact(self.address, lambda b: fn(b, self.address))

    async def read_u8(self, register: int) -> int:
        return await self.transact(lambda b, a: b.read_byte_data(a, register))

    async def write_u8(self, register: int, value: int) -> None:
        await self.transact(lambda b, a: b.write_byte_data(a, register, value))

    async def read_block(self, register: int, length: int) -> bytes:
        return await self.transact(lambda b, a: bytes(b.read_i2c_block_data(a, register, length)))

    async def write_block(self, register: int, data: bytes | Sequence[int]) -> None:
        await self.transact(lambda b, a: b.write_i2c_block_data(a, register, list(data)))

    async def read_u16_be(self, register: int) -> int:
        return int.from_bytes(await self.read_block(register, 2), "big")

    async def write_u16_be(self, register: int, value: int) -> None:
        await self.write_block(register, value.to_bytes(2, "big"))


# --------------------------------------------------------------------------------------------
# Serial ports


def open_serial(url: str, *, baudrate: int = 9600, timeout: float = 0.5, **kwargs: Any) -> Any:
    """Open a serial port by URL or device path (``/dev/ttyUSB0``, ``socket://h:p``, a pty path).

    Raises DeviceNotFound with the URL when it cannot be opened.
    """
    import serial

    try:
        return serial.serial_for_url(url, baudrate=baudrate, timeout=timeout, **kwargs)
    except (serial.SerialException, OSError, ValueError) as err:
        raise DeviceNotFound(
            f"{url}: cannot open serial port ({err}); check the port and group dialout"
        ) from err


class AsyncSerial:
    """A serial port driven from asyncio through one worker thread."""

    def __init__(
        self, port: Any, clock: Clock, *, name: str | None = None, timeout: float = 5.0
    ) -> None:
        self.port = port
        self.clock = clock
        self.name = name or getattr(port, "port", None) or "serial"
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serial")

    async def transact(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(port)`` on the port's thread; map serial errors to DriverErrors."""
        import serial

        def call() -> T:
            return fn(self.port)

        try:
            async with asyncio.timeout(self.timeout):
                return await self.clock.run_blocking(self._executor, call)
        except TimeoutError as err:
            raise DeviceTimeout(f"{self.name}: no answer within {self.timeout:g} s") from err
        except DriverError:
            raise
        except (serial.SerialException, OSError) as err:
            raise DeviceIOError(f"{self.name}: {err}") from err

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.port.close()

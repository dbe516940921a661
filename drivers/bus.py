"""The bus seams: an smbus2-compatible I2C bus and serial ports opened by URL.

Bus calls block. Each bus gets one worker thread, so transfers on a bus are serialised the way the
wire serialises them, and the event loop never waits on hardware. A driver builds a whole
transaction as a plain function and runs it with :meth:`AsyncI2C.transact`, paying one thread hop
per transaction instead of one per register.

A transfer that never returns (a hung adapter) holds only its worker: when a transaction misses
its deadline the bus is marked wedged, the queued transfers move to a fresh worker, and the bus or
port is closed so that its next transfer opens it again (when it can: the agent's reopening
wrappers have ``reopen()``). Workers are daemon threads, so a stuck one never blocks process exit.
While :data:`MAX_STUCK_WORKERS` of a bus are still stuck, its transfers fail at once. A transfer
whose adapter is gone (ENODEV: a USB I2C adapter unplugged) has the bus closed the same way, so
the adapter is opened anew once it is back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import queue
import termios
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any, Protocol, TypeVar, runtime_checkable

from drivers.clock import Clock
from drivers.errors import DeviceIOError, DeviceNotFound, DeviceTimeout, DriverError

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Default deadline for one bus transaction, seconds (a stuck bus must not stall a sensor forever).
TRANSACTION_TIMEOUT = 2.0

#: Workers of one bus or port left behind in a transfer that never returned, at most: beyond
#: them a transfer fails at once (DeviceTimeout) instead of starting one more thread that an
#: adapter still hung would keep too (one per retry of every part on it, for as long as it hangs).
MAX_STUCK_WORKERS = 4

#: errno values with which Linux i2c-dev reports a part that does not acknowledge its address.
NACK_ERRNOS = frozenset({errno.EREMOTEIO, errno.ENXIO})
#: errno values of a transfer whose adapter is gone (a USB adapter unplugged): the open device
#: file is dead for good, so the bus is closed and opened anew at its next transfer.
GONE_ERRNOS = frozenset({errno.ENODEV, errno.ESHUTDOWN})


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


#: ``.worker``: the :class:`BusWorker` whose thread this is (set on each worker's thread).
_on_worker = threading.local()


def _guard() -> Any:
    """The bus or port as the worker running the calling transfer sees it: a transfer queued
    behind a wedged one runs on the fresh worker, with the fresh worker's view."""
    return _on_worker.worker.guard


class BusWorker(Executor):
    """One daemon thread that runs a bus's transfers in the order they were submitted."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._shutdown = False
        self.abandoned = False  # left behind by a wedge: its late transfer may not go on
        self.guard: Any = None  # the bus or port as this worker's transfers see it
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._shutdown:
            raise RuntimeError(f"{self.name}: the bus is closed")
        future: Future[T] = Future()
        self._queue.put((future, lambda: fn(*args, **kwargs)))
        return future

    def _run(self) -> None:
        _on_worker.worker = self
        while (item := self._queue.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as err:  # handed to the waiting coroutine, as the pool does
                future.set_exception(err)
            else:
                future.set_result(result)

    def _take_queued(self) -> list[tuple[Future[Any], Callable[[], Any]]]:
        """Stop taking transfers; the ones queued and not started, taken off the queue."""
        self._shutdown = True
        taken = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return taken
            if item is not None:
                taken.append(item)

    def hand_over(self, successor: BusWorker) -> None:
        """Give the transfers still queued to ``successor`` and stop once the current one ends
        (if it ever does)."""
        for item in self._take_queued():
            successor._queue.put(item)
        self._queue.put(None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        queued = self._take_queued()
        for future, call in queued:
            if cancel_futures:
                future.cancel()
            else:
                self._queue.put((future, call))
        self._queue.put(None)
        if wait and threading.current_thread() is not self.thread:
            self.thread.join()


class _Guarded:
    """The bus or port as one worker's transfers see it. Once the worker is left behind (its
    transfer missed the deadline and a fresh worker took the bus over), a transfer that returns
    late and goes on gets an I/O error at its next call, so two threads never drive the bus at
    once (an address set by one and a read by the other: a wrong reading taken as good)."""

    def __init__(self, target: Any, worker: BusWorker) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_worker", worker)

    def _check(self) -> None:
        if self._worker.abandoned:
            raise OSError(errno.EIO, "abandoned transfer: the bus went on with a fresh thread")

    def __getattr__(self, name: str) -> Any:
        self._check()
        return getattr(self._target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._check()
        setattr(self._target, name, value)


class _Worked:
    """The worker thread of a bus or port, replaced when a transfer wedges it."""

    name: str
    timeout: float
    _executor: BusWorker

    def _init_worker(self, target: Any) -> None:
        self._stuck: list[BusWorker] = []  # left behind by a wedge, perhaps still in its transfer
        self._start_worker(target)

    def _start_worker(self, target: Any) -> None:
        self._executor = BusWorker(f"bus-{self.name}")
        self._executor.guard = _Guarded(target, self._executor)

    def _refuse_while_stuck(self) -> None:
        """DeviceTimeout at once while :data:`MAX_STUCK_WORKERS` transfers never returned."""
        self._stuck = [w for w in self._stuck if w.thread.is_alive()]
        if len(self._stuck) >= MAX_STUCK_WORKERS:
            raise DeviceTimeout(
                f"{self.name}: {len(self._stuck)} transfers never returned; none is started "
                "until one does: power-cycle the adapter"
            )

    def _wedged(self, worker: BusWorker, device: Any, where: str) -> None:
        """``worker`` missed a deadline: leave it, move the queue to a fresh worker and have the
        device closed there, so the next transfer opens it again."""
        if worker is not self._executor:  # queued behind the stuck transfer: already handled
            return
        log.error(
            "bus=%s event=bus_wedged at=%s timeout=%g: a transfer never returned; its thread is "
            "abandoned and the bus goes on with a fresh thread, opened anew; if this repeats, "
            "power-cycle the adapter",
            self.name,
            where,
            self.timeout,
        )
        worker.abandoned = True
        self._stuck.append(worker)
        self._start_worker(device)
        reopen = getattr(device, "reopen", None)
        if callable(reopen):  # first, before the transfers that were queued
            self._executor.submit(reopen)
        worker.hand_over(self._executor)

    def close_worker(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def describe_os_error(err: OSError | termios.error) -> str:
    """``strerror (ENAME)`` of an OS error, or of a termios.error (which carries the same
    ``(errno, strerror)`` pair but is no OSError)."""
    if isinstance(err, termios.error):
        if len(err.args) != 2:
            return str(err)
        err = OSError(*err.args)
    name = errno.errorcode.get(err.errno or 0, "")
    return f"{err.strerror or err} ({name})" if name else str(err)


def port_errors() -> tuple[type[BaseException], ...]:
    """What a pyserial port raises when its device fails: SerialException and OSError, and
    termios.error from the tty ioctls (``reset_input_buffer``, ``flush``) of a port whose
    device hung up (a USB adapter unplugged)."""
    import serial

    return (serial.SerialException, OSError, termios.error)


class AsyncI2C(_Worked):
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
        self._init_worker(bus)

    async def transact(self, address: int, fn: Callable[[I2CBus], T]) -> T:
        """Run ``fn(bus)`` on the bus thread; map OS errors to DriverErrors naming the address."""

        self._refuse_while_stuck()
        deadline = asyncio.timeout(self.timeout)
        worker = self._executor

        def call() -> T:
            return fn(_guard())

        try:
            async with deadline:
                return await self.clock.run_blocking(worker, call)
        except DriverError:
            raise
        except OSError as err:  # TimeoutError too: our deadline's, or the adapter's ETIMEDOUT
            if deadline.expired():
                self._wedged(worker, self.bus, f"0x{address:02x}")
                raise DeviceTimeout(
                    f"{self.name} 0x{address:02x}: no answer within {self.timeout:g} s"
                ) from err
            if err.errno in NACK_ERRNOS:
                raise DeviceNotFound(
                    f"{self.name} 0x{address:02x}: no acknowledge ({describe_os_error(err)}); "
                    "check wiring, power and the address"
                ) from err
            if err.errno == errno.ETIMEDOUT:
                raise DeviceIOError(
                    f"{self.name} 0x{address:02x}: the adapter gave up ({describe_os_error(err)}); "
                    "a part may hold the clock low: check wiring and pull-ups"
                ) from err
            if err.errno in GONE_ERRNOS and callable(reopen := getattr(self.bus, "reopen", None)):
                self._executor.submit(reopen)  # on the bus thread, after what is queued
                raise DeviceIOError(
                    f"{self.name} 0x{address:02x}: {describe_os_error(err)}: the adapter is gone "
                    "(unplugged?); the bus is opened again at its next transfer"
                ) from err
            raise DeviceIOError(f"{self.name} 0x{address:02x}: {describe_os_error(err)}") from err

    def device(self, address: int) -> I2CDevice:
        return I2CDevice(self, address)

    def close(self) -> None:
        self.close_worker()
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


class AsyncSerial(_Worked):
    """A serial port driven from asyncio through one worker thread."""

    def __init__(
        self, port: Any, clock: Clock, *, name: str | None = None, timeout: float = 5.0
    ) -> None:
        self.port = port
        self.clock = clock
        self.name = name or getattr(port, "port", None) or "serial"
        self.timeout = timeout
        self._init_worker(port)

    async def transact(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(port)`` on the port's thread; map serial errors to DriverErrors."""

        self._refuse_while_stuck()
        deadline = asyncio.timeout(self.timeout)
        worker = self._executor

        def call() -> T:
            return fn(_guard())

        try:
            async with deadline:
                return await self.clock.run_blocking(worker, call)
        except DriverError:
            raise
        except termios.error as err:
            raise DeviceIOError(
                f"{self.name}: port failed ({describe_os_error(err)}); "
                "check the adapter and its cable"
            ) from err
        except port_errors() as err:  # TimeoutError too: our deadline's, or an errno timeout
            if deadline.expired():
                self._wedged(worker, self.port, "port")
                raise DeviceTimeout(f"{self.name}: no answer within {self.timeout:g} s") from err
            raise DeviceIOError(f"{self.name}: {err}") from err

    def close(self) -> None:
        self.close_worker()
        self.port.close()

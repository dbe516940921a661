"""A fake SMBus hosting simulated parts at addresses, with the smbus2 methods the drivers use.

A part is a :class:`SimDevice`: it answers ``read(register, n)`` and ``write(register, data)``
the way the chip does on the wire (pointer, auto-increment, side effects such as clearing a
data-ready bit or popping a FIFO entry). An address with no part NACKs with OSError(121), like
Linux i2c-dev.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from drivers.clock import Clock

from .faults import Faults, nack_error

SMBUS_BLOCK_MAX = 32  # an SMBus/I2C block transfer through smbus2 carries at most 32 bytes


class SimDevice:
    """Base of simulated I2C parts.

    Subclasses implement :meth:`read_registers` and :meth:`write_registers`, and
    :meth:`set_channel` to receive the physical value of a driver channel from a signal source.
    Time comes from ``clock.monotonic()`` so conversion times follow a virtual clock in tests.
    """

    part: str = "sim"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.faults = Faults()
        self.transactions = 0

    # The bus calls these two; they apply the fault knobs around the part's own behaviour.
    def bus_read(self, register: int, length: int) -> bytes:
        self.faults.check_ack()
        self.transactions += 1
        return self.faults.corrupt(self.read_registers(register, length))

    def bus_write(self, register: int | None, data: bytes) -> None:
        self.faults.check_ack()
        self.transactions += 1
        self.write_registers(register, data)

    def read_registers(self, register: int, length: int) -> bytes:
        raise NotImplementedError

    def write_registers(self, register: int | None, data: bytes) -> None:
        """``register`` is None for a plain byte write with no register (pointer-only writes)."""
        raise NotImplementedError

    def set_channel(self, channel: str, value: float) -> None:
        """Drive the physical input behind a driver channel (in the driver's unit)."""
        raise NotImplementedError


class FakeSMBus:
    """An smbus2.SMBus stand-in. Thread-safe: one transfer at a time, like the wire."""

    def __init__(self, bus: int | str = "sim") -> None:
        self.bus = bus
        self.devices: dict[int, SimDevice] = {}
        self.before_access: Callable[[int, SimDevice], None] | None = None
        self._lock = threading.Lock()
        self.closed = False

    def attach(self, address: int, device: SimDevice) -> SimDevice:
        if not 0x03 <= address <= 0x77:
            raise ValueError(f"0x{address:02x} is not a usable 7-bit I2C address")
        if address in self.devices:
            raise ValueError(f"address 0x{address:02x} already has a {self.devices[address].part}")
        self.devices[address] = device
        return device

    def _device(self, address: int) -> SimDevice:
        if self.closed:
            raise OSError(9, "Bad file descriptor")
        device = self.devices.get(address)
        if device is None:
            raise nack_error()
        if self.before_access is not None:
            self.before_access(address, device)
        return device

    def _read(self, address: int, register: int, length: int) -> bytes:
        with self._lock:
            return self._device(address).bus_read(register, length)

    def _write(self, address: int, register: int | None, data: bytes) -> None:
        with self._lock:
            self._device(address).bus_write(register, data)

    # smbus2 API ---------------------------------------------------------------------------
    def read_byte(self, i2c_addr: int, force: bool | None = None) -> int:
        return self._read(i2c_addr, -1, 1)[0]

    def write_byte(self, i2c_addr: int, value: int, force: bool | None = None) -> None:
        self._write(i2c_addr, None, bytes([value & 0xFF]))

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        return self._read(i2c_addr, register, 1)[0]

    def write_byte_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None:
        self._write(i2c_addr, register, bytes([value & 0xFF]))

    def read_word_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        return int.from_bytes(self._read(i2c_addr, register, 2), "little")

    def write_word_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None:
        self._write(i2c_addr, register, (value & 0xFFFF).to_bytes(2, "little"))

    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]:
        if not 0 < length <= SMBUS_BLOCK_MAX:
            raise ValueError(f"Desired block length over {SMBUS_BLOCK_MAX} bytes")
        return list(self._read(i2c_addr, register, length))

    def write_i2c_block_data(
        self, i2c_addr: int, register: int, data: Sequence[int], force: bool | None = None
    ) -> None:
        if len(data) > SMBUS_BLOCK_MAX:
            raise ValueError(f"Data length cannot exceed {SMBUS_BLOCK_MAX} bytes")
        self._write(i2c_addr, register, bytes(data))

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeSMBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

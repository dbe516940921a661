"""Register maps as data, for the drivers.

A :class:`Register` names an address and how its bytes make an integer; a :class:`Field` names a
bit field inside a register. Drivers use them to build and decode transfers. The simulators in
:mod:`drivers.sim` keep their own register tables, written from the datasheets, so a mistake in a
map cannot hide in a simulator that shares it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from drivers.errors import DeviceDataError


@dataclass(frozen=True, slots=True)
class Register:
    name: str
    address: int
    width: int = 1  # bytes
    endian: Literal["big", "little"] = "big"
    signed: bool = False
    access: Literal["r", "w", "rw"] = "rw"
    reset: int = 0

    def decode(self, data: bytes | bytearray | list[int]) -> int:
        raw = bytes(data)
        if len(raw) != self.width:  # a short block read: the part or the adapter cut it off
            raise DeviceDataError(
                f"register {self.name}: read {len(raw)} bytes, expected {self.width}; "
                "check the wiring and the pull-ups"
            )
        return int.from_bytes(raw, self.endian, signed=self.signed)

    def encode(self, value: int) -> bytes:
        if self.signed:
            lo, hi = -(1 << (8 * self.width - 1)), (1 << (8 * self.width - 1)) - 1
        else:
            lo, hi = 0, (1 << (8 * self.width)) - 1
        if not lo <= value <= hi:
            raise ValueError(f"{self.name}: {value} does not fit in {self.width} byte(s)")
        return value.to_bytes(self.width, self.endian, signed=self.signed)


@dataclass(frozen=True, slots=True)
class Field:
    """A bit field: ``mask`` is in register position (e.g. 0b0001_1100)."""

    register: str
    name: str
    mask: int

    @property
    def shift(self) -> int:
        return (self.mask & -self.mask).bit_length() - 1

    def get(self, raw: int) -> int:
        return (raw & self.mask) >> self.shift

    def set(self, raw: int, value: int) -> int:
        limit = self.mask >> self.shift
        if not 0 <= value <= limit:
            raise ValueError(f"{self.register}.{self.name}: {value} does not fit in the field")
        return (raw & ~self.mask) | (value << self.shift)


class RegisterMap:
    """A part's registers and fields, looked up by name or address."""

    def __init__(self, registers: Iterable[Register], fields: Iterable[Field] = ()) -> None:
        self._by_name = {r.name: r for r in registers}
        self._by_address = {r.address: r for r in self._by_name.values()}
        self._fields = {(f.register, f.name): f for f in fields}
        for key in self._fields:
            if key[0] not in self._by_name:
                raise ValueError(f"field {key[1]} names unknown register {key[0]}")

    def __getitem__(self, name: str) -> Register:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Register]:
        return iter(self._by_name.values())

    def at(self, address: int) -> Register | None:
        return self._by_address.get(address)

    def field(self, register: str, name: str) -> Field:
        return self._fields[(register, name)]

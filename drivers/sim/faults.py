"""Fault knobs shared by every simulated part.

Set them on a part's ``faults`` attribute while it runs:

- ``nack``: probability (0..1) that a transaction is not acknowledged (OSError 121);
- ``disconnect``: the part is gone; every transaction is not acknowledged until cleared;
- ``stuck``: data registers freeze at the last values produced before the knob was set;
- ``bit_flip``: probability that one random bit of each read payload is flipped;
- ``bad_crc``: probability that a serial frame or line goes out with a wrong CRC/checksum;
- ``slow``: extra seconds before an answer (serial), or added conversion time (I2C parts).
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field


def nack_error() -> OSError:
    """The error smbus2 raises when a part does not acknowledge (Linux i2c-dev, EREMOTEIO)."""
    return OSError(errno.EREMOTEIO, "Remote I/O error")


@dataclass
class Faults:
    nack: float = 0.0
    disconnect: bool = False
    stuck: bool = False
    bit_flip: float = 0.0
    bad_crc: float = 0.0
    slow: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    def clear(self) -> None:
        self.nack = self.bit_flip = self.bad_crc = self.slow = 0.0
        self.disconnect = self.stuck = False

    def check_ack(self) -> None:
        """Raise the NACK error if the part is disconnected or this transaction is unlucky."""
        if self.disconnect or (self.nack and self.rng.random() < self.nack):
            raise nack_error()

    def corrupt(self, payload: bytes) -> bytes:
        """Flip one random bit of ``payload`` with probability ``bit_flip``."""
        if not payload or not self.bit_flip or self.rng.random() >= self.bit_flip:
            return payload
        data = bytearray(payload)
        bit = self.rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data)

    def crc_fails(self) -> bool:
        return bool(self.bad_crc) and self.rng.random() < self.bad_crc

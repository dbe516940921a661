"""Integer packing for the compact encoding: zigzag, varints, split tokens with extra bits, bit
fields, and a bounded reader that raises :class:`~agent.wire.batch.CodecError` on bad input.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from agent.wire.batch import CodecError

MAX_NAME = 255  # bytes of a sensor or channel name in the group table
_MASK64 = (1 << 64) - 1


def zigzag(n: int) -> int:
    """Signed to unsigned: 0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ..."""
    return n << 1 if n >= 0 else ((-n) << 1) - 1


def unzigzag(u: int) -> int:
    return (u >> 1) if not u & 1 else -((u + 1) >> 1)


def _varint(out: bytearray, u: int) -> None:
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)


def _varints(out: bytearray, values: Iterable[int]) -> None:
    for u in values:
        while u >= 0x80:
            out.append((u & 0x7F) | 0x80)
            u >>= 7
        out.append(u)


def _varint_len(u: int) -> int:
    return max(1, (u.bit_length() + 6) // 7)


# A residual u is split at a shift k into a token byte for h = u >> k and extra bits: h < 4 is
# its own token; above, the token names h's bit length and the bit below the leading one, and the
# extra bits hold the rest of h and the k low bits of u (as deflate codes distances).
_MAX_TOKEN = 2 * 65 - 1  # u < 2**65


_MAX_SHIFT = 63


def _split_cost(residuals: Sequence[int], k: int, per_token: float = 0.0) -> float:
    """Estimated bits of ``residuals`` split at shift ``k``: token entropy plus extra bits (plus
    ``per_token`` bits for each distinct token, a share of the Huffman table)."""
    tokens: Counter[int] = Counter()
    extra = 0
    for u in residuals:
        h = u >> k
        if h < 4:
            tokens[h] += 1
            extra += k
        else:
            nb = h.bit_length() - 2
            tokens[2 * nb + 2 + ((h >> nb) & 1)] += 1
            extra += nb + k
    n = len(residuals)
    return extra - sum(c * math.log2(c / n) for c in tokens.values()) + per_token * len(tokens)


def _shift(residuals: Sequence[int]) -> int:
    """How many low bits of each residual to send raw: about log2 of the median (so that the
    tokens of every column have about the same distribution: deflate codes them all with one
    table), the one of the four around it with the fewest estimated bits."""
    if not residuals:
        return 0
    median = sorted(residuals)[len(residuals) // 2]
    k0 = min(_MAX_SHIFT - 1, (median + 1).bit_length() - 1)
    return min(range(max(0, k0 - 2), k0 + 2), key=lambda k: _split_cost(residuals, k))


class _BitWriter:
    """Bits, least significant first, packed into bytes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self._acc = 0
        self._n = 0

    def write(self, value: int, nbits: int) -> None:
        self._acc |= value << self._n
        self._n += nbits
        while self._n >= 64:
            self.out += (self._acc & _MASK64).to_bytes(8, "little")
            self._acc >>= 64
            self._n -= 64

    def finish(self) -> bytes:
        return bytes(self.out) + self._acc.to_bytes((self._n + 7) // 8, "little")


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.total = len(data) * 8

    def read(self, nbits: int) -> int:
        end = self.pos + nbits
        if end > self.total:
            raise CodecError("the extra bits end early")
        start = self.pos >> 3
        chunk = int.from_bytes(self.data[start : (end + 7) >> 3], "little")
        value = (chunk >> (self.pos & 7)) & ((1 << nbits) - 1)
        self.pos = end
        return value

    def finish(self) -> None:
        left = self.total - self.pos
        if left >= 8:
            raise CodecError(f"{left // 8} bytes after the extra bits")
        if left and self.read(left):
            raise CodecError("the padding of the extra bits is not zero")


class _Reader:
    """Reads the byte section; every problem is a :class:`CodecError`."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise CodecError("the batch ends early")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self, limit: int = _MASK64) -> int:
        data, pos = self.data, self.pos
        shift = result = 0
        while True:
            if pos >= len(data):
                raise CodecError("the batch ends inside a number")
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 63:
                raise CodecError("a number is longer than 10 bytes")
        self.pos = pos
        if result > limit:
            raise CodecError(f"a number is out of range ({result} > {limit})")
        return result

    def count(self, what: str) -> int:
        """A count that cannot exceed the bytes left (each counted item takes at least one)."""
        n = self.varint()
        if n > self.left:
            raise CodecError(f"{what}: {n} is more than the batch can hold")
        return n

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise CodecError("the batch ends early")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def text(self, what: str) -> str:
        size = self.count(what)
        if size > MAX_NAME:
            raise CodecError(f"{what} is longer than {MAX_NAME} bytes")
        raw = self.take(size)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{what} is not UTF-8") from None


def _put_text(out: bytearray, text: str) -> None:
    raw = text.encode("utf-8")
    _varint(out, len(raw))
    out += raw

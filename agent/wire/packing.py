"""Integer packing for the compact encoding: zigzag, varints, split tokens with extra bits, bit
fields, and a bounded reader that raises :class:`~agent.wire.batch.CodecError` on bad input.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from agent.wire.batch import CodecError

MAX_NAME = 255  # bytes of a sensor or channel name in the group table
_MASK64 = (1 << 64) - 1
_MASK256 = (1 << 256) - 1


def zigzag(n: int) -> int:
    """Signed to unsigned: 0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ..."""
    return n << 1 if n >= 0 else ((-n) << 1) - 1


def _zigzags(diffs: Iterable[int]) -> list[int]:
    """:func:`zigzag` of each number (one call for a column, not one per value)."""
    return [d << 1 if d >= 0 else ((-d) << 1) - 1 for d in diffs]


def unzigzag(u: int) -> int:
    return (u >> 1) if not u & 1 else -((u + 1) >> 1)


def _varint(out: bytearray, u: int) -> None:
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)


def _varints(out: bytearray, values: Iterable[int]) -> None:
    if not isinstance(values, list):
        values = list(values)
    if values and min(values) >= 0 and max(values) < 0x80:  # each its own one byte
        out += bytes(values)
        return
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


# What the encoder computes from these definitions, with less work and the same results (the
# tests hold them against the definitions written out):
#
# - the token of u at shift k depends only on u's bit length L and the bit below its leading one
#   s (h = u >> k keeps both while L - k >= 2; below, h = u >> k < 4 is the token), and so does
#   its count of extra bits, ``max(k, L - 2)`` (k while h < 4, else nb + k = L - 2); the extra
#   bits are u's low bits: those of h below its two leading bits, then the k of u;
# - the token of u at shift 0, t0 (u for u < 4, else 2 * L - 2 + s), names (L, s) (L = t0 for
#   t0 < 2, else t0 // 2 + 1; s = t0 & 1), so the token at any shift follows from t0 alone:
#   ``t0 - 2 * k`` when that is >= 2, else 1 when it is >= 0, else 0 (:func:`_token_at`), and
#   tables by t0 give each shift's tokens and extra bits (:func:`_shift_tables`);
# - so the tokens of a column are counted once, at shift 0 (in order of first appearance, as a
#   Counter counts them), and the counts at any shift follow by merging, still in order of
#   first appearance (the first residual with a token at shift k is the first of the first t0,
#   in that order, that maps to it): a cost then sums the same floats in the same order (the
#   same float), so comparisons choose the same.
_TOKEN_TABLE = 4096  # t0 of u below this comes from a table


def _token0(u: int) -> int:
    """The token of ``u`` at shift 0."""
    if u < 4:
        return u
    nb = u.bit_length() - 2
    return 2 * nb + 2 + ((u >> nb) & 1)


_TOKENS0 = [_token0(u) for u in range(_TOKEN_TABLE)]


def _tokens0(residuals: Sequence[int]) -> list[int]:
    """The token at shift 0 of each residual (unsigned, below 2**65)."""
    table = _TOKENS0
    try:
        return list(map(table.__getitem__, residuals))
    except IndexError:  # a residual beyond the table (the first of a column, often)
        return [table[u] if u < _TOKEN_TABLE else _token0(u) for u in residuals]


# The token at shift 0 of zigzag(d) by d, for small d (a dict: a list would read negative d from
# its end, and give a wrong token for a d below the table rather than an error).
_SIGNED_TOKENS0 = {d: _TOKENS0[zigzag(d)] for d in range(-_TOKEN_TABLE // 2, _TOKEN_TABLE // 2)}


def _signed_tokens0(diffs: Sequence[int]) -> list[int]:
    """The token at shift 0 of ``zigzag(d)`` for each of ``diffs``."""
    table = _SIGNED_TOKENS0
    try:
        return list(map(table.__getitem__, diffs))
    except KeyError:  # beyond the table
        return [table[d] if d in table else _token0(zigzag(d)) for d in diffs]


def _token_bit_length(t0: int) -> int:
    """The bit length of a residual whose token at shift 0 is ``t0``."""
    return t0 if t0 < 2 else (t0 >> 1) + 1


def _token_at(t0: int, k: int) -> int:
    """The token at shift ``k`` of a residual whose token at shift 0 is ``t0``."""
    if k == 0:
        return t0
    t = t0 - 2 * k
    return t if t >= 2 else (1 if t >= 0 else 0)


def _extra_at(t0: int, k: int) -> int:
    """The count of extra bits at shift ``k`` of a residual whose token at shift 0 is ``t0``."""
    return max(k, _token_bit_length(t0) - 2)


_SHIFT_TABLES: list[tuple[list[int], list[int]] | None] = [None] * (_MAX_SHIFT + 1)


def _shift_tables(k: int) -> tuple[list[int], list[int]]:
    """For each token at shift 0 (0.._MAX_TOKEN): its token and its count of extra bits at
    shift ``k`` (made once per shift)."""
    tables = _SHIFT_TABLES[k]
    if tables is None:
        t0s = range(_MAX_TOKEN + 1)
        tables = [_token_at(t0, k) for t0 in t0s], [_extra_at(t0, k) for t0 in t0s]
        _SHIFT_TABLES[k] = tables
    return tables


def _count(tokens: Sequence[int]) -> dict[int, int]:
    """How often each token occurs, in order of first appearance (as a Counter counts them; a
    plain loop is faster for the few values of a small batch)."""
    if len(tokens) > 32:
        return Counter(tokens)
    counts: dict[int, int] = {}
    get = counts.get
    for t in tokens:
        counts[t] = get(t, 0) + 1
    return counts


_TERMS_MAX = 64
_TERMS: dict[int, list[float]] = {}  # n -> [c * log2(c / n) for c = 0..n]


def _entropy_term(n: int) -> Callable[[int], float]:
    """``c -> c * log2(c / n)`` (from a table for small n: the same float, computed once)."""
    if n > _TERMS_MAX:
        log2 = math.log2
        return lambda c: c * log2(c / n)
    terms = _TERMS.get(n)
    if terms is None:
        terms = _TERMS[n] = [0.0] + [c * math.log2(c / n) for c in range(1, n + 1)]
    return terms.__getitem__


# The estimate of a split column (_split_cost) is
#     extra - sum(c * log2(c / n) for c in counts.values()) + per_token * len(counts)
# over the counts of its tokens in order of first appearance. The functions below compute it from
# token counts (see above) with the same terms, summed in the same order by the same sum(), so
# their floats are the same, and so are the choices made by comparing them.


def _counts_cost(counts0: dict[int, int], n: int, k: int, per_token: float) -> float:
    """:func:`_split_cost` at shift ``k`` of ``n`` residuals whose tokens at shift 0 occur
    ``counts0`` times (in order of first appearance)."""
    token_at, extra_at = _shift_tables(k)
    tokens: dict[int, int] = {}
    get = tokens.get
    extra = 0
    for t0, c in counts0.items():
        t = token_at[t0]
        tokens[t] = get(t, 0) + c
        extra += c * extra_at[t0]
    return extra - sum(map(_entropy_term(n), tokens.values())) + per_token * len(tokens)


_EXTRA0 = _shift_tables(0)[1]


def _cost0(tokens0: Sequence[int], counts0: dict[int, int], per_token: float) -> float:
    """:func:`_split_cost` at shift 0 of residuals whose tokens at shift 0 are ``tokens0``,
    which occur ``counts0`` times (:func:`_count`)."""
    extra = sum(map(_EXTRA0.__getitem__, tokens0))
    term = _entropy_term(len(tokens0))
    return extra - sum(map(term, counts0.values())) + per_token * len(counts0)


def _split_cost(residuals: Sequence[int], k: int, per_token: float = 0.0) -> float:
    """Estimated bits of ``residuals`` split at shift ``k``: token entropy plus extra bits (plus
    ``per_token`` bits for each distinct token, a share of the Huffman table)."""
    return _counts_cost(_count(_tokens0(residuals)), len(residuals), k, per_token)


def _shift(residuals: Sequence[int], counts0: dict[int, int] | None = None) -> int:
    """How many low bits of each residual to send raw: about log2 of the median (so that the
    tokens of every column have about the same distribution: deflate codes them all with one
    table), the one of the four around it with the fewest estimated bits (the first of equals).
    ``counts0``: the counts of the residuals' tokens at shift 0, when known (:func:`_count`)."""
    if not residuals:
        return 0
    n = len(residuals)
    median = sorted(residuals)[n // 2]
    k0 = min(_MAX_SHIFT - 1, (median + 1).bit_length() - 1)
    if counts0 is None:
        counts0 = _count(_tokens0(residuals))
    term = _entropy_term(n)
    items = counts0.items()
    best_k, best = -1, 0.0
    for k in range(max(0, k0 - 2), k0 + 2):  # _counts_cost(counts0, n, k, 0.0), inlined
        token_at, extra_at = _shift_tables(k)
        tokens: dict[int, int] = {}
        extra = 0
        for t0, c in items:
            t = token_at[t0]
            if t in tokens:
                tokens[t] += c
            else:
                tokens[t] = c
            extra += c * extra_at[t0]
        cost = extra - sum(map(term, tokens.values())) + 0.0 * len(tokens)
        if best_k < 0 or cost < best:
            best_k, best = k, cost
    return best_k


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

    def write_low(self, values: Iterable[int], widths: Iterable[int]) -> None:
        """The ``w`` low bits of each value ``v``, in turn: ``write(v & ((1 << w) - 1), w)`` for
        each, in one loop (the bytes are the same whenever whole bytes move from the accumulator
        to ``out``)."""
        acc = self._acc
        n = self._n
        out = self.out
        for v, w in zip(values, widths, strict=True):
            if w:
                acc |= (v & ((1 << w) - 1)) << n
                n += w
                while n >= 256:
                    out += (acc & _MASK256).to_bytes(32, "little")
                    acc >>= 256
                    n -= 256
        while n >= 64:
            out += (acc & _MASK64).to_bytes(8, "little")
            acc >>= 64
            n -= 64
        self._acc = acc
        self._n = n

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

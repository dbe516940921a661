"""Values of the compact encoding's columns: quantization to a channel's resolution (exact
decimal steps), the predictors a column can use, and the choice of the cheapest one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from agent.wire.batch import CodecError
from agent.wire.packing import (
    _split_cost,
    _varint,
    _varint_len,
    unzigzag,
    zigzag,
)

_MAX_Q = 2**53  # |round(x / r)| above this is not exact as a float: such readings go as bodies

# Predictors of a value column: residual = q - prediction (palette: the value's index).
P_DELTA = 0  # the previous value (0 before the first)


P_LINEAR = 1  # 2 * previous - the one before (delta-of-delta)


P_MEAN = 2  # a constant, written in the column header


P_LOCAL = 3  # the rounded mean of the last k values; k (1..64) in the column header


P_PALETTE = 4  # the index into a list of values written in the column header


P_FLOAT = 5  # no resolution: float64 bits XOR the previous value's bits


_LOCAL_WINDOWS = (2, 4, 8)


_MAX_LOCAL = 64


_MAX_PALETTE = 32  # palettes are tried for columns with at most this many distinct values


_SAMPLE = 512  # predictors are chosen on the first values of a column


_MAX_EXP = 400  # decimal exponent of a resolution


def _decimal(res: float) -> tuple[int, int]:
    """``res`` as ``(m, e)`` with ``res == m / 10**e`` (or ``m * 10**-e``) exactly: the shortest
    decimal that gives back the same double, which a correctly rounded division reproduces."""
    sign, digits, exp = Decimal(repr(res)).as_tuple()
    assert isinstance(exp, int) and not sign
    m = int("".join(map(str, digits)))
    return m, -exp


def _from_decimal(m: int, e: int) -> float:
    try:
        return m / 10**e if e >= 0 else float(m * 10**-e)
    except OverflowError:
        raise CodecError("a resolution is out of range") from None


def _ratio(m: int, e: int) -> tuple[int, int]:
    """The resolution ``m * 10**-e`` as an exact fraction (numerator, denominator)."""
    return (m, 10**e) if e >= 0 else (m * 10**-e, 1)


def dequantize(q: int, num: int, den: int) -> float:
    """``q`` steps of ``num / den``: the double nearest to the exact product (Python's int
    division is correctly rounded), so 17 steps of 0.1 give 1.7, not 1.7000000000000002."""
    return q * num / den


def step_ratio(res: float) -> tuple[int, int]:
    """The resolution ``res`` as the exact fraction a batch carries (its shortest decimal)."""
    return _ratio(*_decimal(res))


def quantize(x: float, res: float) -> float:
    """What a round trip makes of value ``x`` at resolution ``res`` (finite, not too large)."""
    return dequantize(round(x / res), *step_ratio(res))


def _local_residuals(q: Sequence[int], k: int) -> list[int]:
    out = []
    s = 0
    for i, v in enumerate(q):
        cnt = i if i < k else k
        p = (2 * s + cnt) // (2 * cnt) if cnt else 0  # mean of the last cnt values, half up
        out.append(zigzag(v - p))
        s += v
        if i >= k:
            s -= q[i - k]
    return out


def _residuals(q: Sequence[int], pred: int, param: Any) -> list[int]:
    """The unsigned residuals of ``q`` under a predictor."""
    if pred == P_DELTA:
        prev = 0
        out = []
        for v in q:
            out.append(zigzag(v - prev))
            prev = v
        return out
    if pred == P_LINEAR:
        a = b = 0  # q[i-2], q[i-1]
        out = []
        for i, v in enumerate(q):
            p = b if i < 2 else 2 * b - a
            out.append(zigzag(v - p))
            a, b = b, v
        return out
    if pred == P_MEAN:
        return [zigzag(v - param) for v in q]
    if pred == P_LOCAL:
        return _local_residuals(q, param)
    if pred == P_PALETTE:
        index = {v: i for i, v in enumerate(param)}
        return [index[v] for v in q]
    raise AssertionError(pred)


def _palette(q: Sequence[int]) -> list[int] | None:
    counts = Counter(q)
    if len(counts) > _MAX_PALETTE or 2 * len(counts) > len(q):
        return None
    return [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _params_bytes(pred: int, param: Any) -> bytes:
    out = bytearray((pred,))
    if pred == P_MEAN:
        _varint(out, zigzag(param))
    elif pred == P_LOCAL:
        out.append(param)
    elif pred == P_PALETTE:
        _varint(out, len(param))
        prev = 0
        for v in param:
            _varint(out, zigzag(v - prev))
            prev = v
    return bytes(out)


def _cost(residuals: Sequence[int], split: bool) -> float:
    """Estimated bits of a residual stream: varint bytes, or token entropy + extra bits."""
    if not split:
        return 8.0 * sum(_varint_len(u) for u in residuals)
    return _split_cost(residuals, 0, per_token=6.0)


def _choose(q: Sequence[int], split: bool) -> tuple[int, Any]:
    """The predictor (and its parameter) that codes a sample of ``q`` in the fewest bits."""
    sample = q[:_SAMPLE]
    candidates: list[tuple[int, Any]] = [(P_DELTA, None), (P_LINEAR, None)]
    candidates.append((P_MEAN, (2 * sum(sample) + len(sample)) // (2 * len(sample))))
    candidates += [(P_LOCAL, k) for k in _LOCAL_WINDOWS if k < len(sample)]
    palette = _palette(sample)
    if palette is not None and len(set(q)) <= _MAX_PALETTE:
        candidates.append((P_PALETTE, _palette(q)))
    best: tuple[float, int, Any] | None = None
    for pred, param in candidates:
        cost = 8 * len(_params_bytes(pred, param)) + _cost(_residuals(sample, pred, param), split)
        if best is None or cost < best[0]:
            best = (cost, pred, param)
    assert best is not None
    return best[1], best[2]


def _unpredict(
    residuals: Sequence[int], pred: int, param: Any, sensor: str, channel: str
) -> list[int]:
    if pred == P_PALETTE:
        try:
            return [param[u] for u in residuals]
        except IndexError:
            raise CodecError(f"{sensor}/{channel}: a palette index is out of range") from None
    out: list[int] = []
    if pred == P_DELTA:
        prev = 0
        for u in residuals:
            prev += unzigzag(u)
            out.append(prev)
            if abs(prev) > _MAX_Q:
                raise CodecError(f"{sensor}/{channel}: a value is out of range")
        return out
    if pred == P_LINEAR:
        a = b = 0
        for i, u in enumerate(residuals):
            p = b if i < 2 else 2 * b - a
            v = p + unzigzag(u)
            if abs(v) > _MAX_Q:
                raise CodecError(f"{sensor}/{channel}: a value is out of range")
            out.append(v)
            a, b = b, v
        return out
    if pred == P_MEAN:
        return [param + unzigzag(u) for u in residuals]
    # P_LOCAL
    k = param
    s = 0
    for i, u in enumerate(residuals):
        cnt = i if i < k else k
        p = (2 * s + cnt) // (2 * cnt) if cnt else 0
        v = p + unzigzag(u)
        if abs(v) > _MAX_Q:
            raise CodecError(f"{sensor}/{channel}: a value is out of range")
        out.append(v)
        s += v
        if i >= k:
            s -= out[i - k]
    return out

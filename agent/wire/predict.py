"""Values of the compact encoding's columns: quantization to a channel's resolution (exact
decimal steps), the predictors a column can use, and the choice of the cheapest one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from itertools import accumulate, chain, islice, repeat
from operator import sub
from typing import Any

from agent.wire.batch import CodecError
from agent.wire.packing import (
    _EXTRA0,
    _MAX_TOKEN,
    _SIGNED_TOKENS0,
    _cost0,
    _count,
    _entropy_term,
    _signed_tokens0,
    _token0,
    _token_bit_length,
    _tokens0,
    _varint,
    _varint_len,
    _zigzags,
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


_DECIMALS: dict[float, tuple[int, int]] = {}  # _decimal of positive floats, remembered


def _decimal(res: float) -> tuple[int, int]:
    """``res`` as ``(m, e)`` with ``res == m / 10**e`` (or ``m * 10**-e``) exactly: the shortest
    decimal that gives back the same double, which a correctly rounded division reproduces."""
    # A channel's resolution is looked up several times a batch, and the same few every batch.
    # Only floats > 0 are remembered: equal keys are then the same double (0.0 == -0.0, and an
    # int equal to a float has another repr).
    if type(res) is float:
        got = _DECIMALS.get(res)
        if got is not None:
            return got
    sign, digits, exp = Decimal(repr(res)).as_tuple()
    assert isinstance(exp, int) and not sign
    m = int("".join(map(str, digits)))
    if type(res) is float and res > 0.0 and len(_DECIMALS) < 4096:
        _DECIMALS[res] = (m, -exp)
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


# The residuals of a column are computed a column at a time: differences by map() and zigzag in one
# comprehension (no Python call per value). The choice (_choose_column) shares these helpers.


def _deltas(q: Sequence[int]) -> list[int]:
    """Each value minus the one before (0 before the first)."""
    return list(map(sub, q, chain((0,), q)))


def _linear(deltas: Sequence[int]) -> list[int]:
    """The P_LINEAR differences from the deltas: q[i] - (2 * q[i-1] - q[i-2]) is the delta minus
    the delta before, from the third value on; the first two are predicted as the previous value
    (0 before the first), so their differences are their deltas."""
    return list(map(sub, deltas, chain((0, 0), islice(deltas, 1, None))))


# P_LOCAL predicts q[i] as the mean (half up) of the min(i, k) values before it (0 for the
# first), from the prefix sums ``sums[i] = q[0] + ... + q[i - 1]``: while fewer than k values
# precede q[i], the mean of all of them (the same for every window: the head), then of the last
# k, whose sum is ``sums[i] - sums[i - k]`` (the tail).


def _local_head(q: Sequence[int], sums: Sequence[int], k: int) -> list[int]:
    """P_LOCAL's differences of q[1 .. k - 1] (window k, or any larger)."""
    return [q[i] - (2 * sums[i] + i) // (2 * i) for i in range(1, min(k, len(q)))]


def _local_tail(q: Sequence[int], sums: Sequence[int], k: int) -> list[int]:
    """P_LOCAL's differences of q[k:] with window k."""
    k2 = 2 * k
    if len(q) - k > 8:
        return [v - (2 * (a - b) + k) // k2 for v, a, b in zip(q[k:], sums[k:], sums, strict=False)]
    tail = []  # the same, faster for a few values
    for i in range(k, len(q)):
        tail.append(q[i] - (2 * (sums[i] - sums[i - k]) + k) // k2)
    return tail


def _local_residuals(q: Sequence[int], k: int) -> list[int]:
    if not q:
        return []
    sums = list(accumulate(q, initial=0))
    return _zigzags([q[0], *_local_head(q, sums, k), *_local_tail(q, sums, k)])


def _residuals(q: Sequence[int], pred: int, param: Any) -> list[int]:
    """The unsigned residuals of ``q`` under a predictor."""
    if pred == P_DELTA:
        return _zigzags(_deltas(q))
    if pred == P_LINEAR:
        return _zigzags(_linear(_deltas(q)))
    if pred == P_MEAN:
        return _zigzags(map(sub, q, repeat(param)))
    if pred == P_LOCAL:
        return _local_residuals(q, param)
    if pred == P_PALETTE:
        index = {v: i for i, v in enumerate(param)}
        return [index[v] for v in q]
    raise AssertionError(pred)


def _palette(q: Sequence[int]) -> list[int] | None:
    distinct = len(set(q))  # as many as the counts below, found faster
    if distinct > _MAX_PALETTE or 2 * distinct > len(q):
        return None
    counts = Counter(q)
    return [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _params_bytes(pred: int, param: Any) -> bytes:
    if pred in (P_DELTA, P_LINEAR):
        return _PRED_BYTES[pred]
    if pred == P_LOCAL:
        return bytes((P_LOCAL, param))
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


_PRED_BYTES = {P_DELTA: bytes((P_DELTA,)), P_LINEAR: bytes((P_LINEAR,))}


def _params_len(pred: int, param: Any) -> int:
    """``len(_params_bytes(pred, param))``."""
    if pred in (P_DELTA, P_LINEAR):
        return 1
    if pred == P_MEAN:
        return 1 + _varint_len(zigzag(param))
    if pred == P_LOCAL:
        return 2
    return len(_params_bytes(pred, param))


def _cost(residuals: Sequence[int], split: bool) -> float:
    """Estimated bits of a residual stream: varint bytes, or token entropy + extra bits."""
    tokens0 = _tokens0(residuals)
    if not split:
        return _varint_cost(tokens0)
    return _cost0(tokens0, _count(tokens0), 6.0)


# Bytes of a varint by the token of its value at shift 0 (which names the value's bit length).
_VARINT_LEN_BY_TOKEN = [max(1, (_token_bit_length(t) + 6) // 7) for t in range(_MAX_TOKEN + 1)]


def _varint_cost(tokens0: list[int]) -> float:
    """:func:`_cost` without split: ``8.0 * sum(_varint_len(u))``, from the tokens (the same
    integer sum, so the same float)."""
    return 8.0 * sum(map(_VARINT_LEN_BY_TOKEN.__getitem__, tokens0))


def _choose(q: Sequence[int], split: bool) -> tuple[int, Any]:
    """The predictor (and its parameter) that codes a sample of ``q`` in the fewest bits."""
    pred, param, _, _, _ = _choose_column(q, split)
    return pred, param


def _choose_column(
    q: Sequence[int], split: bool
) -> tuple[int, Any, list[int], list[int], dict[int, int] | None]:
    """:func:`_choose`, and the residuals of all of ``q`` under that predictor with their tokens
    at shift 0 and (split only) how often each token occurs (:func:`~agent.wire.packing._count`).

    The same candidates in the same order with the same costs (so the same choice) as
    evaluating ``8 * len(_params_bytes(pred, param)) + _cost(_residuals(sample, pred, param),
    split)`` for each, computed with less work: the tokens come straight from the signed
    differences (:func:`~agent.wire.packing._signed_tokens0`); what candidates share is computed
    once (the first difference of the delta, linear and local predictors, which all predict 0
    for the first value; the second of delta and linear; the local windows' prefix sums and
    head); the header lengths are computed without writing them; the costs are summed as
    :func:`~agent.wire.packing._cost0` sums them, from the tokens; and when the sample is the
    whole column the winner's residuals and token counts are the column's."""
    whole = len(q) <= _SAMPLE
    sample = q if whole else q[:_SAMPLE]
    n = len(sample)
    deltas = _deltas(sample)
    linear = _linear(deltas)
    mean = (2 * sum(sample) + n) // (2 * n)
    means = list(map(sub, sample, repeat(mean)))
    windows = [k for k in _LOCAL_WINDOWS if k < n]
    head: list[int] = []
    tails: list[list[int]] = []
    if windows:
        sums = list(accumulate(sample, initial=0))
        head = _local_head(sample, sums, windows[-1])
        tails = [_local_tail(sample, sums, k) for k in windows]
    # the tokens of the differences (_signed_tokens0, inlined while they are in its table); the
    # first difference of delta, linear and local is the same, and so is the second of delta
    # and linear
    first = [_token0(zigzag(deltas[0]))]
    signed = _SIGNED_TOKENS0.__getitem__
    try:
        rest = list(map(signed, deltas[1:]))
        linear_tokens = list(map(signed, linear[2:]))
        mean_tokens = list(map(signed, means))
        head_tokens = list(map(signed, head))
        tail_tokens = [list(map(signed, tail)) for tail in tails]
    except KeyError:  # a difference beyond the table
        rest = _signed_tokens0(deltas[1:])
        linear_tokens = _signed_tokens0(linear[2:])
        mean_tokens = _signed_tokens0(means)
        head_tokens = _signed_tokens0(head)
        tail_tokens = [_signed_tokens0(tail) for tail in tails]
    # each candidate: predictor, parameter, its header's length, its differences (signed; for a
    # palette the residuals themselves, indexes; for local only the tail, see below) and their
    # residuals' tokens at shift 0
    candidates: list[tuple[int, Any, int, list[int], list[int]]] = [
        (P_DELTA, None, 1, deltas, first + rest),
        (P_LINEAR, None, 1, linear, first + rest[:1] + linear_tokens),
        (P_MEAN, mean, _params_len(P_MEAN, mean), means, mean_tokens),
    ]
    head_tokens = first + head_tokens
    for k, tail, tokens0 in zip(windows, tails, tail_tokens, strict=True):
        # the differences are [deltas[0], *head[: k - 1], *tail], made for the winner only
        candidates.append((P_LOCAL, k, 2, tail, head_tokens[:k] + tokens0))
    # a palette needs at most half as many distinct values as values (_palette)
    palette = _palette(sample) if 2 * len(set(sample)) <= n else None
    # a palette of the sample has at most _MAX_PALETTE values: when the sample is the whole
    # column, so does the column, and its palette is the sample's
    if palette is not None and (whole or len(set(q)) <= _MAX_PALETTE):
        if not whole:
            palette = _palette(q)
        index = {v: i for i, v in enumerate(palette)}
        indexes = [index[v] for v in sample]
        length = _params_len(P_PALETTE, palette)
        candidates.append((P_PALETTE, palette, length, indexes, _tokens0(indexes)))
    extra_of = _EXTRA0.__getitem__
    term = _entropy_term(n)
    best: tuple[float, int, Any, list[int], list[int], dict[int, int] | None] | None = None
    for pred, param, params_len, diffs, tokens0 in candidates:
        counts: dict[int, int] | None = None
        if split:
            # _count and _cost0, inlined
            counted: dict[int, int] = {}
            get = counted.get
            for t in tokens0:
                counted[t] = get(t, 0) + 1
            extra = sum(map(extra_of, tokens0))
            entropy = sum(map(term, counted.values()))
            cost = 8 * params_len + (extra - entropy + 6.0 * len(counted))
            counts = counted
        else:
            cost = 8 * params_len + _varint_cost(tokens0)
        if best is None or cost < best[0]:
            best = (cost, pred, param, diffs, tokens0, counts)
    assert best is not None
    _, pred, param, diffs, tokens0, counts = best
    if not whole:
        residuals = _residuals(q, pred, param)
        tokens0 = _tokens0(residuals)
        counts = _count(tokens0) if split else None
    elif pred == P_PALETTE:
        residuals = diffs
    elif pred == P_LOCAL:
        residuals = _zigzags([deltas[0], *head[: param - 1], *diffs])
    else:
        residuals = _zigzags(diffs)
    return pred, param, residuals, tokens0, counts


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

"""SenML-CBOR batches (RFC 8428, content format 112) in the profile of docs/protocol.md.

- A telemetry record becomes one SenML record per channel: ``bn`` = ``[device "/"] sensor "/"``,
  ``n`` = channel, ``v`` = value, and the reading's time as ``bt`` (or a relative ``t`` where it is
  shorter and exact).
- Alert, event and state records become one SenML record each: ``bn`` = ``[device "/"]``,
  ``n`` = the kind, ``vd`` = the record's body bytes, time = the record's ``created``. A telemetry
  record whose body does not map onto SenML losslessly is sent this way too.
- Two private labels (text strings, as RFC 8428 section 6 asks of extensions; not
  must-understand, so a generic SenML reader still sees the readings): ``"seq"`` (the record's
  sequence number; it marks the first SenML record of each store record) and ``"cr"`` (the record's
  ``created`` time minus its SenML time, when they differ).

Bad input never raises anything but :class:`~agent.wire.batch.CodecError` (a ``ValueError``).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from typing import Any

import cbor2

from agent.wire import records
from agent.wire.batch import (
    CF_SENML_CBOR,
    DEVICE_ID,
    KINDS,
    MAX_SEQ,
    SENSOR_NAME,
    CodecError,
    Resolution,
    WireRecord,
    _check_record,
    _number,
    check_body,
)
from agent.wire.records import Kind

# SenML CBOR labels, RFC 8428 table 6.
BVER, BN, BT, BU, BV, BS = -1, -2, -3, -4, -5, -6
N, U, V, VS, VB, S, T, UT, VD = 0, 1, 2, 3, 4, 5, 6, 7, 8


SENML_VERSION = 10


# Private labels of our profile (docs/protocol.md): text, as RFC 8428 section 6 asks.
L_SEQ = "seq"


L_CREATED = "cr"


# RFC 8428 section 4.5.1: names use A-Z a-z 0-9 - : . / _ and start with a letter or digit.
_SEGMENT = SENSOR_NAME


_CHANNEL = re.compile(r"^[A-Za-z0-9:./_-]+\Z")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:./_-]*\Z")


# Labels a decoder may see and ignore: units and update time do not change any value.
_IGNORED = frozenset({U, BU, UT})


# Labels of SenML that this profile cannot carry: reject rather than misread.
_UNSUPPORTED = frozenset({BV, BS, VS, VB, S})


_START_LABELS = frozenset({BVER, BN, BT, N, V, T, VD, L_SEQ, L_CREATED})


_NOT_CONTINUATION = _START_LABELS - {N, V, T}


_KNOWN_LABELS = _START_LABELS | _IGNORED


_CACHE_LIMIT = 4096


def _same(a: float, b: float) -> bool:
    """Equal as floats, sign of zero included (both arguments finite)."""
    return a == b and (a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b))


# -- a deterministic CBOR writer for the shapes this module sends ------------------------------
# cbor2's canonical mode is ~10x slower than its plain mode; the pack and the telemetry bodies have
# fixed shapes, so they are written here directly (tests check the bytes against cbor2's).
_F16 = struct.Struct(">e")


_F32 = struct.Struct(">f")


_F64 = struct.Struct(">d")


_NAN = b"\xf9\x7e\x00"


def _head(major: int, n: int) -> bytes:
    """The initial bytes of a CBOR item of ``major`` type with argument ``n``."""
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return bytes((major << 5 | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")


def _float_cbor(x: float) -> bytes:
    """``x`` in the shortest CBOR float that holds it exactly (RFC 8949 section 4.2.2)."""
    if x != x:
        return _NAN
    b = _F64.pack(x)
    # mantissa bits beyond a single's: only a double holds it (most readings; this implies the
    # low 4 bytes are not all zero)
    if int.from_bytes(b, "big") & 0x1FFFFFFF:
        return b"\xfb" + b
    try:
        b = _F16.pack(x)
        if _F16.unpack(b)[0] == x:
            return b"\xf9" + b
    except OverflowError:
        pass
    try:
        b = _F32.pack(x)
        if _F32.unpack(b)[0] == x:
            return b"\xfa" + b
    except OverflowError:
        pass
    return b"\xfb" + _F64.pack(x)


# SenML map keys in deterministic order (shorter encodings first, then bytewise):
# n (0), v (2), t (6), vd (8), bn (-2), bt (-3), "cr", "seq".
_K_N, _K_V, _K_T, _K_VD, _K_BN, _K_BT = b"\x00", b"\x02", b"\x06", b"\x08", b"\x21", b"\x22"
_K_CR = _head(3, 2) + L_CREATED.encode()


_K_SEQ = _head(3, 3) + L_SEQ.encode()


def _float(value: Any, what: str, i: int) -> float:
    """A CBOR number as a float; :class:`CodecError` for anything else (bool, huge integer)."""
    if not _number(value):
        raise CodecError(f"record {i}: {what} must be a number")
    try:
        return float(value)
    except OverflowError:
        raise CodecError(f"record {i}: {what} is out of range") from None


class SenMLCBOR:
    """SenML-CBOR (RFC 8428) batches, content format 112, in the profile of docs/protocol.md."""

    content_format = CF_SENML_CBOR
    name = "senml+cbor"

    def __init__(self) -> None:
        self._names: dict[tuple[str, str], bool] = {}
        self._parts: dict[tuple[re.Pattern[str], str], bool] = {}
        self._texts: dict[str, bytes] = {}

    def _matches(self, pattern: re.Pattern[str], text: str) -> bool:
        """``pattern.match(text)``, remembered (sensor and channel names repeat in every batch)."""
        key = (pattern, text)
        ok = self._parts.get(key)
        if ok is None:
            ok = bool(pattern.match(text))
            if len(self._parts) >= _CACHE_LIMIT:
                self._parts.clear()
            self._parts[key] = ok
        return ok

    def _text(self, text: str) -> bytes:
        """``text`` as a CBOR text string, remembered."""
        out = self._texts.get(text)
        if out is None:
            raw = text.encode("utf-8")
            out = _head(3, len(raw)) + raw
            if len(self._texts) >= _CACHE_LIMIT:
                self._texts.clear()
            self._texts[text] = out
        return out

    def _reading(
        self, sensor: str, time: float, values: dict[str, float]
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The telemetry body of a reading (as :meth:`TelemetryBody.to_cbor` gives it, for text
        channels and float values), and its encoded (channel, value) pairs in body order."""
        text = self._text
        items = sorted([(text(k), _float_cbor(v)) for k, v in values.items()])
        items.sort(key=lambda kv: len(kv[0]))  # stable: length first, then bytewise
        parts = [b"\x83", text(sensor), _float_cbor(time), _head(5, len(items))]
        for k, v in items:
            parts.append(k)
            parts.append(v)
        return b"".join(parts), items

    def reading_body(self, sensor: str, time: float, values: dict[str, float]) -> bytes:
        """A telemetry body as :meth:`TelemetryBody.to_cbor` gives it (for str keys and floats)."""
        return self._reading(sensor, time, values)[0]

    # -- encoding ------------------------------------------------------------------------------

    def _telemetry(
        self, rec: WireRecord
    ) -> tuple[str, float, list[tuple[bytes, bytes]], float | None] | None:
        """(sensor, time, encoded channels and values, created offset) when the body maps onto
        SenML exactly; None when it goes as vd."""
        try:
            item = cbor2.loads(rec.body)
        except Exception:  # any undecodable body goes as vd, byte for byte
            return None
        if type(item) is not list or len(item) != 3:
            return None
        sensor, time, values = item
        if (
            type(sensor) is not str
            or type(time) is not float
            or not math.isfinite(time)
            or type(values) is not dict
            or not values
            or not self._matches(_SEGMENT, sensor)
        ):
            return None
        for channel, value in values.items():
            if type(channel) is not str or type(value) is not float:
                return None
            if not self._matches(_CHANNEL, channel):
                return None
        # the decoder rebuilds the body with reading_body(): send as SenML only if that is exact
        body, items = self._reading(sensor, time, values)
        if body != rec.body:
            return None
        created = float(rec.created)
        if _same(created, time):
            return sensor, time, items, None
        offset = created - time
        if not math.isfinite(offset) or not _same(time + offset, created):
            return None
        return sensor, time, items, offset

    def encode(
        self,
        device: str | None,
        records: Sequence[WireRecord],
        *,
        resolution: Resolution | None = None,
    ) -> bytes:
        if device is not None and (not isinstance(device, str) or not DEVICE_ID.match(device)):
            raise CodecError(f"device id {device!r} is not valid (letters, digits, '_', '-', '.')")
        prefix = f"{device}/" if device else ""
        text = self._text
        chunks: list[bytes] = []
        cur_bn = ""  # SenML's default base name
        cur_bt: float | None = None  # None: no bt sent yet
        seen: set[int] = set()
        for rec in records:
            _check_record(rec)
            seq = rec.seq
            if seq in seen:
                raise CodecError(f"seq {seq} appears twice in the batch")
            seen.add(seq)
            tele = self._telemetry(rec) if rec.kind == Kind.TELEMETRY else None
            if tele is None:
                time = float(rec.created)
                count = 1
                bn = prefix
                offset = None
            else:
                sensor, time, values, offset = tele
                count = len(values)
                bn = f"{prefix}{sensor}/"
            # base fields of the first SenML record: bn, bt, cr, seq (in key order)
            fields = 1
            tail = b""
            if bn != cur_bn:
                tail += _K_BN + text(bn)
                fields += 1
                cur_bn = bn
            rel = b""
            if cur_bt is None or not _same(time, cur_bt):
                delta = time - cur_bt if cur_bt is not None else math.inf
                enc = _float_cbor(delta) if math.isfinite(delta) else b""
                if 0 < len(enc) < 9 and (len(enc) + 1) * count < 10 and _same(cur_bt + delta, time):  # type: ignore[operator]
                    rel = _K_T + enc
                else:
                    tail += _K_BT + _float_cbor(time)
                    fields += 1
                    cur_bt = time
            if offset is not None:
                tail += _K_CR + _float_cbor(offset)
                fields += 1
            tail += _K_SEQ + _head(0, seq)
            n_rel = 1 if rel else 0
            if tele is None:
                body = bytes(rec.body)
                chunks.append(
                    bytes((0xA0 | (fields + 2 + n_rel),))
                    + _K_N
                    + text(rec.kind)
                    + rel
                    + _K_VD
                    + _head(2, len(body))
                    + body
                    + tail
                )
                continue
            head_first = bytes((0xA0 | (fields + 2 + n_rel),))
            head_rest = bytes((0xA0 | (2 + n_rel),))
            first = True
            for channel, value in values:
                item = _K_N + channel + _K_V + value + rel
                if first:
                    chunks.append(head_first + item + tail)
                    first = False
                else:
                    chunks.append(head_rest + item)
        return _head(4, len(chunks)) + b"".join(chunks)

    # -- decoding ------------------------------------------------------------------------------

    def _valid_name(self, bn: str, n: str) -> bool:
        key = (bn, n)
        ok = self._names.get(key)
        if ok is None:
            ok = bool(_NAME.match(bn + n))
            if len(self._names) >= _CACHE_LIMIT:
                self._names.clear()
            self._names[key] = ok
        return ok

    @staticmethod
    def _check_labels(rec: dict[Any, Any], i: int) -> None:
        for label in rec:
            if label in _KNOWN_LABELS:
                continue
            if label in _UNSUPPORTED:
                raise CodecError(f"record {i}: label {label} is not used in this profile")
            if isinstance(label, str) and not label.endswith("_"):
                continue  # RFC 8428 section 4.4: unknown labels are ignored ...
            raise CodecError(f"record {i}: unknown label {label!r}")  # ... unless must-understand

    def decode(self, data: bytes) -> tuple[str | None, list[WireRecord]]:
        try:
            pack = records.loads(data, max_depth=8)
        except records.RecordError as err:
            raise CodecError(str(err)) from None
        if not isinstance(pack, list):
            raise CodecError("a SenML pack is a CBOR array")
        out: list[WireRecord] = []
        seen: set[int] = set()
        device: str | None = None
        device_known = False
        bn = ""
        bt = 0.0
        # the telemetry record being assembled: seq, created, sensor, time, values
        open_seq = -1
        open_created = 0.0
        open_sensor = ""
        open_time = 0.0
        open_values: dict[str, float] | None = None

        def close() -> None:
            if open_values is not None:
                body = self.reading_body(open_sensor, open_time, open_values)
                out.append(
                    WireRecord(open_seq, Kind.TELEMETRY.value, open_created, body, open_time)
                )

        for i, rec in enumerate(pack):
            if not isinstance(rec, dict):
                raise CodecError(f"record {i}: a SenML record is a CBOR map")
            if rec.keys() <= _KNOWN_LABELS:
                pass  # the usual case; else look at each label
            else:
                self._check_labels(rec, i)
            if L_SEQ not in rec:
                # continuation of a telemetry record: only n, v and t
                if open_values is None:
                    raise CodecError(f"record {i}: the first record of each entry carries 'seq'")
                if not rec.keys().isdisjoint(_NOT_CONTINUATION):
                    raise CodecError(f"record {i}: only n, v and t may follow the first record")
                channel = rec.get(N)
                if not isinstance(channel, str) or V not in rec:
                    raise CodecError(f"record {i}: a reading needs a text n and a numeric v")
                value = rec[V]
                if type(value) is not float:
                    value = _float(value, "v", i)
                time = bt if T not in rec else bt + _float(rec[T], "t", i)
                if not _same(time, open_time):
                    raise CodecError(f"record {i}: the channels of one reading share one time")
                if channel in open_values:
                    raise CodecError(f"record {i}: channel {channel!r} given twice")
                if not _CHANNEL.match(channel) or not self._valid_name(bn, channel):
                    raise CodecError(f"record {i}: {bn + channel!r} is not a valid SenML name")
                open_values[channel] = value
                continue
            close()
            open_values = None
            if BVER in rec and rec[BVER] != SENML_VERSION:
                raise CodecError(f"record {i}: SenML version {rec[BVER]!r} is not supported")
            if BN in rec:
                bn = rec[BN]
                if not isinstance(bn, str):
                    raise CodecError(f"record {i}: bn must be a text string")
            if BT in rec:
                bt = _float(rec[BT], "bt", i)
            time = bt if T not in rec else bt + _float(rec[T], "t", i)
            seq = rec[L_SEQ]
            if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
                raise CodecError(f"record {i}: seq must be an integer in 0..2**63-1")
            if seq in seen:
                raise CodecError(f"record {i}: seq {seq} appears twice")
            seen.add(seq)
            created = time if L_CREATED not in rec else time + _float(rec[L_CREATED], "cr", i)
            if not math.isfinite(created):
                raise CodecError(f"record {i}: the record's time is not finite")
            name = rec.get(N)
            if not isinstance(name, str):
                raise CodecError(f"record {i}: n must be a text string")
            if not self._valid_name(bn, name):
                raise CodecError(f"record {i}: {bn + name!r} is not a valid SenML name")
            if VD in rec:
                if V in rec:
                    raise CodecError(f"record {i}: a record has one value")
                body = rec[VD]
                if not isinstance(body, bytes):
                    raise CodecError(f"record {i}: vd must be a byte string")
                if name not in KINDS:
                    raise CodecError(f"record {i}: n of a data record is one of {sorted(KINDS)}")
                if bn == "":
                    dev = None
                elif bn.endswith("/") and DEVICE_ID.match(bn[:-1]):
                    dev = bn[:-1]
                else:
                    raise CodecError(f"record {i}: bn of a data record is '' or 'device/'")
                check_body(name, body, f"record {i}")  # a body of ours, its names too
                out.append(WireRecord(seq, name, created, body))
            elif V in rec:
                value = _float(rec[V], "v", i)
                parts = bn.split("/")
                if len(parts) == 2 and parts[1] == "":
                    dev, sensor = None, parts[0]
                elif len(parts) == 3 and parts[2] == "" and DEVICE_ID.match(parts[0]):
                    dev, sensor = parts[0], parts[1]
                else:
                    raise CodecError(f"record {i}: bn of a reading is '[device/]sensor/'")
                if not _SEGMENT.match(sensor) or not _CHANNEL.match(name):
                    raise CodecError(f"record {i}: bad sensor or channel name")
                if not math.isfinite(time):
                    raise CodecError(f"record {i}: the time of a reading must be finite")
                open_seq, open_created, open_sensor, open_time = seq, created, sensor, time
                open_values = {name: value}
            else:
                raise CodecError(f"record {i}: a record needs v or vd")
            if not device_known:
                device, device_known = dev, True
            elif dev != device:
                raise CodecError(f"record {i}: a batch holds the records of one device")
        close()
        return device, out

"""The body of a log upload, ``POST /logs/<device>`` (docs/protocol.md "Remote commands and
logs"): a CBOR map ::

    {"since": float / null,   ; the window asked for (null: everything the ring holds)
     "count": uint,           ; lines in "z"
     "left_out": uint,        ; older lines of the window that did not fit
     "first": float / null, "last": float / null,   ; the times of the first and last line
     "z": bstr}               ; zlib (RFC 1950) of the lines joined by "\\n", UTF-8

A time (``since``, ``first``, ``last``) is Unix seconds; a number outside ``[0, 2**40]``
(:data:`agent.wire.commands.MAX_TIME`: a device's clock far off, ``1e300``, not finite) is taken
as absent (null), so the lines still reach the operator and no view has to print such a date.

The text is at most :data:`UPLOAD_TEXT_BYTES` (the device keeps the newest lines that fit), the
body at most :data:`UPLOAD_BODY_BYTES`; :func:`decode_upload` checks both, and inflates no more
than the text limit (a zlib bomb costs the endpoint nothing).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from agent.wire import records
from agent.wire.commands import is_time

#: At most this much log text (before compression) in one upload.
UPLOAD_TEXT_BYTES = 64 * 1024
#: The endpoint refuses a larger body (4.13).
UPLOAD_BODY_BYTES = UPLOAD_TEXT_BYTES + 1024
MAX_COUNT = UPLOAD_TEXT_BYTES


class LogUploadError(ValueError):
    """A log upload body is malformed or over its limits."""


@dataclass(frozen=True)
class LogUpload:
    since: float | None
    count: int
    left_out: int
    first: float | None
    last: float | None
    z: bytes

    def to_cbor(self) -> bytes:
        return records.dumps(
            {
                "since": self.since,
                "count": self.count,
                "left_out": self.left_out,
                "first": self.first,
                "last": self.last,
                "z": self.z,
            }
        )

    def lines(self) -> list[str]:
        """The uploaded lines (:class:`LogUploadError` if ``z`` is not zlib of at most
        :data:`UPLOAD_TEXT_BYTES`)."""
        text = inflate(self.z)
        return text.decode("utf-8", "replace").split("\n") if text else []


def inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, UPLOAD_TEXT_BYTES + 1)
    except zlib.error as err:
        raise LogUploadError(f"log upload: z is not zlib data: {err}") from None
    if len(text) > UPLOAD_TEXT_BYTES or inflater.unconsumed_tail:
        raise LogUploadError(f"log upload: the text is over {UPLOAD_TEXT_BYTES} bytes")
    if not inflater.eof:
        raise LogUploadError("log upload: z is cut short")
    return text


def encode_upload(since: float | None, lines: list[tuple[float, str]], left_out: int) -> bytes:
    """The body for ``lines`` ((time, text), oldest first)."""
    text = "\n".join(line for _, line in lines).encode("utf-8", "replace")
    first = lines[0][0] if lines else None
    last = lines[-1][0] if lines else None
    return LogUpload(since, len(lines), left_out, first, last, zlib.compress(text, 9)).to_cbor()


def _time(doc: dict[str, Any], name: str) -> float | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LogUploadError(f"log upload: {name} must be a time in seconds or null")
    return float(value) if is_time(value) else None  # a clock far off: absent


def _count(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**32:
        raise LogUploadError(f"log upload: {name} must be an unsigned integer")
    return value


def decode_upload(data: bytes) -> LogUpload:
    """A body as received; :class:`LogUploadError` says what is wrong (the text is inflated and
    checked too)."""
    try:
        doc = records.loads_bounded(data, UPLOAD_BODY_BYTES, max_depth=2)
    except records.RecordError as err:
        raise LogUploadError(f"log upload: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("z"), bytes):
        raise LogUploadError("log upload: expected {since, count, left_out, first, last, z}")
    upload = LogUpload(
        _time(doc, "since"),
        _count(doc, "count"),
        _count(doc, "left_out"),
        _time(doc, "first"),
        _time(doc, "last"),
        doc["z"],
    )
    upload.lines()  # inflates within the limit, or refuses
    return upload

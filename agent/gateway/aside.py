"""Records the gateway's forwarder sets aside instead of sending (docs/gateway.md "Records damaged
at rest"): a record row of the gateway's store damaged at rest, one that cannot be read (a
``created`` that is text, NULL or not finite, a body that is not bytes, ...) or encoded into a
batch. Sending it would fail every pass, for every device; it is said once
(``event=forward_record_unreadable device=... seq=...``), counted, kept in the store
(``relay_kept``: never pruned, never sent again) and the forwarder goes on with the rest: the
cursor moves past it. Its device had its ack: the record is lost at the gateway unless an
operator repairs the row and sends it again by hand.

A record the cloud refuses alone (4.00, found by sending a refused entry again in halves,
:func:`halves_of`) is set aside the same way (``event=forward_record_refused``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from agent.wire.batch import FEATURES, CodecError, WireRecord

log = logging.getLogger("agent.gateway")

#: The answer to a relay entry with a record the cloud refuses for what it holds (4.00)
BAD_REQUEST = 4 * 32 + 0

T = TypeVar("T")


def record(seq: Any, kind: Any, created: Any, body: Any) -> WireRecord:
    """A stored record's columns as a record; ValueError for a row damaged at rest (SQLite keeps
    whatever type a column was given: a text ``created`` or body reads back as text)."""
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise ValueError(f"seq is not an integer: {seq!r:.40}")
    if not isinstance(kind, str):
        raise ValueError(f"kind is not text: {kind!r:.40}")
    if isinstance(created, bool) or not isinstance(created, int | float):
        raise ValueError(f"created is not a number: {created!r:.40}")
    if not math.isfinite(created):
        raise ValueError(f"created is not finite: {created!r}")
    if not isinstance(body, bytes):
        raise ValueError(f"body is not bytes: {type(body).__name__}")
    return WireRecord(seq, kind, float(created), body)


Aside = tuple[str, Any, int, str]  # (device, seq, 1 for a features record, why)


def say(aside: Sequence[Aside]) -> None:
    """Say the records set aside (a warning each: the gateway's disk misbehaves), once: after
    the pass that set them aside moved its cursor past them."""
    for device, seq, _, why in aside:
        log.warning(
            "event=forward_record_unreadable device=%s seq=%s error=%r action=kept_at_gateway: "
            "the record is damaged in the gateway's store and is not forwarded",
            device, seq, why[:200],
        )  # fmt: skip


def encodable(
    device: str,
    recs: Sequence[WireRecord],
    encode: Callable[[Sequence[WireRecord]], T],
    aside: list[Aside],
) -> tuple[list[WireRecord], T | None]:
    """``recs`` encoded in one batch; when that fails (CodecError: some record does not encode),
    each alone, and those that fail are set aside (into ``aside``). The records that go and
    their batch (None when none is left)."""
    try:
        return list(recs), encode(recs)
    except CodecError:
        pass
    good: list[WireRecord] = []
    for rec in recs:
        try:
            encode((rec,))
        except CodecError as err:
            aside.append((device, rec.seq, int(rec.kind == FEATURES), str(err)))
        else:
            good.append(rec)
    return good, (encode(good) if good else None)


def halves_of(recs: Sequence[WireRecord]) -> tuple[Sequence[WireRecord], Sequence[WireRecord]]:
    """A device's records of an entry the cloud refused with 4.00, in two, sent again as two
    entries: the half that holds no refused record is taken, the other halved again, until the
    record refused is alone (as agent/sync/state.py does with reported keys)."""
    n = len(recs) // 2
    return recs[:n], recs[n:]


def refused(device: str, rec: WireRecord, code: str, reason: str) -> tuple[str, int, int]:
    """A record the cloud refuses alone (4.00: e.g. a body damaged at rest that still encodes,
    with a CBOR tag in it): said, and its key for ``relay_kept`` (never sent again, never
    pruned); the device's other records go."""
    log.warning(
        "event=forward_record_refused device=%s seq=%d code=%s reason=%r action=kept_at_gateway: "
        "the cloud refuses this record; the gateway keeps it and sends the device's others",
        device, rec.seq, code, reason[:200],
    )  # fmt: skip
    return device, rec.seq, int(rec.kind == FEATURES)

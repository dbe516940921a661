"""One simulated device: its identity, its readings and record numbers, the records the endpoint
has not acknowledged yet, and how a batch of them becomes a CoAP request, plain or protected
with OSCORE.

What is real here (as the agent does it, agent/sync/uplink.py and agent/sync/security.py):

- records are store records as the agent sends them: telemetry bodies (agent/wire/records.py),
  numbered from 1, strictly increasing, never reused, encoded by the project's codec in the
  agent's default content format (65001 compact+deflate, the link's initial "medium" policy),
  with each channel's resolution, values on that resolution's grid (as the sampler reports
  them);
- a request is ``POST /ingest/<device>`` with Content-Format; with OSCORE it is protected by a
  :class:`~agent.wire.oscore.PersistentContext` from the device's credential with a fresh random
  ID Context (a device without state), whose sequence numbers never repeat (kept in memory:
  the simulated device never restarts). The endpoint answers the first request of a new ID
  Context with a protected 4.01 + Echo; the request is protected again (a new sequence number)
  with that Echo and sent as a new request, as aiocoap's client does by itself;
- store and forward: records stay until an :class:`~agent.wire.batch.IngestAck` lists their
  seq, and go again (oldest first) with the next batch. A seq the ack names as a conflict
  (another record is stored under it: a previous run on the same database) is dropped and
  counted, never acknowledged.
"""

from __future__ import annotations

import bisect
import random
import secrets
from typing import Any

from aiocoap import Message, oscore
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from agent.wire import codec
from agent.wire.batch import CF_SENML_CBOR, IngestAck, WireRecord
from agent.wire.credentials import Credential
from agent.wire.oscore import ID_CONTEXT_BYTES, PersistentContext, Sequence
from agent.wire.predict import dequantize, step_ratio
from agent.wire.records import Kind, TelemetryBody

#: The agent's content format at start (agent/sync/link.py: the initial "medium" policy).
DEFAULT_CONTENT_FORMAT = 65001
#: A batch is kept to one datagram's worth of payload (the agent's BLOCK_SIZE beyond a LAN): no
#: Block1 here. A batch that encodes larger is halved until it fits.
MAX_PAYLOAD = 1024
TELEMETRY = Kind.TELEMETRY.value

#: The simulated parts, as on the pump rig (agent/examples/pump-rig.toml): sensor, then
#: (channel, mean, noise, resolution) per channel. Readings alternate between the sensors.
SENSORS: tuple[tuple[str, tuple[tuple[str, float, float, float], ...]], ...] = (
    ("motor", (("current_a", 2.4, 0.08, 0.001), ("supply_v", 229.0, 0.6, 0.004))),
    (
        "ambient",
        (
            ("temperature_c", 21.5, 0.05, 0.01),
            ("humidity_rh", 41.0, 0.2, 0.01),
            ("pressure_hpa", 1013.2, 0.05, 0.01),
        ),
    ),
)
_RESOLUTION = {(s, ch): res for s, chans in SENSORS for ch, _, _, res in chans}
#: per sensor, per channel: (name, noise, resolution, its exact fraction), for quantize()
_CHANNELS = [
    [(ch, noise, res, step_ratio(res)) for ch, _, noise, res in chans] for _, chans in SENSORS
]


def resolution(sensor: str, channel: str) -> float | None:
    """A channel's step, for the compact encodings (the agent's runtime.resolution)."""
    return _RESOLUTION.get((sensor, channel))


class Unprotected(Exception):
    """An answer to an OSCORE request that is not protected (the endpoint does not know the
    context: an unknown key id, a malformed option)."""

    def __init__(self, code: Code) -> None:
        super().__init__(f"{code.dotted} without OSCORE")
        self.code = code


class InnerRequest(Message):
    """A request before OSCORE protects it. The protection copies the message it is given
    (:meth:`aiocoap.Message.copy` deep-copies every option: most of protect's cost); this
    copy shares the option objects instead, which nothing changes in place (setting an option
    replaces them), so the copy, and the protected bytes, are the same."""

    def copy(self, **kwargs: Any) -> InnerRequest:
        new = InnerRequest(
            code=kwargs.pop("code", self.code),
            payload=kwargs.pop("payload", self.payload),
            transport_tuning=kwargs.pop("transport_tuning", self.transport_tuning),
        )
        new.mtype = Type(kwargs.pop("mtype")) if "mtype" in kwargs else self.mtype
        new.mid = kwargs.pop("mid", self.mid)
        new.token = kwargs.pop("token", self.token)
        new.remote = kwargs.pop("remote", self.remote)
        new.direction = self.direction
        opt = new.opt
        for option in self.opt.option_list():
            opt.add_option(option)
        if "uri" in kwargs:
            new.set_request_uri(kwargs.pop("uri"))
        for key, value in kwargs.items():
            setattr(opt, key, value)
        return new


class OscoreSession:
    """The device's OSCORE context, kept in memory (never a file: the device never restarts,
    so no sequence number is ever used twice)."""

    def __init__(self, credential: Credential) -> None:
        self.context = PersistentContext(
            credential,
            Sequence(0, _nothing),
            sender_id=credential.sender_id,
            recipient_id=credential.recipient_id,
            id_context=secrets.token_bytes(ID_CONTEXT_BYTES),
        )
        self.context.recipient_replay_window.initialize_empty()

    def protect(self, inner: Message, echo: bytes | None = None) -> tuple[Message, Any]:
        """The protected (outer) request and the id to open its answer with."""
        return self.context.protect(inner if echo is None else inner.copy(echo=echo))

    def unprotect(self, outer: Message, request_id: Any) -> Message:
        """The inner answer; :class:`Unprotected`, or aiocoap's OSCORE errors."""
        if outer.opt.oscore is None:
            raise Unprotected(outer.code)
        header = oscore.verify_start(outer)
        inner, _ = self.context.context_from_response(header).unprotect(outer, request_id)
        return inner


def _nothing() -> None:
    """The persist callback of an in-memory sequence."""


class Device:
    """One device of the fleet. ``credential``: OSCORE with it; None: plain CoAP."""

    def __init__(
        self,
        name: str,
        *,
        batch: int,
        rng: random.Random,
        content_format: int = DEFAULT_CONTENT_FORMAT,
        credential: Credential | None = None,
        max_records: int = 100,
    ) -> None:
        self.name = name
        self.batch = batch
        self.content_format = content_format
        self.max_records = max(batch, max_records)
        self.session = OscoreSession(credential) if credential is not None else None
        self.path = ("ingest", name)
        # the request's options (Uri-Path, Content-Format), made once
        self._options = tuple(
            Message(uri_path=self.path, content_format=content_format).opt.option_list()
        )
        self._rng = rng
        # each device its own operating point: a per-device offset of each channel's mean;
        # per sensor: its name and (channel, mean, noise, resolution, its exact fraction)
        self._sensors = [
            (
                sensor,
                tuple(
                    (ch, mean + rng.gauss(0.0, 8 * noise), noise, res, num, den)
                    for (ch, mean, noise, _), (_, _, res, (num, den)) in zip(
                        chans, channels, strict=True
                    )
                ),
            )
            for (sensor, chans), channels in zip(SENSORS, _CHANNELS, strict=True)
        ]
        self._reading = 0
        self.next_seq = 1
        self.pending: list[WireRecord] = []  # not acknowledged, oldest first
        self.sent = 0  # the highest seq put in a request: 1..sent all went out
        self.acked: list[list[int]] = []  # sorted disjoint [first, last] ranges
        self.conflicted = 0
        self.hold_until = 0.0  # loop time before which nothing is posted (after a 5.03)

    @property
    def generated(self) -> int:
        return self.next_seq - 1

    # -- readings --------------------------------------------------------------------------------

    def produce(self, wall: float, interval: float) -> None:
        """``batch`` readings taken over the ``interval`` seconds up to ``wall``."""
        n = self.batch
        step = interval / n
        start = wall - interval
        gauss = self._rng.gauss
        sensors = self._sensors
        count = len(sensors)
        pending = self.pending
        reading, seq = self._reading, self.next_seq
        for i in range(n):
            t = start + (i + 1) * step
            sensor, channels = sensors[reading % count]
            reading += 1
            # on each channel's grid, as predict.quantize() puts them (its fraction computed once)
            values = {
                ch: dequantize(round((mean + gauss(0.0, noise)) / res), num, den)
                for ch, mean, noise, res, num, den in channels
            }
            body = TelemetryBody(sensor, t, values).to_cbor()
            pending.append(WireRecord(seq, TELEMETRY, t, body))
            seq += 1
        self._reading, self.next_seq = reading, seq

    # -- requests --------------------------------------------------------------------------------

    def next_request(self) -> tuple[Message, list[int]] | None:
        """The oldest unacknowledged records (at most ``max_records``, one datagram's worth) as
        the inner request, and their seqs; None when nothing waits."""
        n = min(len(self.pending), self.max_records)
        if n == 0:
            return None
        while True:
            records = self.pending[:n]
            payload = self._encode(records)
            if len(payload) <= MAX_PAYLOAD or n == 1:
                break
            n //= 2
        seqs = [r.seq for r in records]
        self.sent = max(self.sent, seqs[-1])
        msg = InnerRequest(code=Code.POST, payload=payload)
        opt = msg.opt
        for option in self._options:
            opt.add_option(option)
        return msg, seqs

    def _encode(self, records: list[WireRecord]) -> bytes:
        cf = self.content_format
        if cf == CF_SENML_CBOR:
            return codec.encode_batch(None, records, cf)
        return codec.encode_batch(None, records, cf, resolution=resolution)

    def acknowledged(self, ack: IngestAck, seqs: list[int]) -> int:
        """Apply the endpoint's ack of the request that carried ``seqs``: the acknowledged
        records leave the queue (and are counted), conflicting ones are dropped; returns how
        many were acknowledged."""
        done: set[int] = set()
        first = last = -1
        count = 0
        ranges = ack.ranges
        # the usual ack: one range over all of them, no conflicts: each seq is acknowledged
        everything = (
            bool(seqs)
            and not ack.conflicts
            and len(ranges) == 1
            and ranges[0][0] <= seqs[0]
            and seqs[-1] <= ranges[0][1]
        )
        for seq in seqs:
            if everything or seq in ack:
                done.add(seq)
                count += 1
                if first >= 0 and seq == last + 1:
                    last = seq
                else:
                    if first >= 0:
                        self._add_acked(first, last)
                    first = last = seq
            elif ack.in_conflict(seq):
                done.add(seq)
                self.conflicted += 1
        if first >= 0:
            self._add_acked(first, last)
        if done:
            self.pending = [r for r in self.pending if r.seq not in done]
        return count

    def _add_acked(self, first: int, last: int) -> None:
        ranges = self.acked
        if not ranges or first > ranges[-1][1] + 1:
            ranges.append([first, last])
            return
        if first >= ranges[-1][0]:  # the usual case: at or next to the end
            ranges[-1][1] = max(ranges[-1][1], last)
            return
        i = bisect.bisect_left(ranges, [first, first])
        if i > 0 and ranges[i - 1][1] >= first - 1:
            i -= 1
        j = i
        lo, hi = first, last
        while j < len(ranges) and ranges[j][0] <= hi + 1:
            lo, hi = min(lo, ranges[j][0]), max(hi, ranges[j][1])
            j += 1
        ranges[i:j] = [[lo, hi]]

    def acked_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple((a, b) for a, b in self.acked)

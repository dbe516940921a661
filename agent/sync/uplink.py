"""The uplink: drains the durable store to the cloud endpoint.

Records leave the store in priority order (alerts first), in batches, as confirmable CoAP POSTs
to ``/ingest/{device}``; the endpoint's answer lists the sequence numbers it now holds, and only
those are acknowledged in the store. Anything else (a timeout, a 5.xx, a lost answer) returns the
batch to the store (nack) to be sent again; the endpoint's deduplication by (device, seq) makes a
resent batch harmless: at-least-once delivery, exactly-once effect (docs/protocol.md).

Pacing:

- Several batches may be in flight at once, each on its own transport lane (one confirmable
  exchange per lane, as CoAP's NSTART = 1 asks); how many is a congestion window, grown by one
  per acknowledged batch and cut to 0.7x on a loss, once per round trip (AIMD), between 1 and
  ``max_inflight``.
- The retransmission timeout follows the measured round-trip time (RFC 6298's SRTT/RTTVAR,
  samples from exchanges that needed no retransmission), bounded by transport.ACK_TIMEOUT_MIN/MAX.
- After a failure the uplink waits with exponential backoff and full jitter, capped; while the
  link is down it sends one probe batch per backoff period and nothing else (no busy loop).
- Endpoints are tried in order (:class:`agent.sync.transport.Endpoints`); after ``fallback_after``
  consecutive failures the next one is used, and the primary is tried again periodically.

Answers other than 2.04 follow the table in docs/protocol.md ("what the device does").

Refused records: sent one by one, set aside only when the refusal is isolated
(:mod:`agent.sync.refusals`).

Conflicts: a seq the ack lists in ``conflicts`` (the endpoint holds another record under it: a
forged batch, or an earlier life of this device) is never acknowledged. The record stays, is
counted (``records_conflicted``), logged (``event=ack_conflict``) and moved by
:meth:`agent.store.queue.Store.renumber` to a new epoch above the endpoint's ``last``, then sent
again. An ack whose ``last`` is at or above the store's next seq (a reflashed device, a clock
behind) moves the store to that epoch too before more is numbered (``seq_epochs``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import StoreError, SyncError
from agent.files import config_path_exists, resolve_path
from agent.store.queue import Record, Store
from agent.store.settings import SEQ_HEADROOM
from agent.sync.backoff import clamp_hint, full_jitter
from agent.sync.datapolicy import DataSettings
from agent.sync.refusals import RefusedRecords
from agent.sync.transport import ACK_TIMEOUT_MAX, ACK_TIMEOUT_MIN, CoapTransport, Endpoints, code
from agent.sync.walltime import ASK_EVERY, EndpointClock, ask_time
from agent.wire import codec
from agent.wire.batch import (
    CF_SENML_CBOR,
    MAX_SEQ,
    CodecError,
    IngestAck,
    WireRecord,
    format_ranges,
)
from agent.wire.credentials import register_command
from drivers.base import Options
from drivers.clock import Clock, wait_event

log = logging.getLogger(__name__)

#: Seconds between looks at the store when nobody pokes the uplink (expired leases come back).
IDLE_POLL = 5.0
#: At most this many seconds from the start, records wait for the wall clock to be set and this
#: run's records stamped before it to be restamped (agent/service/wallclock.py), so that a boot
#: without an RTC does not send its first readings stamped 1970 while NTP has not answered yet.
#: Meanwhile the endpoint is asked for its time (agent/sync/walltime.py), which sets it too; with
#: that clock the seconds count from the first answer to an ask (nothing could leave before).
WALL_HOLD = 120.0
#: Pause after the endpoint says the device is not registered (4.04).
NOT_REGISTERED_PAUSE = 60.0
#: The endpoint's limits (docs/protocol.md, "Limits and timing").
MAX_BATCH_BYTES = 64 * 1024
#: aiocoap's block size for request bodies that do not fit one datagram (Block1, SZX 6).
BLOCK_SIZE = 1024
#: Round-trip time (s) above which batches are kept to one datagram.
LAN_RTT = 0.02
#: Multiplicative decrease of the congestion window on a loss (CUBIC's beta, RFC 9438).
BETA = 0.7
MAX_BATCH_RECORDS = 4096
#: Max-Age of a 5.03 that carries none (RFC 7252 section 5.10.5).
DEFAULT_MAX_AGE = 60.0
#: The highest endpoint ``last`` believed: an epoch above it would leave less than SEQ_HEADROOM.
MAX_BELIEVED_LAST = MAX_SEQ - SEQ_HEADROOM


def network_time() -> float:
    """Round trips are the network's: timed in real seconds, like aiocoap's retransmission
    timers, also when the agent's clock runs scaled on a simulated rig."""
    return time.monotonic()


CODE_CHANGED = code("2.04")
CODE_BAD_REQUEST = code("4.00")
CODE_NOT_FOUND = code("4.04")
CODE_TOO_LARGE = code("4.13")
CODE_UNSUPPORTED_FORMAT = code("4.15")
CODE_UNAVAILABLE = code("5.03")


@dataclass(frozen=True)
class UplinkSettings:
    """``[uplink]``: where and how records leave the device."""

    endpoints: tuple[str, ...]
    batch_records: int = 1000
    batch_bytes: int = 48 * 1024  # encoded size aimed at (the endpoint takes up to 64 KiB)
    max_inflight: int = 8
    deadline: float = 30.0  # per exchange
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    fallback_after: int = 3  # consecutive failures before the next endpoint
    primary_retry: float = 60.0
    security: str = "oscore"  # "oscore" | "dtls" (coaps://) | "none" (agent/sync/security.py)
    credential: Path | None = None  # the device's credential file (default DATA/credential.json)
    security_state: Path | None = None  # the OSCORE context's state (default DATA/oscore.json)

    @classmethod
    def from_options(
        cls, opts: Options, data_dir: Path | None = None, base: Path | None = None
    ) -> UplinkSettings:
        data_dir = data_dir or Path(".")
        endpoints = opts.strings("endpoints")
        if not endpoints:
            raise opts.error("endpoints", "list at least one coap:// endpoint")
        security = opts.choice("security", "oscore", ("oscore", "dtls", "none"))
        schemes = ("coaps://",) if security == "dtls" else ("coap://", "coap+tcp://")
        for i, uri in enumerate(endpoints):
            if not uri.startswith(schemes):
                want = " or ".join(schemes)
                raise opts.error(
                    f"endpoints[{i}]", f"{uri!r}: with security = {security!r} give {want} URIs"
                )
            if uri.rstrip("/") != uri:
                raise opts.error(f"endpoints[{i}]", "give the endpoint without a trailing '/'")
            try:  # a port out of range or not a number raises only when it is asked for
                parts = urlsplit(uri)
                good = bool(parts.hostname) and parts.port != 0
            except ValueError:
                good = False
            if not good:
                raise opts.error(
                    f"endpoints[{i}]", f"{uri!r}: not a CoAP URI with a host and a port 1-65535"
                )
        credential = (
            resolve_path(base or Path("."), opts.string("credential"))
            if opts.has("credential")
            else data_dir / "credential.json"
        )
        if opts.has("credential"):  # it may come later, but under a name the system can look up
            config_path_exists(opts, "credential", credential)
        settings = cls(
            endpoints=endpoints,
            batch_records=opts.integer("batch_records", 1000, minimum=1, maximum=MAX_BATCH_RECORDS),
            batch_bytes=opts.integer(
                "batch_bytes", 48 * 1024, minimum=256, maximum=MAX_BATCH_BYTES
            ),
            max_inflight=opts.integer("max_inflight", 8, minimum=1, maximum=64),
            deadline=opts.number("deadline", 30.0, minimum=1.0, maximum=600.0),
            backoff_base=opts.number("backoff_base", 1.0, minimum=0.01, maximum=60.0),
            backoff_max=opts.number("backoff_max", 300.0, minimum=1.0, maximum=86400.0),
            fallback_after=opts.integer("fallback_after", 3, minimum=1, maximum=100),
            primary_retry=opts.number("primary_retry", 60.0, minimum=1.0, maximum=86400.0),
            security=security,
            credential=credential,
            security_state=data_dir / "oscore.json",
        )
        opts.finish()
        return settings


@dataclass
class Policy:
    """What the uplink sends now; the link policy (issue: link adaptation) changes it live."""

    content_format: int = CF_SENML_CBOR
    batch_bytes: int = 48 * 1024
    batch_records: int = 1000
    max_inflight: int = 8
    hold: bool = False  # queue only: lease nothing (the link is offline)
    level: str | None = None  # the link level: picks the [data] policy of each channel


@dataclass(frozen=True)
class Exchange:
    """The outcome of one POST, for the link monitor."""

    endpoint: str
    ok: bool  # an answer came back (any code)
    rtt: float | None  # seconds, when ok
    retransmitted: bool  # the exchange took longer than its retransmission timeout
    bytes_sent: int
    records: int
    delivered: int  # records the endpoint acknowledged


@dataclass
class UplinkStats:
    batches_sent: int = 0
    batches_acked: int = 0
    batches_failed: int = 0
    records_acked: int = 0
    records_rejected: int = 0  # records refused alone, isolated, and set aside (DATA/rejected/)
    records_conflicted: int = 0  # records whose seq the endpoint holds another record under
    seq_epochs: int = 0  # times the store moved to a new epoch above the endpoint's last seq
    bytes_sent: int = 0
    retransmitted: int = 0
    by_code: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RttEstimator:
    """RFC 6298 smoothed RTT and variance; ``rto`` bounded for CoAP's ACK_TIMEOUT.

    Karn's algorithm (RFC 6298 section 5.5): a retransmitted exchange gives no sample, and the
    timeout stays backed off (doubled) until an exchange without retransmission gives one, so a
    round trip that outgrew the timeout is measured again instead of every exchange being sent
    twice."""

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar: float = 0.0
        self.backoff = 1.0

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.backoff = 1.0

    def retransmitted(self, rto: float | None) -> None:
        """An exchange sent with timeout ``rto`` needed a retransmission: back off, once for all
        the exchanges sent with the same timeout."""
        current = self.rto
        if rto is not None and current is not None and rto >= current:
            self.backoff = min(self.backoff * 2, ACK_TIMEOUT_MAX / ACK_TIMEOUT_MIN)

    @property
    def rto(self) -> float | None:
        if self.srtt is None:
            return None
        rto = (self.srtt + 4 * self.rttvar) * self.backoff
        return min(ACK_TIMEOUT_MAX, max(ACK_TIMEOUT_MIN, rto))


class Uplink(RefusedRecords):
    def __init__(
        self,
        settings: UplinkSettings,
        store: Store,
        transport: CoapTransport,
        endpoints: Endpoints,
        clock: Clock,
        *,
        device_id: str,
        resolution: Callable[[str, str], float | None] | None = None,
        on_exchange: Callable[[Exchange], None] | None = None,
        rng: random.Random | None = None,
        data: DataSettings | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.transport = transport
        self.endpoints = endpoints
        self.clock = clock
        self.device_id = device_id
        self.resolution = resolution
        self.data = data  # [data]: readings sent as features at some link levels
        #: model channels read from ``local`` channels: alerts leave without their detail
        self.private: frozenset[str] = frozenset()
        #: set when the wall clock is (agent/service/wallclock.py); None: never wait for it
        self.wall_settled: asyncio.Event | None = None
        self._started = clock.monotonic()
        self._wall_hold_over = False
        #: learns the wall time from the endpoint's acks (agent/sync/walltime.py; None: not)
        self.endpoint_time: EndpointClock | None = None
        self._next_ask = -math.inf
        self._answered_at: float | None = None  # the first answer to an ask (the hold counts)
        self._wall_hold_unanswered = False
        self.on_exchange = on_exchange
        self.rng = rng or random.Random()
        self.policy = Policy(
            batch_bytes=settings.batch_bytes,
            batch_records=settings.batch_records,
            max_inflight=settings.max_inflight,
        )
        self.rtt = RttEstimator()
        self.stats = UplinkStats()
        self.window = 1.0
        self.ssthresh = float(settings.max_inflight)
        self._last_reduction = -math.inf
        self.failures = 0
        self.inflight = 0
        self.busy_since: dict[int, float] = {}  # lane -> clock time its exchange started
        self._free_lanes = list(range(settings.max_inflight - 1, -1, -1))
        self._wake = asyncio.Event()
        self._paused_until = 0.0
        self._probing = False  # a failure happened: one batch at a time until one succeeds
        # encoded bytes per stored payload byte, learned per content format (the link policy
        # switches formats, and SenML-CBOR and the compact ones differ several-fold)
        self._expansion: dict[int, float] = {}
        self._init_refusals()
        self._fallback_cf = False
        self._refused_last: set[str] = set()  # endpoints whose "last" was refused (said once)
        self.online = False
        #: why the last exchange failed ("" after a success): "answer 4.01", "timeout", ...
        self.last_error = ""
        self.not_registered = False  # the endpoint answered 4.04 and nothing succeeded since

    # -- control -----------------------------------------------------------------------------
    def poke(self) -> None:
        """New records are in the store."""
        self._wake.set()

    @property
    def state(self) -> str:
        return "online" if self.online else "offline"

    def _limit(self) -> int:
        if self._probing:
            return 1
        return max(
            1,
            min(
                self.policy.max_inflight,
                len(self._free_lanes) + self.inflight,
                math.floor(self.window),
            ),
        )

    async def _wait(self, seconds: float) -> None:
        self._wake.clear()
        await wait_event(self.clock, self._wake, seconds)

    def _wall_unsettled(self) -> asyncio.Event | None:
        """The wall clock's event while records wait for it (:data:`WALL_HOLD`), else None."""
        settled = self.wall_settled
        if settled is None or settled.is_set():
            return None
        now = self.clock.monotonic()
        since = self._started
        if self.endpoint_time is not None:  # counted from the first answer to an ask
            if self._answered_at is None:  # none yet: nothing could leave (agent/sync/walltime.py)
                if now - since >= WALL_HOLD and not self._wall_hold_unanswered:
                    self._wall_hold_unanswered = True
                    log.info("event=uplink_wall_clock_hold_unanswered waited_s=%.0f", WALL_HOLD)
                return settled
            since = self._answered_at
        if now - since >= WALL_HOLD:
            if not self._wall_hold_over:
                self._wall_hold_over = True
                log.warning("event=uplink_wall_clock_hold_over waited_s=%.0f", WALL_HOLD)
            return None
        return settled

    async def _ask_time(self) -> None:
        """While records wait for the wall clock and it is neither set nor learned, ask the
        endpoint its time (every ASK_EVERY s): held records carry none to it."""
        src, now = self.endpoint_time, self.clock.monotonic()
        if src is None or not src.wants_time or now < self._next_ask or not self._free_lanes:
            return
        self._next_ask = now + ASK_EVERY
        lane = self._free_lanes[-1]  # none is busy: nothing leaves while records wait
        uri = self.endpoints.current
        if await ask_time(src, self.transport, uri, self.device_id, lane) is None:
            self.endpoints.failed(uri)  # no answer: the next ask goes to the next endpoint
        elif self._answered_at is None:
            self._answered_at = self.clock.monotonic()

    # -- main loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                now = self.clock.monotonic()
                if now < self._paused_until:
                    await self.clock.sleep(self._paused_until - now)
                    continue
                if (settled := self._wall_unsettled()) is not None:
                    await self._ask_time()
                    await wait_event(self.clock, settled, IDLE_POLL)
                    continue
                if self.policy.hold or self.inflight >= self._limit() or not self._free_lanes:
                    await self._wait(IDLE_POLL)
                    continue
                batch = await self._lease()
                if not batch:
                    await self._wait(IDLE_POLL)
                    continue
                lane = self._free_lanes.pop()
                self.inflight += 1
                self.busy_since[lane] = self.clock.monotonic()
                tg.create_task(self._send(batch, lane))

    async def _lease(self) -> list[Record]:
        """The next batch, as [data] lets it leave now (a backlog from before a channel became
        ``local`` or ``drop``: DataSettings.at_send); records of which nothing may leave are
        acknowledged in the queue unsent."""
        while True:
            batch = await self._leased()
            if self.data is None or not (self.data.withholds or self.private):
                return batch
            kept, gone = [], []
            for r in batch:
                payload = self.data.at_send(r.kind.value, r.payload, self.private)
                if payload is None:
                    gone.append(r.seq)
                else:
                    kept.append(r if payload is r.payload else replace(r, payload=payload))
            if gone:
                await self.store.ack(gone)
                log.info("event=withheld_unsent records=%d reason=local_or_drop", len(gone))
            if kept or not batch:
                return kept

    async def _leased(self) -> list[Record]:
        if self._release:  # a round called off by a failure or a pause: its records go back
            seqs, self._release = self._release, []
            await self._nack(seqs)
        r = self._round
        if r is not None:
            single = await self.store.batch(1, MAX_BATCH_BYTES)
            if not single and self.inflight == 0 and self._round is r:
                await self._end_round(r)  # nothing else to tell the held ones apart with
            return single
        target = self.policy.batch_bytes
        srtt = self.rtt.srtt
        if srtt is None or srtt > LAN_RTT:
            # Beyond a LAN, a batch that needs Block1 moves one block per round trip on its lane
            # anyway; batches of one datagram each keep every lane of the window busy instead.
            # Until the first round trip is measured, batches are one datagram too.
            target = min(target, BLOCK_SIZE)
        max_bytes = max(64, int(target / self._expansion.get(self._content_format(), 1.5)))
        records = min(self.policy.batch_records, MAX_BATCH_RECORDS)
        return await self.store.batch(records, max_bytes)

    def _content_format(self) -> int:
        return CF_SENML_CBOR if self._fallback_cf else self.policy.content_format

    def _encode(self, batch: list[Record], cf: int) -> bytes:
        level = self.policy.level
        if self.data is not None and self.data.features_at(level):
            # imported at first use (the running agent's memory): only a sensor sent as features
            from agent.sync.featurize import fold

            wire = fold(batch, self.data, level)  # the readings' seqs are acked with them
        else:
            wire = [WireRecord(r.seq, r.kind.value, r.created, r.payload) for r in batch]
        if cf == CF_SENML_CBOR or self.resolution is None:
            return codec.encode_batch(None, wire, cf)
        return codec.encode_batch(None, wire, cf, resolution=self.resolution)

    async def _send(self, batch: list[Record], lane: int) -> None:
        seqs = [r.seq for r in batch]
        cf = self._content_format()
        uri = self.endpoints.current
        probing_primary = self.endpoints.want_primary()
        if probing_primary:
            uri = self.endpoints.uris[0]
        try:
            try:
                payload = self._encode(batch, cf)
            except CodecError as err:
                log.error("event=encode_failed records=%d error=%r", len(batch), str(err))
                await self._refused(batch, f"not encodable: {err}", uri)
                return
            stored = sum(len(r.payload) for r in batch) or 1
            ratio = len(payload) / stored
            learned = self._expansion.get(cf)
            self._expansion[cf] = ratio if learned is None else 0.8 * learned + 0.2 * ratio
            if len(payload) > MAX_BATCH_BYTES and len(batch) > 1:
                await self.store.nack(seqs)
                self.policy.batch_bytes = max(256, self.policy.batch_bytes // 2)
                return
            rto = self.rtt.rto
            started, sent = network_time(), self.clock.monotonic()
            self.stats.batches_sent += 1
            self.stats.bytes_sent += len(payload)
            try:
                resp = await self.transport.request(
                    "POST",
                    f"{uri}/ingest/{self.device_id}",
                    payload,
                    content_format=cf,
                    deadline=self.settings.deadline,
                    lane=lane,
                    ack_timeout=rto,
                )
            except SyncError as err:
                await self._nack(seqs)
                self._report(uri, False, None, False, len(payload), len(batch), 0)
                self._failed(uri, f"{err}", probing_primary)
                return
            rtt, received = network_time() - started, self.clock.monotonic()
            # A body over one block goes as Block1 (RFC 7959): one stop-and-wait exchange per
            # block, so the round trip of one message is the exchange's time per block.
            blocks = max(1, math.ceil(len(payload) / BLOCK_SIZE))
            per_message = rtt / blocks
            # any retransmitted exchange took at least one timeout (RFC 7252's 2 s by default);
            # a retried one (a stale OSCORE number) took two round trips: no sample, no loss
            retried = resp.attempts > 1
            retransmitted = not retried and per_message >= (rto if rto is not None else 2.0)
            if not (retried or retransmitted):
                self.rtt.sample(per_message)
            elif retransmitted:
                self.stats.retransmitted += 1
                self.rtt.retransmitted(rto)
            dotted = resp.dotted
            self.stats.by_code[dotted] = self.stats.by_code.get(dotted, 0) + 1
            delivered = await self._handle(
                resp, batch, seqs, uri, probing_primary, (sent, received)
            )
            log.debug(
                "event=exchange code=%s records=%d bytes=%d rtt=%.3f retransmitted=%s window=%.1f",
                dotted,
                len(batch),
                len(payload),
                per_message,
                retransmitted,
                self.window,
            )
            measured = None if retried else per_message
            self._report(uri, True, measured, retransmitted, len(payload), len(batch), delivered)
            if delivered and retransmitted:
                self._congestion()
        finally:
            self.inflight -= 1
            self.busy_since.pop(lane, None)
            self._free_lanes.append(lane)
            self._wake.set()

    async def _handle(
        self,
        resp: Any,
        batch: list[Record],
        seqs: list[int],
        uri: str,
        probing_primary: bool,
        times: tuple[float, float] | None = None,  # clock.monotonic() at the request, answer
    ) -> int:
        if resp.code == CODE_CHANGED:
            try:
                ack = IngestAck.from_cbor(resp.payload)
            except CodecError as err:
                await self._nack(seqs)
                self._failed(uri, f"unreadable ack: {err}", probing_primary)
                return 0
            if not await self.endpoints.check_store(uri, ack.store):
                # another deployment's storage: it may hold a copy, the device's own storage
                # gets every record (docs/protocol.md, "Fallback endpoints")
                await self._nack(seqs)
                self._failed(uri, f"endpoint of another storage ({ack.store})", probing_primary)
                return 0
            if ack.now is not None and self.endpoint_time is not None and times is not None:
                self.endpoint_time.learn(ack.now, *times)  # its clock, while ours is not set
            if ack.conflict > sum(b - a + 1 for a, b in ack.conflicts):
                # counted but not named (an older endpoint): which seqs are ours there is
                # unknown, so nothing of the batch may be deleted
                await self._nack(seqs)
                log.error(
                    "event=ack_conflict_unnamed endpoint=%s records=%d conflict=%d "
                    "action=kept_batch: upgrade the endpoint",
                    uri,
                    len(batch),
                    ack.conflict,
                )
                self._pause(NOT_REGISTERED_PAUSE)
                return 0
            conflicts = [s for s in seqs if ack.in_conflict(s)]
            acked = [s for s in seqs if s in ack]  # never a conflicting seq
            missing = [s for s in seqs if s not in ack and not ack.in_conflict(s)]
            if acked:
                await self.store.ack(acked)
            last = self._believed_last(ack.last, uri)
            if conflicts or (last is not None and last > self.store.last_seq):
                await self._new_epoch(conflicts, last, uri)
            if missing:
                await self._nack(missing)
            if not acked and not conflicts:  # sent again at once, it would spin
                self._failed(uri, f"ack stored none of the {len(batch)} record(s)", probing_primary)
                return 0
            self.stats.batches_acked += 1
            self.stats.records_acked += len(acked)
            self._succeeded(uri, probing_primary)
            if self._round is not None and len(batch) == 1:
                await self._single_answered(self._round, stored=bool(acked))
            return len(acked)
        if resp.code == CODE_TOO_LARGE:
            if len(batch) == 1:  # no batch limit is below one record: this one, or the endpoint
                await self._refused(batch, _answer(resp), uri)
                return 0
            await self._nack(seqs)
            self.policy.batch_bytes = max(256, self.policy.batch_bytes // 2)
            self.policy.batch_records = max(1, self.policy.batch_records // 2)
            log.warning("event=batch_too_large bytes=%d", self.policy.batch_bytes)
            return 0
        if resp.code == CODE_UNSUPPORTED_FORMAT and not self._fallback_cf:
            await self._nack(seqs)
            self._fallback_cf = True
            log.warning(
                "event=format_refused content_format=%d fallback=112", self._content_format()
            )
            return 0
        if resp.code == CODE_BAD_REQUEST:
            await self._refused(batch, _answer(resp), uri)
            return 0
        await self._nack(seqs)
        if resp.code == CODE_NOT_FOUND:
            self.last_error = "answer 4.04 (device not registered)"
            # said once, with the pause; the next tries go quietly until one succeeds
            (log.debug if self.not_registered else log.error)(
                "event=device_not_registered device=%s endpoint=%s retry_in=%gs: register it on "
                "the endpoint (%s), then records go out at the next try",
                self.device_id,
                uri,
                NOT_REGISTERED_PAUSE,
                register_command(self.device_id),
            )
            self.not_registered = True
            self._pause(NOT_REGISTERED_PAUSE)
        elif resp.code == CODE_UNAVAILABLE:
            hint = DEFAULT_MAX_AGE if resp.max_age is None else float(resp.max_age)
            delay = clamp_hint(hint, self.settings.backoff_base, self.settings.backoff_max)
            self.stats.batches_failed += 1
            self.last_error = f"answer 5.03 (endpoint unavailable), retry in {delay:g}s"
            self._pause(delay)
        else:
            self._failed(uri, f"answer {resp.dotted}", probing_primary)
        return 0

    def _believed_last(self, last: int | None, uri: str) -> int | None:
        """The endpoint's ``last``, or None when an epoch above it would leave less than
        SEQ_HEADROOM of the sequence space (one ack must not use it up)."""
        if last is None or last <= MAX_BELIEVED_LAST:
            return last
        (log.debug if uri in self._refused_last else log.error)(
            "event=ack_last_refused endpoint=%s last=%d limit=%d action=kept_own_epoch: the "
            "endpoint claims seqs this device never numbered; check its records of the device",
            uri,
            last,
            MAX_BELIEVED_LAST,
        )
        self._refused_last.add(uri)
        return None

    async def _new_epoch(self, conflicts: list[int], last: int | None, uri: str) -> None:
        """The endpoint holds other records under ``conflicts`` (forged, or an earlier life of
        this device), or numbers at or above our next one (``last``): number above ``last`` from
        now on, and send the conflicting records again under new numbers. They are kept: the
        endpoint does not hold them under any number yet, so each is stored once, under its new
        one. Records that may have reached it under their own numbers are never renumbered."""
        floor = max(last or 0, max(conflicts, default=0))
        before = self.store.last_seq
        try:
            moved = await self.store.renumber(conflicts, floor)
        except StoreError as err:
            log.error("event=renumber_failed records=%d error=%r", len(conflicts), str(err))
            await self._nack(conflicts)
            return
        if floor > before:
            self.stats.seq_epochs += 1
        if not conflicts:
            log.warning(
                "event=seq_epoch endpoint=%s endpoint_last=%d next_seq=%d was=%d",
                uri,
                floor,
                self.store.last_seq + 1,
                before + 1,
            )
            return
        self.stats.records_conflicted += len(conflicts)
        log.warning(
            "event=ack_conflict endpoint=%s records=%d seqs=%s endpoint_last=%s new_seqs=%s "
            "action=resend_renumbered",
            uri,
            len(conflicts),
            format_ranges(conflicts),
            "none" if last is None else last,
            format_ranges(list(moved.values())) or "none",
        )

    async def _nack(self, seqs: list[int]) -> None:
        try:
            await self.store.nack(seqs)
        except StoreError as err:  # the lease will expire and they come back anyway
            log.warning("event=nack_failed records=%d error=%r", len(seqs), str(err))

    def _report(
        self,
        uri: str,
        ok: bool,
        rtt: float | None,
        retrans: bool,
        sent: int,
        n: int,
        delivered: int,
    ) -> None:
        if self.on_exchange is not None:
            self.on_exchange(Exchange(uri, ok, rtt, retrans, sent, n, delivered))

    # -- congestion and backoff --------------------------------------------------------------
    def _succeeded(self, uri: str, probing_primary: bool) -> None:
        if probing_primary:
            self.endpoints.primary_ok()
        if self.not_registered:
            log.info(
                "event=device_registered device=%s endpoint=%s: the endpoint accepts the device "
                "now; sending what is queued",
                self.device_id,
                uri,
            )
            self.not_registered = False
        if not self.online:
            log.info("event=uplink_online endpoint=%s", uri)
        self.online = True
        self._refusing = False
        self.failures = 0
        self.last_error = ""
        self._probing = False
        if self.window < self.ssthresh:
            self.window += 1.0  # slow start
        else:
            self.window += 1.0 / self.window  # congestion avoidance
        self.window = min(self.window, float(self.policy.max_inflight))

    def _congestion(self) -> None:
        """A loss: shrink the window, at most once per round trip (losses within one window of
        exchanges are one congestion event, as in TCP's fast recovery)."""
        now = network_time()
        if now - self._last_reduction < (self.rtt.srtt or 0.0):
            return
        self._last_reduction = now
        self.ssthresh = max(1.0, self.window * BETA)
        self.window = self.ssthresh

    def _failed(self, uri: str, why: str, probing_primary: bool) -> None:
        self._call_off_round()
        self.stats.batches_failed += 1
        self.last_error = why
        if probing_primary:
            self.endpoints.retried_primary_failed()
            return
        self.failures += 1
        self._congestion()
        self.window = 1.0  # a failed exchange (no answer at all): start again from one
        self._probing = True
        if self.failures >= self.settings.fallback_after and len(self.endpoints.uris) > 1:
            self.endpoints.failed(uri)
        if self.online and self.failures >= self.settings.fallback_after:
            log.warning("event=uplink_offline endpoint=%s error=%r", uri, why)
            self.online = False
        delay = full_jitter(
            self.failures, self.settings.backoff_base, self.settings.backoff_max, self.rng
        )
        log.debug(
            "event=exchange_failed endpoint=%s failures=%d backoff=%.2f error=%r",
            uri,
            self.failures,
            delay,
            why,
        )
        self._pause(delay)

    def _pause(self, seconds: float) -> None:
        self._call_off_round()
        self._paused_until = max(self._paused_until, self.clock.monotonic() + seconds)


def _answer(resp: Any) -> str:
    """An answer for the log and the set-aside file: its code and diagnostic payload."""
    text = bytes(resp.payload or b"")[:120].decode("utf-8", "replace")
    return f"{resp.dotted} {text}".strip()

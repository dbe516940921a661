"""The gateway's way up: records, reported state, desired state and models between the gateway's
own store and the cloud endpoint (docs/gateway.md).

- :class:`RecordForwarder`: every record a device's batch committed to the gateway's store
  (cloud.storage, SQLite) is forwarded to the cloud under the device's name and sequence number,
  in the order the gateway stored them, alerts of a pass first, many devices' records in one
  request per pass (``POST /relay/<gateway>``: one compact+deflate batch per device). Features
  records (stored in their own table) go too, from a queue a trigger fills in the ingest's
  transaction (:func:`prepare_store`). The forwarding cursors (the store's arrival counter, the
  queue's number) move, and are written to disk, only after the cloud acknowledged everything
  before them: a SIGKILL or an outage sends some records twice, which the cloud stores once (it
  deduplicates by device and seq), and never skips one. A device's entry the cloud answers
  "later" (5.03: its rate limit) is kept and sent after max-age; one it refuses otherwise (4.03:
  not attached to this gateway, 4.04, ...) is kept and sent again after a pause that grows: the
  other devices' records go on (agent/gateway/later.py). One of several records refused 4.00 is
  sent again in halves until each record refused is alone; those, and records damaged at rest,
  are set aside (agent/gateway/aside.py) and the rest go.
- :class:`StateRelay`: reported state the devices PUT to the gateway is PUT to the cloud with the
  devices' own versions; each device's desired document is read from the cloud and mirrored into
  the gateway's store with the cloud's versions, revision and storage identity, so a device sees
  the same document from the gateway or the cloud and can fall back from one to the other; the
  model versions it assigns are fetched once into the gateway's registry (the cloud's signed
  manifest kept byte for byte: devices still verify the signature).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ModelError, SyncError
from agent.files import read_json, write_atomic
from agent.gateway import aside, later, modelparts
from agent.gateway.aside import BAD_REQUEST, halves_of
from agent.gateway.resolutions import Resolutions
from agent.gateway.storeparts import prepare_store, prune
from agent.modelstore.fetch import ModelFetcher
from agent.sync.statedata import chunks, halves
from agent.sync.transport import CoapTransport, Response
from agent.sync.walltime import ASK_DEADLINE, ASK_EVERY, EMPTY_BATCH, EndpointClock
from agent.wire import codec, statedoc
from agent.wire.batch import (
    CF_CBOR,
    CF_SENML_CBOR,
    FEATURES,
    CodecError,
    IngestAck,
    WireRecord,
    format_ranges,
)
from agent.wire.compact_format import CF_COMPACT_DEFLATE
from agent.wire.features import MAX_BATCH_READINGS, FeaturesBody
from agent.wire.relay import (
    MAX_BODY_BYTES,
    MAX_ENTRIES,
    RelayEntry,
    RelayRefusal,
    decode_relay_answer,
    encode_relay,
)
from agent.wire.statedoc import DesiredDoc, StateError

log = logging.getLogger("agent.gateway")

CURSOR_FILE = "forward.json"
REQUEST_DEADLINE = 60.0
MAX_BATCH_RECORDS = 4096  # per device and entry (the endpoint's limit of a batch)
BATCH_BYTES = 64 * 1024  # an entry's encoded batch, at most (the endpoint's Limits.batch_bytes)
RELAY_RECORDS = 4 * 4096  # per /relay request (the endpoint's Limits.relay_records)
#: Readings the features records of one batch, and of one /relay request, stand for at most (the
#: endpoint's Limits.batch_readings and relay_readings)
BATCH_READINGS = MAX_BATCH_READINGS
RELAY_READINGS = 4 * MAX_BATCH_READINGS
KEEP_FORWARDED = 7 * 86400.0  # seconds a forwarded record stays ([gateway] keep_forwarded)
RELAY_BYTES = MAX_BODY_BYTES - 4096  # batches per /relay request (a body under the limit)
RELAY_ENTRY_OVERHEAD = 80  # CBOR of an entry around its batch: device name, format, lengths
#: A device's reported keys go up in PUTs of about this size (the endpoint takes 8 KiB: a device
#: PUTs up to that to the gateway, many times, so the gateway can hold more)
STATE_PUT_BYTES = 4096
#: Answers to a reported PUT that say who may not (the gateway, the device), not what: the keys
#: are sent again with the next pass, when the operator may have set it right
STATE_RETRY_LATER = frozenset({"4.01", "4.03", "4.04"})

Db = Callable[
    [Callable[[Any], Any]], Awaitable[Any]
]  # CloudServer.db: run fn(storage) on its thread


def _alerts_waiting(s: Any, after: int) -> bool:
    row = s.db.execute(
        "SELECT 1 FROM records WHERE arrival > ? AND kind = 'alert' LIMIT 1", (after,)
    ).fetchone()
    return row is not None


def _newest_arrival(s: Any) -> int:
    """The last arrival number the gateway's store handed out (cloud/storage.py)."""
    row = s.db.execute("SELECT value FROM counters WHERE name = 'arrival'").fetchone()
    return int(row[0]) if row else 0


def _waiting(s: Any, after: int) -> int:
    """Records stored after arrival ``after`` (arrival numbers have no gaps) and records held
    for later: what waits to be forwarded."""
    (held,) = s.db.execute("SELECT COUNT(*) FROM relay_later").fetchone()
    return max(0, _newest_arrival(s) - after) + int(held)


def _keep(s: Any, kept: Sequence[tuple[str, int, int]]) -> None:
    """Mark records (device, seq, 1 for a features record) the cloud did not take: never pruned."""
    s.db.executemany(
        "INSERT OR IGNORE INTO relay_kept (device, seq, features) VALUES (?, ?, ?)", kept
    )


def _newest_queued(s: Any) -> int:
    """The last number the features queue handed out."""
    row = s.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'relay_features'").fetchone()
    return int(row[0]) if row else 0


def _pending_features(s: Any, after: int, limit: int) -> list[tuple[int, str, WireRecord | None]]:
    """Features records queued after ``after``: (number, device, record as the device sent it,
    None for one no longer stored or that does not decode), in the order they were stored."""
    rows = s.db.execute(
        "SELECT q.n, q.device, f.body FROM relay_features AS q LEFT JOIN features AS f "
        "ON f.device = q.device AND f.first_seq = q.first_seq WHERE q.n > ? ORDER BY q.n LIMIT ?",
        (after, limit),
    ).fetchall()
    out: list[tuple[int, str, WireRecord | None]] = []
    for n, device, body in rows:
        rec = None
        if body is not None:
            try:
                rec = later.features_record(body)  # the device's bytes, as it sent them
            except CodecError as err:  # the store held it decoded once: damaged at rest
                log.warning(
                    "event=forward_features_unreadable device=%s error=%r", device, str(err)
                )
        out.append((int(n), device, rec))
    return out


def _seqs(rec: WireRecord) -> tuple[int, ...]:
    """The readings a record stands for: its own seq, or a features record's."""
    if rec.kind == FEATURES:
        return FeaturesBody.from_cbor(bytes(rec.body)).seqs
    return (rec.seq,)


def _claimed(recs: Sequence[WireRecord]) -> int:
    """The readings ``recs``' features records stand for (the endpoint's limits count these)."""
    return sum(len(_seqs(r)) for r in recs if r.kind == FEATURES)


def _batches(recs: Sequence[WireRecord]) -> list[Sequence[WireRecord]]:
    """A device's records of a pass cut into batches the endpoint takes: at most
    MAX_BATCH_RECORDS records whose features records stand for at most BATCH_READINGS readings."""
    out: list[list[WireRecord]] = []
    readings = 0
    for rec in recs:
        n = _claimed((rec,))
        if not out or len(out[-1]) >= MAX_BATCH_RECORDS or readings + n > BATCH_READINGS:
            out.append([])
            readings = 0
        out[-1].append(rec)
        readings += n
    return list(out)


def _pending(
    s: Any, after: int, limit: int, damaged: list[aside.Aside]
) -> list[tuple[int, str, WireRecord | None]]:
    """Records stored after arrival ``after``: (arrival, device, record), in arrival order; a
    row damaged at rest is None there and in ``damaged`` (agent/gateway/aside.py), as is one
    whose arrival is no number (SQLite orders text after every number: it would come back at
    every pass, so one set aside before, in ``relay_kept``, is not read again)."""
    rows = s.db.execute(
        "SELECT arrival, device, seq, kind, created, body FROM records WHERE arrival > ? AND "
        "(typeof(arrival) = 'integer' OR NOT EXISTS (SELECT 1 FROM relay_kept AS k WHERE "
        "k.device = records.device AND k.seq = records.seq AND k.features = 0)) "
        "ORDER BY arrival LIMIT ?",
        (after, limit),
    ).fetchall()
    out: list[tuple[int, str, WireRecord | None]] = []
    for a, d, q, k, c, b in rows:
        try:
            if isinstance(a, bool) or not isinstance(a, int):
                raise ValueError(f"arrival is not an integer: {a!r:.40}")
            out.append((a, d, aside.record(q, k, c, b)))
        except ValueError as err:
            damaged.append((d, q, 0, str(err)))
            if isinstance(a, int):
                out.append((a, d, None))
    return out


class RecordForwarder:
    """Forwards the gateway's stored records to the cloud (module docstring)."""

    def __init__(
        self,
        db: Db,
        transport: CoapTransport,
        base: Callable[[], str],
        data_dir: Path,
        *,
        name: str,
        records: int = 20_000,
        lane: int = 0,
        keep: float = KEEP_FORWARDED,
        wall: Callable[[], float] = time.time,
        time_from: EndpointClock | None = None,
        devices: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self.name = name  # the gateway's principal: POST /relay/<name>
        #: learns the wall time from the cloud's acks while the gateway's clock is not set (its
        #: devices get it in theirs: agent/sync/walltime.py); ``devices``: whom to ask it as
        self.time_from, self.devices = time_from, devices
        self._next_ask = -math.inf  # time_from's monotonic clock: no ask before
        self._asks = 0  # asks made: each asks as the next of its devices
        self.keep, self.wall = keep, wall  # forwarded records are dropped ``keep`` s after
        self.resolutions = Resolutions(data_dir)
        self.db = db
        self.transport = transport
        self.base = base
        self.path = Path(data_dir) / CURSOR_FILE
        self.records = records
        self.lane = lane
        self.cursor, self.features_cursor = self._load()
        self._cursor_checked = False
        self.forwarded = 0  # records the cloud acknowledged (new or duplicate)
        self.pruned = 0  # records and features records dropped from the store since the start
        self._prune_failing = False  # the last prune failed (said once until one works)
        self.requests = 0
        self.bytes_up = 0  # request payload bytes sent upstream
        self.conflicts = 0
        self.unreadable = 0  # records damaged at rest, set aside (agent/gateway/aside.py)
        self.refused = 0  # records the cloud refused alone (4.00), set aside (aside.py)
        self.later = later.Later()  # devices the cloud asked to wait, and their records

    def _load(self) -> tuple[int, int]:
        """The cursors saved (arrival, features queue); 0 (forward everything again: the cloud
        stores each record once) for one that is missing or unreadable."""
        try:
            doc = read_json(self.path)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            arrival, features = doc["arrival"], doc.get("features", 0)
            for name, value in (("arrival", arrival), ("features", features)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name}: not a cursor: {value!r}")
            return arrival, features
        except FileNotFoundError:
            return 0, 0
        except (OSError, ValueError, KeyError) as err:
            log.warning("event=forward_cursor_unreadable path=%s error=%r", self.path, str(err))
            return 0, 0

    async def _check_cursor(self) -> None:
        """Once, before the first pass: the store's gateway parts (:func:`prepare_store`), and a
        cursor beyond the newest record stored (a store moved away or replaced while the cursor
        file stayed, or a corrupt number), which would hold back every record until arrivals
        pass it: forwarding starts again from the beginning instead."""
        await self.db(prepare_store)
        self._cursor_checked = True
        newest = await self.db(_newest_arrival)
        queued = await self.db(_newest_queued)
        if self.cursor > newest or self.features_cursor > queued:
            log.warning(
                "event=forward_cursor_reset cursor=%d newest=%d features=%d queued=%d path=%s "
                "note=forwarding every stored record again; the cloud stores each once",
                self.cursor, newest, self.features_cursor, queued, self.path,
            )  # fmt: skip
            self.cursor = 0 if self.cursor > newest else self.cursor
            self.features_cursor = 0 if self.features_cursor > queued else self.features_cursor
            await self._save()

    async def _save(self) -> None:
        doc = {"arrival": self.cursor, "features": self.features_cursor}
        await asyncio.to_thread(write_atomic, self.path, (json.dumps(doc) + "\n").encode())

    async def alerts_waiting(self) -> bool:
        cursor = self.cursor
        return bool(await self.db(lambda s: _alerts_waiting(s, cursor)))

    async def waiting(self) -> int:
        """Records waiting to be forwarded (stored after the cursor, or held for later)."""
        cursor = self.cursor
        return int(await self.db(lambda s: _waiting(s, cursor)))

    async def forward_once(self) -> int:
        """One pass: forward what is pending (at most ``records``) in one ``POST /relay``; the
        records acknowledged. Raises SyncError when the cloud did not take them all (the cursor
        stays: the next pass sends them again, and the cloud stores each once). The prune
        follows every pass, one that failed or had nothing to send too: a full store frees what
        the cloud acknowledged before while the passes fail."""
        try:
            done = await self._pass()
        except Exception:
            if self._cursor_checked:  # the store's gateway parts are there
                await self.prune()
            raise
        await self.prune()
        return done

    async def _pass(self) -> int:
        if not self._cursor_checked:
            await self._check_cursor()
        cursor, fcursor, limit = self.cursor, self.features_cursor, self.records
        damaged: list[aside.Aside] = []  # records damaged at rest: set aside (aside.py)
        rows = await self.db(lambda s: _pending(s, cursor, limit, damaged))
        feats = await self.db(lambda s: _pending_features(s, fcursor, limit))
        due = await self.later.due(self.db, limit, damaged)  # held, their pause over
        if not rows and not feats and not due and not damaged:
            await self._ask_time()
            return 0
        held: list[later.Key] = []  # to send later: the cloud said so, or says so now
        items = [*due, *((d, r) for _, d, r in rows if r), *((d, r) for _, d, r in feats if r)]
        by_device = self.later.gather(items, held)  # alerts first, features records last
        parts = [
            (device, batch)
            for device, recs in sorted(by_device.items(), key=lambda kv: _first_alert(kv[1]))
            for batch in _batches(recs)
        ]
        await self.resolutions.save()
        encoded = [part for device, recs in parts for part in self._entry(device, recs, damaged)]
        done = 0
        kept: list[tuple[str, int, int]] = [(d, q, f) for d, q, f, _ in damaged]
        for request in _requests(encoded):
            done += await self._relay(request, kept, held)
        sent = [later.key(d, r) for d, r in due] + kept  # held ones set aside leave relay_later
        try:  # before the cursor passes them, so no prune can take them
            if kept:
                await self.db(lambda s: _keep(s, kept))
            await self.later.save(self.db, sent, held)
        except (AgentError, sqlite3.Error) as err:  # a full disk: the pass is tried again
            raise SyncError(f"the store did not take the records kept or held: {err}") from err
        self.cursor = max((a for a, _, _ in rows), default=self.cursor)
        self.features_cursor = max((n for n, _, _ in feats), default=self.features_cursor)
        await self._save()
        aside.say(damaged)
        self.unreadable += len(damaged)
        self.forwarded += done
        await self._ask_time()  # its acks may have been too slow to teach the time
        return done

    async def prune(self) -> int:
        """Drop from the store what the cloud holds and is older than ``keep`` (:func:`prune`):
        a gateway's disk holds what it has not forwarded and ``keep`` seconds of the rest. A
        failure (a full or damaged disk) is said once and tried again after the next pass."""
        arrival, queued, now = self.cursor, self.features_cursor, self.wall()
        try:
            dropped = int(
                await self.db(lambda s: prune(s, arrival, queued, now - self.keep, now=now))
            )
        except (AgentError, sqlite3.Error) as err:
            if not self._prune_failing:
                log.warning("event=gateway_prune_failed error=%r", str(err))
            self._prune_failing = True
            return 0
        if self._prune_failing:
            log.info("event=gateway_prune_ok dropped=%d", dropped)
        self._prune_failing = False
        self.pruned += dropped
        return dropped

    def _entry(
        self, device: str, recs: Sequence[WireRecord], damaged: list[aside.Aside]
    ) -> list[tuple[str, Sequence[WireRecord], RelayEntry]]:
        """A device's batch of a pass as relay entries, in halves while larger than BATCH_BYTES
        (readings sent exactly take more than the device's own batches did); a record that does
        not encode is set aside into ``damaged`` (none left: no entry)."""
        recs, batch = aside.encodable(device, recs, lambda rs: self._batch(device, rs), damaged)
        if batch is None or len(batch.batch) <= BATCH_BYTES or len(recs) == 1:
            return [] if batch is None else [(device, recs, batch)]
        return [p for half in halves_of(recs) for p in self._entry(device, half, damaged)]

    def _batch(self, device: str, recs: Sequence[WireRecord]) -> RelayEntry:
        batch = codec.encode_batch(
            None, recs, CF_COMPACT_DEFLATE, resolution=self.resolutions.of(device)
        )
        return RelayEntry(device, CF_COMPACT_DEFLATE, batch)

    async def _relay(
        self,
        parts: Sequence[tuple[str, Sequence[WireRecord], RelayEntry]],
        kept: list[tuple[str, int, int]],
        held: list[later.Key],
    ) -> int:
        paused = self.later.paused()  # since an earlier request of this pass: not sent now
        held += [later.key(d, r) for d, recs, _ in parts if d in paused for r in recs]
        if not (parts := [p for p in parts if p[0] not in paused]):
            return 0
        entries = [entry for _, _, entry in parts]
        answers = await self._post(entries, REQUEST_DEADLINE)
        uri = f"{self.base()}/relay/{self.name}"
        done = 0
        split: list[tuple[str, Sequence[WireRecord], RelayEntry]] = []
        for (device, recs, _), answer in zip(parts, answers, strict=True):
            if isinstance(answer, RelayRefusal) and answer.code == BAD_REQUEST:
                if len(recs) > 1:  # some record of it is refused: which, the halves tell
                    split += [(device, h, self._batch(device, h)) for h in halves_of(recs)]
                else:  # refused alone: set aside, the device's others go
                    kept.append(aside.refused(device, recs[0], answer.dotted, answer.message))
                    self.refused += 1
                continue
            if isinstance(answer, RelayRefusal):  # held: the others go on (agent/gateway/later.py)
                if answer.code == later.CODE_LATER:
                    self.later.pause(device, answer.max_age, len(recs))  # its rate limit
                else:  # e.g. 4.03: not attached to this gateway
                    self.later.refuse(device, answer.dotted, answer.message, len(recs))
                held += [later.key(device, r) for r in recs]
                continue
            done += self._acked(device, recs, answer, uri, kept)
            self.later.taken(device)
        for request in _requests(split):  # each round halves them: log2(MAX_BATCH_RECORDS) at most
            done += await self._relay(request, kept, held)
        return done

    async def _post(
        self, entries: list[RelayEntry], deadline: float
    ) -> list[IngestAck | RelayRefusal]:
        """``POST /relay/<name>`` of ``entries``: one answer per entry (SyncError: none). An ack
        that says the cloud's time teaches it to ``time_from``."""
        body = encode_relay(entries)
        uri = f"{self.base()}/relay/{self.name}"
        clock = self.time_from
        sent = 0.0 if clock is None else clock.monotonic()
        resp = await self.transport.request(
            "POST", uri, body, content_format=CF_CBOR, accept=CF_CBOR,
            deadline=deadline, lane=self.lane,
        )  # fmt: skip
        received = 0.0 if clock is None else clock.monotonic()
        self.requests += 1
        self.bytes_up += len(body)
        if not resp.success:
            raise SyncError(f"POST {uri}: {resp.dotted} {resp.payload[:120]!r}")
        try:
            answers = decode_relay_answer(resp.payload, len(entries))
        except AgentError as err:
            raise SyncError(f"POST {uri}: the answer does not decode: {err}") from None
        said = [a.now for a in answers if isinstance(a, IngestAck) and a.now is not None]
        if said and clock is not None:
            clock.learn(said[0], sent, received)
        return answers

    async def _ask_time(self) -> None:
        """At the end of a pass, the gateway's clock neither set nor learned (nothing was
        forwarded, or the acks came too slowly to teach the time: a body of many Block1 blocks
        on a slow uplink): one entry of an empty batch (of its devices in turn, so one the cloud
        refuses, a device removed there, does not stop it), a single datagram, whose ack says
        the cloud's time; at most every ASK_EVERY s. A failure changes nothing (the passes say
        what is wrong with the uplink)."""
        names, clock = self.devices(), self.time_from
        if clock is None or not clock.wants_time or not names:
            return
        if (now := clock.monotonic()) < self._next_ask:
            return
        self._next_ask = now + ASK_EVERY
        name = names[self._asks % len(names)]  # in turn: the cloud may refuse one of them
        self._asks += 1
        try:
            await self._post([RelayEntry(name, CF_SENML_CBOR, EMPTY_BATCH)], ASK_DEADLINE)
        except SyncError as err:
            log.debug("event=time_ask_failed error=%r", str(err))

    def _acked(
        self,
        device: str,
        recs: Sequence[WireRecord],
        ack: IngestAck,
        uri: str,
        kept: list[tuple[str, int, int]],
    ) -> int:
        """The records the cloud took; those it did not (a conflict) go into ``kept``."""
        missing = 0
        conflicted: list[tuple[str, int, int]] = []
        for rec in recs:
            seqs = _seqs(rec)
            taken = [q for q in seqs if q in ack or ack.in_conflict(q)]
            if not taken:
                missing += 1
            elif any(ack.in_conflict(q) for q in seqs):
                conflicted.append((device, rec.seq, int(rec.kind == FEATURES)))
            elif len(taken) < len(seqs):
                # a features record of which the cloud holds some readings in another form (sent
                # to it directly): it acknowledges those and, as to a device, not the others,
                # which only the device could send again. Said, kept, never sent again in a loop.
                conflicted.append((device, rec.seq, 1))
                log.warning(
                    "event=forward_features_partial device=%s first=%d readings=%d taken=%d",
                    device, seqs[0], len(seqs), len(taken),
                )  # fmt: skip
        if missing:
            raise SyncError(f"POST {uri}: {device}: {missing} records not acknowledged")
        if conflicted:  # the cloud holds other records under these numbers: it keeps its own
            self.conflicts += len(conflicted)
            kept.extend(conflicted)
            log.error(
                "event=forward_conflict device=%s seqs=%s action=kept_at_gateway: the cloud "
                "holds other records under these numbers; the gateway keeps its copies",
                device, format_ranges(sorted(q for _, q, _ in conflicted)),
            )  # fmt: skip
        return len(recs) - len(conflicted)


def _requests(
    parts: Sequence[tuple[str, Sequence[WireRecord], RelayEntry]],
) -> list[list[tuple[str, Sequence[WireRecord], RelayEntry]]]:
    """The encoded parts of a pass cut into requests the endpoint takes: at most MAX_ENTRIES
    entries, RELAY_RECORDS records, RELAY_READINGS readings of features records and RELAY_BYTES
    of batches each (more is refused 4.13)."""
    out: list[list[tuple[str, Sequence[WireRecord], RelayEntry]]] = []
    records = size = readings = 0
    for part in parts:
        n, b = len(part[1]), len(part[2].batch) + RELAY_ENTRY_OVERHEAD
        r = _claimed(part[1])
        if (
            not out
            or len(out[-1]) >= MAX_ENTRIES
            or records + n > RELAY_RECORDS
            or size + b > RELAY_BYTES
            or readings + r > RELAY_READINGS
        ):
            out.append([])
            records = size = readings = 0
        out[-1].append(part)
        records, size, readings = records + n, size + b, readings + r
    return out


def _first_alert(recs: Sequence[WireRecord]) -> int:
    """0 for a device with an alert in the pass (its entry goes first), else 1."""
    return 0 if recs and recs[0].kind == "alert" else 1


class StateRelay:
    """Reported state up, desired state (and the models it assigns) down (module docstring)."""

    def __init__(
        self,
        db: Db,
        transport: CoapTransport,
        base: Callable[[], str],
        devices: Callable[[], Sequence[str]],
        *,
        on_desired: Callable[[str, DesiredDoc], Awaitable[None]],
        fetcher: ModelFetcher,
        put_model: Callable[[str, str, bytes, bytes], Awaitable[bool]],
        has_model: Callable[[str, str], Awaitable[bool]],
        releases: Callable[[DesiredDoc], Awaitable[None]] | None = None,
        lane: int = 0,
        scratch: Path,
    ) -> None:
        self.db = db
        self.transport = transport
        self.base = base
        self.devices = devices
        self.on_desired = on_desired
        self.fetcher = fetcher
        self.put_model = put_model
        self.has_model = has_model
        self.releases = releases  # the release a document assigns (agent/gateway/releases.py)
        self.scratch = scratch  # the models' partial downloads (agent/gateway/modelparts.py)
        self.lane = lane
        self._sent: dict[str, dict[str, int]] = {}  # device -> key -> version PUT to the cloud
        self._mirrored: dict[str, bytes] = {}  # device -> ETag of the desired doc mirrored
        self._refused: dict[str, object] = {}  # device -> the last refusal logged
        self._desired_refused: dict[str, object] = {}  # the same, of desired documents
        self.model_fetches: dict[tuple[str, str], int] = {}  # (name, version) -> downloads

    # -- reported: devices -> cloud ------------------------------------------------------------
    async def reported_once(self) -> int:
        """PUT every reported key whose version the cloud has not had from us; keys sent. A
        device the cloud refuses (4.xx) costs no other device: keys refused for what they hold
        are not sent again until their version changes (the device's others go); a refusal of
        who asks (4.01, 4.03, 4.04) is tried again next pass. A 5.xx or no answer ends the
        pass (SyncError: it is tried again)."""
        sent = 0
        for device in self.devices():
            entries = await self.db(lambda s, d=device: s.reported(d))
            done = self._sent.setdefault(device, {})
            changed = {k: e for k, e in entries.items() if done.get(k) != e.version}
            uri = f"{self.base()}/state/{device}/reported"
            for chunk in chunks(changed, STATE_PUT_BYTES):
                took = await self._put_reported(device, uri, chunk, done)
                if took is None:
                    break  # the cloud does not take this device's state from us now
                sent += took
        return sent

    async def _put_reported(
        self,
        device: str,
        uri: str,
        chunk: dict[str, statedoc.Entry],
        done: dict[str, int],
        splitting: bool = False,
    ) -> int | None:
        """PUT ``chunk``; how many keys the cloud took, None if it refused who asks. One value
        it refuses refuses the whole PUT (4.00: e.g. a text with a NUL that the gateway stored
        before the decoder refused them): the halves are sent again until the key refused is
        alone, so that the others go up."""
        payload = statedoc.encode_reported(chunk)
        resp = await self.transport.request(
            "PUT", uri, payload, content_format=CF_CBOR, deadline=REQUEST_DEADLINE,
            lane=self.lane,
        )  # fmt: skip
        if resp.success:
            done.update({k: e.version for k, e in chunk.items()})
            self._refused.pop(device, None)
            return len(chunk)
        if resp.code >> 5 != 4:  # 5.xx: the cloud cannot now
            raise SyncError(f"PUT {uri}: {resp.dotted}")
        if resp.dotted in STATE_RETRY_LATER:
            self._say_refused(device, chunk, resp, "retry_next_pass")
            return None
        split = resp.dotted == "4.00" and len(chunk) > 1
        if not split:  # sent as it is it would be refused again: it goes when it changes
            self._say_refused(device, chunk, resp, "not_sent")
            done.update({k: e.version for k, e in chunk.items()})
            return 0
        if not splitting:
            self._say_refused(device, chunk, resp, "split")
        a, b = halves(chunk)
        took = await self._put_reported(device, uri, a, done, True)
        more = None if took is None else await self._put_reported(device, uri, b, done, True)
        return None if took is None or more is None else took + more

    def _say_refused(
        self, device: str, chunk: dict[str, statedoc.Entry], resp: Response, action: str
    ) -> None:
        """One line per device, answer and versions (a refusal tried again each pass is said
        once): a warning when the keys are sent again, an error when they are not."""
        said = (resp.dotted, tuple((k, e.version) for k, e in chunk.items()))
        if self._refused.get(device) == said:
            return
        self._refused[device] = said
        log.log(
            logging.ERROR if action == "not_sent" else logging.WARNING,
            "event=relay_reported_refused device=%s code=%s keys=%s action=%s reason=%r",
            device, resp.dotted, ",".join(chunk), action,
            resp.payload[:200].decode("utf-8", "replace"),
        )  # fmt: skip

    # -- desired: cloud -> gateway -------------------------------------------------------------
    async def desired_once(self) -> int:
        """Read each device's desired document from the cloud; mirror those that changed. A
        device the cloud refuses (4.xx: not attached to this gateway, not registered), or whose
        document assigns a model or release the cloud does not serve (ModelError), costs no
        other device: said once, not mirrored, tried again next round. A 5.xx or no answer ends
        the pass (SyncError: it is tried again)."""
        changed = 0
        for device in self.devices():
            try:
                changed += await self._desired_of(device)
            except ModelError as err:
                self._say_desired_refused(device, "-", str(err))
        return changed

    async def _desired_of(self, device: str) -> int:
        """1 if ``device``'s document changed and was mirrored, else 0."""
        uri = f"{self.base()}/state/{device}/desired"
        mirrored = self._mirrored.get(device)
        resp = await self.transport.request(
            "GET", uri, accept=CF_CBOR, deadline=REQUEST_DEADLINE, lane=self.lane,
            etags=(mirrored,) if mirrored else (),
        )  # fmt: skip
        if resp.dotted == "2.03":  # Valid: the document mirrored is the cloud's
            return 0
        if resp.code >> 5 == 4:  # who asks, not the link: the other devices go on
            reason = resp.payload[:200].decode("utf-8", "replace")
            self._say_desired_refused(device, resp.dotted, reason)
            return 0
        if not resp.success:
            raise SyncError(f"GET {uri}: {resp.dotted}")
        try:
            doc = DesiredDoc.from_cbor(resp.payload)
        except StateError as err:
            self._say_desired_refused(device, resp.dotted, str(err))
            return 0
        if self._mirrored.get(device) == doc.etag():
            return 0
        await self._models_of(doc)  # before the devices see the assignment
        if self.releases is not None:
            await self.releases(doc)
        await self.on_desired(device, doc)  # in the store: the ETag is mirrored only then
        self._mirrored[device] = doc.etag()
        self._desired_refused.pop(device, None)
        return 1

    def _say_desired_refused(self, device: str, code: str, reason: str) -> None:
        """Once per device and refusal (it is tried again each round)."""
        if self._desired_refused.get(device) == (code, reason):
            return
        self._desired_refused[device] = (code, reason)
        log.warning(
            "event=relay_desired_refused device=%s code=%s action=retry_next_pass reason=%r",
            device, code, reason[:200],
        )  # fmt: skip

    async def _models_of(self, doc: DesiredDoc) -> None:
        for key, entry in doc.entries.items():
            value = entry.value
            if not key.startswith("model/") or not isinstance(value, dict):
                continue
            name, version = value.get("name"), value.get("version")
            if not isinstance(name, str) or not isinstance(version, str):
                continue  # "the newest": devices ask the registry's listing
            if await self.has_model(name, version):
                continue
            await self.fetch_model(name, version)

    async def fetch_model(self, name: str, version: str) -> None:
        """One download of a version from the cloud into the gateway's registry, resumed from
        its partial in ``scratch`` (agent/gateway/modelparts.py)."""
        manifest = await self.fetcher.manifest(name, version)
        part, data = await modelparts.download(self.fetcher, manifest, self.scratch)
        stored = await self.put_model(name, version, manifest.to_cbor(), data)
        await asyncio.to_thread(modelparts.done, part)
        if stored:
            key = (name, version)
            self.model_fetches[key] = self.model_fetches.get(key, 0) + 1
            log.info(
                "event=gateway_model_cached name=%s version=%s bytes=%d", name, version, len(data)
            )


def mirror_desired(s: Any, device: str, doc: DesiredDoc, now: float) -> DesiredDoc:
    """Make the gateway's stored desired document of ``device`` the cloud's ``doc``: the same
    keys, versions, revision and blocked versions (SQLite storage of the gateway; one
    transaction). The document the gateway then serves is ``doc`` (its storage has the cloud's
    identity, so ``store`` is the same too)."""
    with s._tx() as db:
        db.execute("DELETE FROM desired WHERE device = ?", (device,))
        for key, entry in doc.entries.items():
            db.execute(
                "INSERT INTO desired (device, key, version, value, updated, blocked)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    device,
                    key,
                    entry.version,
                    statedoc.encode_value(entry.value),
                    now,
                    doc.blocked.get(key),
                ),
            )
        db.execute("UPDATE devices SET desired_rev = ? WHERE id = ?", (doc.rev, device))
    return s.desired(device)


#: What a gateway loop expects of the cloud, the network and the disk: said once per outage by
#: :func:`run_every` and tried again at the next round
RETRIED = (SyncError, ModelError, StateError, OSError)


async def run_every(
    seconds: float,
    work: Callable[[], Awaitable[Any]],
    what: str,
    sleep: Callable[[float], Awaitable[None]],
    beat: Callable[[], None] | None = None,
) -> None:
    """``work()`` every ``seconds`` (``sleep``: the clock's); a failure of :data:`RETRIED` is
    logged (once per outage) and retried. Anything else (a store that fails to read, a bug) is
    raised: the gateway's stage supervisor says it and restarts the loop
    (agent/gateway/service.py). ``beat()`` after each round: a round that never ends (a hung
    store or lock) stops the beats, and the supervisor's health counts the loop stuck."""
    failing = False
    while True:
        try:
            await work()
        except RETRIED as err:
            if not failing:
                log.warning("event=gateway_upstream_failed what=%s error=%r", what, str(err))
            failing = True
        else:
            if failing:
                log.info("event=gateway_upstream_ok what=%s", what)
            failing = False
        if beat is not None:
            beat()
        await sleep(seconds)

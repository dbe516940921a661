"""Records the endpoint refuses, the uplink's side (a mixin of :class:`agent.sync.uplink.Uplink`).

After a 4.00 to a batch, its records go one by one; a record refused alone (4.00, 4.13, or one
the encoder refuses) is held back (leased) while the next ones go. It is *set aside*
(:meth:`agent.store.queue.Store.set_aside`: written to ``DATA/rejected/`` before it leaves the
queue) only when a record sent alone after it is stored, i.e. when the refusal is isolated. When
:data:`REFUSALS_IN_ROW` are refused one after another, or every record of the round is, the
endpoint is what is broken: every record stays queued and the uplink backs off. A failure or a
pause within a round calls it off: its held records go back to the queue, none is set aside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from agent.errors import StoreError
from agent.store.queue import Record, Store

log = logging.getLogger("agent.sync.uplink")

#: Records sent alone and refused one after another, none stored in between, after which the
#: endpoint (not the records) is taken as broken: they all stay queued and the uplink backs off.
REFUSALS_IN_ROW = 8
#: Records sent alone after one refused alone outside a split batch (4.13 at one record), to tell
#: a record no endpoint takes from an endpoint that takes nothing.
PROBE_SINGLES = 8


@dataclass
class _Round:
    """Records sent one by one after a refusal, to tell a bad record from a broken endpoint."""

    uri: str
    left: int  # records still to send alone in this round
    accepted: int = 0  # of them stored by the endpoint
    in_row: int = 0  # refused one after another since the last one stored
    held: dict[int, tuple[Record, str]] = field(default_factory=dict)  # refused: kept leased


class RefusedRecords:
    """The rounds of single records after a refusal. The uplink provides ``store``, ``stats``,
    ``_nack`` and ``_failed``."""

    store: Store
    stats: Any
    _nack: Any
    _failed: Any

    def _init_refusals(self) -> None:
        self._round: _Round | None = None  # after a refusal: records go one by one
        self._release: list[int] = []  # records a round held when it was called off
        self._refusing = False  # the endpoint refused every record sent alone (said once)
        self._aside_failing = False  # refused records could not be set aside (said once)

    def _call_off_round(self) -> None:
        """A failure or a pause within a round: what its records said is stale (their leases may
        run out meanwhile and a held record be sent again, stored, and then set aside as
        refused). Its held records go back to the queue, none is set aside; a record the
        endpoint still refuses starts a new round."""
        r, self._round = self._round, None
        if r is not None:
            self._release += list(r.held)
            r.held = {}

    async def _refused(self, batch: list[Record], answer: str, uri: str) -> None:
        """The endpoint (or the encoder) refused ``batch``: a batch goes again one record at a
        time; a record refused alone is held until the next ones tell whether it is the record
        or the endpoint."""
        if len(batch) > 1:
            await self._nack([r.seq for r in batch])
            if self._round is None:
                self._round = _Round(uri, left=len(batch))
                log.error(
                    "event=batch_refused endpoint=%s records=%d answer=%r action=send_singly",
                    uri,
                    len(batch),
                    answer,
                )
            return
        (rec,) = batch
        r = self._round
        if r is None:  # refused alone outside a split: test it against the next records
            r = self._round = _Round(uri, left=PROBE_SINGLES)
        r.held[rec.seq] = (rec, answer)  # stays leased: the next single is another record
        r.in_row += 1
        if r.in_row >= REFUSALS_IN_ROW:
            await self._trip(r)
        else:
            await self._single_answered(r, stored=False)

    async def _single_answered(self, r: _Round, *, stored: bool) -> None:
        r.left -= 1
        if stored:
            r.accepted += 1
            r.in_row = 0
            await self._set_aside(r)  # refused, then one stored after them: isolated
        if r.left <= 0 and self._round is r:
            await self._end_round(r)

    async def _end_round(self, r: _Round) -> None:
        if r.held and not r.accepted:
            await self._trip(r)
            return
        await self._set_aside(r)
        if self._round is r:
            self._round = None

    async def _trip(self, r: _Round) -> None:
        """Every record sent alone was refused: the endpoint is broken, not the records."""
        if self._round is r:
            self._round = None
        held, r.held = r.held, {}
        answer = next(iter(held.values()))[1] if held else "?"
        (log.debug if self._refusing else log.error)(
            "event=endpoint_refuses_all endpoint=%s refused_in_row=%d answer=%r "
            "action=kept_records,backoff: the endpoint refuses every record sent alone; check "
            "its release and its log",
            r.uri,
            len(held),
            answer,
        )
        self._refusing = True
        await self._nack(list(held))
        self._failed(r.uri, f"endpoint refuses every record ({answer})", False)

    async def _set_aside(self, r: _Round) -> None:
        """Move the held records to the set-aside area (never deleted without a copy)."""
        held, r.held = list(r.held.values()), {}  # taken at once: other lanes answer meanwhile
        for i, (rec, answer) in enumerate(held):
            try:
                await self.store.set_aside([rec], answer)
            except StoreError as err:
                (log.debug if self._aside_failing else log.error)(
                    "event=set_aside_failed endpoint=%s records=%d error=%r "
                    "action=kept_in_queue,backoff",
                    r.uri,
                    len(held) - i,
                    str(err),
                )
                self._aside_failing = True  # said once, until a record is set aside again
                await self._nack([kept.seq for kept, _ in held[i:]])
                if self._round is r:
                    self._round = None
                self._failed(r.uri, f"refused records not set aside: {err}", False)
                return
            self.stats.records_rejected += 1
            self._aside_failing = False
            log.error(
                "event=record_rejected seq=%d kind=%s bytes=%d answer=%r action=set_aside "
                "dir=%s: read the file, fix the cause, put the record back if needed",
                rec.seq,
                rec.kind,
                len(rec.payload),
                answer,
                self.store.settings.set_aside_path,
            )

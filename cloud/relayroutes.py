"""The endpoint's side of gateways (docs/protocol.md "Gateways", docs/security.md): the
multi-device ingest resource ``POST /relay/<gateway>`` and the attachments of devices to
gateways. A mixin of :class:`cloud.server.CloudServer`, whose ``_render`` dispatches to
``_<route>_<method>``.

``/relay`` takes a CBOR array of ``[device, content-format, batch]`` (agent/wire/relay.py) from
the gateway it names (security.py ACCESS: "gateway"), and answers each entry as
``POST /ingest/<device>`` would have, had the gateway posted it: the entry is authorised for
that device (``allowed("ingest", "POST", device, gateway, relays)``: the device is attached to
this gateway, else 4.03), decoded and checked by the same code (``_decode_batch``: content
format, size, records, the device the batch names), and stored through the same group commit
(``_store_batch``), so the dedup by (device, seq), the features records and the ack are those of
``/ingest``. Every entry of one request is queued before the group commit runs, so they are
committed together (in request order). A refused entry is ``[code, message]`` in the answer and
the others go on; only a body that is not an array of entries is refused whole (4.00, 4.13). An
entry over its device's rate limit (cloud/ratelimit.py, counted per entry against that device's
bucket) is ``[163, message, max-age]``: the gateway keeps it and sends it again after max-age.

The map of attachments (device -> gateway) is kept in memory, for authorising every request
without the storage; it is read again whenever credentials are (``reload_principals``: at start,
after a change through this server, and when the poller of cloud/desired.py notices another
process's commit), so ``edge-agent-cloud gateways attach`` takes effect on a running endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiocoap import Message
from aiocoap.numbers.codes import Code

from agent.wire.batch import CF_CBOR, IngestAck, WireRecord
from agent.wire.relay import (
    RelayError,
    RelayRefusal,
    RelayResult,
    RelayTooLarge,
    decode_relay,
    encode_relay_answer,
)
from cloud.protocol import _Failure, _Route
from cloud.security import Principal, allowed, identity

if TYPE_CHECKING:
    from cloud.storage import Storage
    from drivers.clock import Clock

log = logging.getLogger("cloud.server")


class RelayRoutes:
    """``/relay`` and the gateway attachments (see the module docstring)."""

    clock: Clock
    relays: dict[str, str]
    limits: Any

    async def db(self, fn: Callable[[Storage], Any]) -> Any:
        raise NotImplementedError

    async def reload_principals(self) -> None:
        raise NotImplementedError

    async def _registered(self, device: str) -> str:
        raise NotImplementedError

    def _payload(self, request: Message, formats: Any, limit: int) -> bytes:
        raise NotImplementedError

    def _decode_batch(
        self, device: str, cf: int | None, payload: bytes, readings: int | None = None
    ) -> tuple[list[WireRecord], int]:
        raise NotImplementedError

    async def _store_batch(self, device: str, records: list[WireRecord]) -> IngestAck:
        raise NotImplementedError

    def _may_warn(self) -> bool:
        raise NotImplementedError

    # -- attachments -----------------------------------------------------------------------------

    async def attach(self, gateway: str, devices: Sequence[str]) -> dict[str, str | None]:
        """Put registered ``devices`` behind ``gateway`` (cloud/relaystore.py); in effect when
        this returns. The gateway each device was behind before (None: none)."""
        now = self.clock.time()
        before: dict[str, str | None] = await self.db(
            lambda s: s.attach(gateway, list(devices), now)
        )
        await self.reload_principals()
        log.info("event=devices_attached gateway=%s devices=%s", gateway, ",".join(devices))
        return before

    async def detach(self, devices: Sequence[str]) -> dict[str, str]:
        """Take ``devices`` from behind their gateways; the gateway each was behind."""
        gone: dict[str, str] = await self.db(lambda s: s.detach(list(devices)))
        await self.reload_principals()
        if gone:
            log.info("event=devices_detached devices=%s", ",".join(gone))
        return gone

    # -- POST /relay/<gateway> -------------------------------------------------------------------

    async def _relay_post(self, request: Message, route: _Route) -> Message:
        gateway = route.device
        assert gateway is not None
        body = self._payload(request, (CF_CBOR,), self.limits.relay_bytes)
        try:
            entries = decode_relay(body)
        except RelayTooLarge as err:
            raise _Failure(Code.REQUEST_ENTITY_TOO_LARGE, str(err)) from None
        except RelayError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        # unauthenticated only on an --insecure endpoint: as if from the gateway in the path
        who = identity(request) or Principal(gateway, "gateway")
        results: list[RelayResult | None] = [None] * len(entries)
        decoded: list[tuple[int, str, list[WireRecord]]] = []
        budget, readings = self.limits.relay_records, self.limits.relay_readings
        for i, entry in enumerate(entries):
            try:
                if allowed("ingest", "POST", entry.device, who, self.relays):
                    name = entry.device[:64]  # whatever text it is: the answer stays short
                    raise _Failure(
                        Code.FORBIDDEN, f"{name} is not attached to {gateway} (or is revoked)"
                    )
                device = await self._registered(entry.device)
                # the readings left are checked from the headers, before any is expanded
                batch, claimed = self._decode_batch(
                    device, entry.content_format, entry.batch, readings
                )
                if len(batch) > budget:
                    raise _Failure(
                        Code.REQUEST_ENTITY_TOO_LARGE,
                        f"a relay request holds at most {self.limits.relay_records} records",
                    )
                budget -= len(batch)
                readings -= claimed
                decoded.append((i, device, batch))
            except _Failure as failure:
                results[i] = self._refused(gateway, entry.device, failure)
        # every batch queued before the group commit runs: one transaction for the request
        stored = await asyncio.gather(
            *(self._store_batch(device, batch) for _, device, batch in decoded),
            return_exceptions=True,
        )
        for (i, device, _), outcome in zip(decoded, stored, strict=True):
            if isinstance(outcome, _Failure):
                results[i] = self._refused(gateway, device, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome  # storage unavailable (5.03), or a bug (5.00)
            else:
                results[i] = outcome
        log.debug(
            "event=relay gateway=%s entries=%d stored=%d", gateway, len(entries), len(decoded)
        )
        answer = encode_relay_answer([r for r in results if r is not None])
        return Message(code=Code.CHANGED, payload=answer, content_format=CF_CBOR)

    def _refused(self, gateway: str, device: str, failure: _Failure) -> RelayRefusal:
        """An entry's refusal, logged like a bad request (rate limited); one over the device's
        rate limit (cloud/ratelimit.py) is said by the limiter and carries its Max-Age."""
        if failure.warn and self._may_warn():
            log.warning(
                "event=relay_entry_refused gateway=%s device=%r code=%s reason=%r",
                gateway,
                device[:64],
                failure.code,
                failure.message[:200],
            )
        return RelayRefusal(int(failure.code), failure.message, failure.options.get("max_age"))

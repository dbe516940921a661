"""Federated learning for the devices behind a gateway (docs/gateway.md, docs/learning.md).

A device behind a gateway gets its round task through the desired state the gateway mirrors, and
asks the gateway for the round's weights and takes its upload there, as it would the cloud. The
gateway holds no job: its server (cloud/server.py) hands both exchanges to :class:`LearnRelay`:

- ``GET /learn/masters/<sha256>``: answered from the weights the gateway holds in memory (the
  most recent :data:`MASTERS_KEPT`, by SHA-256); others are fetched from the cloud once, however
  many devices ask at the same time, and kept only if their SHA-256 is the one asked for (the
  name is the content: the gateway cannot serve other weights under it, and devices check it
  again). A device whose fetch takes longer than :data:`MASTERS_WAIT` is answered 5.03 and asks
  again; the fetch goes on.
- ``POST /learn/<device>``: the upload goes to the cloud as it came, under the device's name (the
  cloud lets a gateway act for the devices attached to it), and the device gets the cloud's
  answer: 2.04, or the cloud's refusal (4.00, 4.03, 4.04 with its reason), or 5.03 when the cloud
  did not answer, after which the device sends it again, as it would to the cloud. Nothing is
  kept on the gateway: the device keeps its update until an endpoint answered, and the cloud
  stores one upload per device and round. One upload of a device at a time: another from it
  while the first is with the cloud is answered 5.03 at once (a device has one update to send;
  one that floods the gateway takes one of the :data:`MAX_IN_FLIGHT` exchanges, not all).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from agent.errors import SyncError
from agent.sync.transport import CoapTransport, Response
from agent.wire.batch import CF_CBOR
from agent.wire.learning import MAX_MASTERS_BYTES, REFUSALS

log = logging.getLogger("agent.gateway.learn")

# Timing (seconds); tests may shorten them.
UPSTREAM_DEADLINE = 30.0  # one exchange with the cloud (a device waits 60 s for its answer)
MASTERS_WAIT = 10.0  # a device's GET waits this long for a fetch, then is answered 5.03
MASTERS_KEPT = 8  # weights kept in memory (a round's masters and incumbent, for a few models)
#: exchanges with the cloud at once, of all devices: more are answered 5.03 at once (a device
#: that floods the gateway with uploads or unknown names cannot queue up work without end)
MAX_IN_FLIGHT = 16

#: What the gateway's server answers: a CoAP code ("2.05", "4.04", "5.03", ...) and the payload
#: (the weights, or the reason).
Answer = tuple[str, bytes]
UNAVAILABLE = "5.03"
#: The cloud's refusals of a round's exchange, passed on: the device gives the round up (any other
#: answer, 4.01 of the gateway's own security context included, is the gateway's to sort out).
PASSED_ON = REFUSALS
NO_ANSWER = (UNAVAILABLE, b"the cloud did not answer")
BUSY = (UNAVAILABLE, b"the gateway is busy with other learning exchanges")
UPLOADING = (UNAVAILABLE, b"an upload of this device is with the cloud")
CLOSED = (UNAVAILABLE, b"the gateway is stopping")


class LearnRelay:
    """The learning exchanges of a gateway's devices, passed to the cloud (module docstring)."""

    def __init__(
        self, transport: CoapTransport, endpoint: Callable[[], str], lanes: int = 1
    ) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.lanes = lanes
        self._kept: OrderedDict[str, bytes] = OrderedDict()
        self._fetching: dict[str, asyncio.Task[Answer]] = {}
        self._next_lane = 0
        self.fetches = 0  # weights fetched from the cloud (each SHA-256 once while kept)
        self.uploads = 0  # uploads the cloud took
        self.in_flight = 0  # exchanges with the cloud under way
        self._uploading: set[str] = set()  # devices whose upload is with the cloud
        self._failing: str | None = None  # the cloud's last answer that was not one to pass on
        self._closed = False

    async def close(self) -> None:
        """End the fetches still under way (a device that timed out left them running), before
        the transport they use is closed: none is left pending, or opens a new client context
        on the closed transport for its next block; exchanges asked for after this get 5.03."""
        self._closed = True
        tasks = list(self._fetching.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _lane(self) -> int:
        self._next_lane = (self._next_lane + 1) % self.lanes
        return self._next_lane

    async def masters(self, sha256: str) -> Answer:
        """The weights named ``sha256`` (lower-case hex, checked by the server), or why not."""
        blob = self._kept.get(sha256)
        if blob is not None:
            self._kept.move_to_end(sha256)
            return "2.05", blob
        task = self._fetching.get(sha256)
        if task is None:
            if self._closed:
                return CLOSED
            if self.in_flight >= MAX_IN_FLIGHT:
                return BUSY
            task = asyncio.ensure_future(self._fetch(sha256))
            self._fetching[sha256] = task
            self.in_flight += 1
            task.add_done_callback(lambda _: self._fetched(sha256))
        try:
            return await asyncio.wait_for(asyncio.shield(task), MASTERS_WAIT)
        except TimeoutError:
            return UNAVAILABLE, b"fetching the masters from the cloud"

    def _fetched(self, sha256: str) -> None:
        self._fetching.pop(sha256, None)
        self.in_flight -= 1

    async def _ask(self, what: str, method: str, path: str, **kw: Any) -> Response | None:
        """One exchange with the cloud; None when it did not answer."""
        try:
            return await self.transport.request(
                method,
                f"{self.endpoint()}{path}",
                deadline=UPSTREAM_DEADLINE,
                lane=self._lane(),
                **kw,
            )
        except SyncError as err:
            log.info("event=gateway_learn_failed what=%s error=%r", what, str(err))
            return None

    async def _fetch(self, sha256: str) -> Answer:
        resp = await self._ask(
            "masters", "GET", f"/learn/masters/{sha256}", accept=CF_CBOR, max_body=MAX_MASTERS_BYTES
        )
        if resp is None:
            return NO_ANSWER
        if not resp.success:
            return self._refusal(resp, "masters")
        if hashlib.sha256(resp.payload).hexdigest() != sha256:
            log.warning("event=gateway_learn_masters_mismatch sha256=%s", sha256)
            return UNAVAILABLE, b"the cloud sent other weights"
        self.fetches += 1
        self._failing = None
        self._kept[sha256] = resp.payload
        while len(self._kept) > MASTERS_KEPT:
            self._kept.popitem(last=False)
        return "2.05", resp.payload

    async def upload(self, device: str, body: bytes) -> Answer:
        """``device``'s upload sent to the cloud; the cloud's answer, or 5.03."""
        if self._closed:
            return CLOSED
        if device in self._uploading:
            return UPLOADING
        if self.in_flight >= MAX_IN_FLIGHT:
            return BUSY
        self.in_flight += 1
        self._uploading.add(device)
        try:
            resp = await self._ask(
                "upload", "POST", f"/learn/{device}", payload=body, content_format=CF_CBOR
            )
        finally:
            self.in_flight -= 1
            self._uploading.discard(device)
        if resp is None:
            return NO_ANSWER
        if resp.success:
            self.uploads += 1
            self._failing = None
            log.info("event=gateway_learn_upload device=%s bytes=%d", device, len(body))
            return "2.04", b""
        return self._refusal(resp, "upload")

    def _refusal(self, resp: Response, what: str) -> Answer:
        """The cloud's refusal passed on (its reason too, for the device's report); anything
        else: the device asks again later (said as a warning once while the answer stays)."""
        if resp.dotted in PASSED_ON:
            log.info("event=gateway_learn_refused what=%s code=%s", what, resp.dotted)
            return resp.dotted, resp.payload[:200]
        level = logging.WARNING if self._failing != resp.dotted else logging.DEBUG
        self._failing = resp.dotted
        log.log(level, "event=gateway_learn_failed what=%s code=%s", what, resp.dotted)
        return UNAVAILABLE, f"the cloud answered {resp.dotted}".encode()

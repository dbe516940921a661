"""Desired state at the endpoint: who observes it, when they are notified, and how a document
is served (docs/protocol.md "Desired state").

- :class:`DesiredObservers` keeps the observations of each device's desired state (registered
  through aiocoap's public observation API: ``add_observation``, ``accept``, ``trigger``), and
  runs the poller that notices desired state written by another process (``edge-agent-cloud
  desired set --data``, another endpoint process on the same storage, a credential change:
  :meth:`cloud.storage.Storage.changes`, PostgreSQL's LISTEN/NOTIFY) and re-sends every
  document before its Max-Age runs out. Nothing a device, an operator or the database holds
  stops the poller: a round that fails is logged and the next one runs.
- :func:`render_document` answers a GET (or renders a notification) with the document, its ETag
  and Max-Age, block-wise when it is larger than one block (RFC 7959): block 0 carries Block2
  and Size2, and the client (aiocoap does this for notifications too) fetches the other blocks
  with GETs, which are answered from the document rendered again (stateless; the ETag tells the
  client if it changed meanwhile). aiocoap 0.4.17's own observation loop sends a notification
  whole, whatever its size, so a large document would arrive truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiocoap import Message
from aiocoap.numbers.codes import Code

from agent.wire.batch import CF_CBOR
from agent.wire.statedoc import DesiredDoc
from cloud.protocol import _Failure
from cloud.storage import Storage, StorageUnavailable
from drivers.clock import Clock

log = logging.getLogger(__name__)

T = TypeVar("T")

# Timing (seconds); tests may shorten them.
DESIRED_MAX_AGE = 300  # Max-Age of desired state; observers are refreshed before it runs out
DESIRED_REFRESH = 240.0
POLL_INTERVAL = 1.0  # how often to look for desired state written by another process
#: Block size exponent when the client names none (RFC 7959: 2**(6+4) = 1024 bytes; 7, BERT,
#: is for reliable transports only).
MAX_SZX = 6


def render_document(request: Message, doc: DesiredDoc) -> Message:
    """The answer to a GET of desired state: 2.03 Valid for the current ETag, else 2.05 with the
    document (the block the request asks for, or block 0 when it is larger than one)."""
    etag = doc.etag()
    if etag in request.opt.etags:
        response = Message(code=Code.VALID)
    else:
        response = Message(code=Code.CONTENT, payload=doc.to_cbor(), content_format=CF_CBOR)
    response.opt.etag = etag
    response.opt.max_age = DESIRED_MAX_AGE
    return blockwise(request, response)


def blockwise(request: Message, response: Message) -> Message:
    """``response`` as the block of it that ``request`` asks for (RFC 7959 section 2.4), or
    block 0 of it when it is larger than the peer's payload size; the whole of it otherwise."""
    payload = response.payload
    block2 = request.opt.block2
    remote = request.remote
    limit = int(getattr(remote, "maximum_payload_size", 1024))
    szx = min(int(getattr(remote, "maximum_block_size_exp", MAX_SZX)), MAX_SZX)
    if not response.code.is_successful() or (block2 is None and len(payload) <= limit):
        return response
    number = 0
    if block2 is not None:
        number, szx = block2.block_number, min(block2.size_exponent, szx)
    size = 1 << (szx + 4)
    start = number * size
    if start >= len(payload) and number > 0:
        raise _Failure(Code.BAD_REQUEST, f"block {number} is past the end ({len(payload)} bytes)")
    more = start + size < len(payload)
    out = response.copy(payload=payload[start : start + size], block2=(number, more, szx))
    if number == 0 and more:
        out.opt.size2 = len(payload)
    return out


def _nothing() -> None:
    """The end of an observation that was never one."""


def _end(servobs: Any) -> None:
    """End an observation whose first answer was sent: its last notification (the document, no
    Observe option), after which aiocoap ends it (and calls its cancellation callback). Not
    ``deregister()``, which aiocoap 0.4.17 ignores once the first answer went: the observation
    would stay open, heard of no more, for as long as the endpoint runs."""
    with contextlib.suppress(Exception):  # aiocoap's own bookkeeping; never fatal here
        servobs.trigger(is_last=True)


class DesiredObservers:
    """The observations of each device's desired state, and the poller (module docstring).

    ``db(fn)`` runs ``fn(storage)`` on the storage thread; ``credentials_changed()`` is awaited
    when the database was changed by another process (it may have been a credential)."""

    def __init__(
        self,
        db: Callable[[Callable[[Storage], Any]], Awaitable[Any]],
        clock: Clock,
        credentials_changed: Callable[[], Awaitable[None]],
    ) -> None:
        self._db = db
        self._clock = clock
        self._credentials_changed = credentials_changed
        self._observers: dict[str, dict[str | None, Any]] = {}  # device -> owner -> observation
        self._etags: dict[str, bytes] = {}  # the ETag observers of each device saw last
        self._task: asyncio.Task[None] | None = None
        self._failure: str | None = None  # the last poll failure logged (logged once)

    # -- observations ----------------------------------------------------------------------------

    def add(self, device: str, servobs: Any, owner: str | None = None) -> None:
        """Accept an observation (aiocoap's ServerObservation) of ``device``'s desired state by
        ``owner`` (the principal asking; None: unauthenticated, on an endpoint that takes plain
        CoAP).

        An owner observes a device's desired state once: a new registration (after a lost
        notification, a Max-Age renewal, an endpoint switch) replaces the owner's older one,
        which is ended with a last notification (:func:`_end`). Kept, they would pile up, and
        notifications would go to tokens the device has given up (it acknowledges them and waits
        for the new one in vain until its next renewal). Another principal's observation of the
        same document (an operator's, the device's own beside its gateway's) is left alone."""
        observers = self._observers.setdefault(device, {})
        older = observers.get(owner)
        observers[owner] = servobs
        if older is not None:
            _end(older)

        def cancelled() -> None:
            if observers.get(owner) is servobs:
                del observers[owner]
            if not observers and self._observers.get(device) is observers:
                del self._observers[device]

        servobs.accept(cancelled)
        log.debug("event=observe device=%s observers=%d", device, len(observers))

    @staticmethod
    def refuse(servobs: Any) -> None:
        """Turn down an Observe request: it is answered once, as a plain request. aiocoap 0.4.17
        calls the callback given to ``accept`` at the end of every Observe request, accepted or
        not (an AttributeError and a traceback if there is none), so it is accepted and then
        deregistered before the answer is sent (public API only)."""
        servobs.accept(_nothing)
        servobs.deregister()

    def count(self, device: str) -> int:
        return len(self._observers.get(device, ()))

    def seen(self, device: str, etag: bytes) -> None:
        """The document with ``etag`` was just rendered for ``device`` (an answer or a
        notification): a change to it notifies, the same document again does not."""
        self._etags[device] = etag

    def changed(self, device: str, etag: bytes) -> None:
        """``device``'s document now has ``etag``: notify its observers if it is new to them."""
        if self._etags.get(device) == etag:
            return
        self._etags[device] = etag
        for servobs in list(self._observers.get(device, {}).values()):
            servobs.trigger()

    # -- the poller ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cloud-desired-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._observers.clear()

    @property
    def running(self) -> bool:
        """The poller runs (it only ends when stopped)."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        """Notice desired state written by another process, and refresh observers."""
        token: object | None = None
        last_refresh = self._clock.monotonic()
        while True:
            await self._clock.sleep(POLL_INTERVAL)
            try:
                token = await self._poll(token)
            except StorageUnavailable as err:
                log.debug("event=poll_failed error=%s", err)
            except Exception as err:  # whatever it was, the next round runs
                self._failed("-", err)
            if self._clock.monotonic() - last_refresh >= DESIRED_REFRESH:
                last_refresh = self._clock.monotonic()
                for observers in list(self._observers.values()):
                    for servobs in list(observers.values()):
                        servobs.trigger()

    async def _poll(self, token: object | None) -> object:
        """One round: what changed since ``token`` (:meth:`cloud.storage.Storage.changes`:
        the devices named, or all when the storage cannot tell) is read again and notified."""
        new, devices, credentials = await self._db(lambda s: s.changes(token))
        if token is None:  # the first round: whatever was observed or loaded before it (the
            devices, credentials = None, True  # principals, at start) is read again
        if credentials:
            await self._credentials_changed()  # registered or revoked by the command line
        observed = list(self._observers)
        if devices is not None:
            observed = [d for d in observed if d in devices]
        clean = True
        for device in observed:
            try:
                doc: DesiredDoc = await self._db(lambda s, d=device: s.desired(d))
            except StorageUnavailable:
                raise
            except Exception as err:  # one device's document never stops the others'
                self._failed(device, err)
                clean = False
                continue
            self.changed(device, doc.etag())
        if clean:
            self._failure = None
        return new

    def _failed(self, device: str, err: Exception) -> None:
        text = f"{type(err).__name__}: {err}"[:200]
        if text != self._failure:
            self._failure = text
            log.error("event=desired_poll_failed device=%s error=%r", device, text)

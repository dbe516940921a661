"""The endpoint's resources that compute or train rather than store: validation inference
(``/infer``, ``/validate``: cloud/inference.py) and federated learning (``/learn/<device>``,
``/learn/masters/<sha256>``: cloud/learning.py). A mixin of :class:`cloud.server.CloudServer`,
whose ``_render`` dispatches to ``_<route>_<method>``."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiocoap import Message
from aiocoap.numbers.codes import Code

from agent.errors import ModelError
from agent.wire import records
from agent.wire.batch import CF_CBOR
from agent.wire.learning import MAX_BODY_BYTES
from agent.wire.statedoc import SHA256_HEX
from cloud.desired import blockwise
from cloud.inference import (
    CloudInference,
    InferenceBusy,
    InferenceError,
    InferRequest,
    NoSuchModel,
    ValidateRequest,
)
from cloud.learnuploads import UploadRefused, accept_upload
from cloud.protocol import RETRY_AFTER, _Failure, _Route

if TYPE_CHECKING:
    from cloud.storage import Storage
    from drivers.clock import Clock

log = logging.getLogger("cloud.server")

#: Masters kept in memory for their blocks (a round's and its check's, with room): each is read
#: from the storage once, not at every block.
MASTERS_KEPT = 4

_REFUSALS = {"4.00": Code.BAD_REQUEST, "4.03": Code.FORBIDDEN, "4.04": Code.NOT_FOUND}


class RouteHost:
    """What a mixin of route handlers uses of :class:`cloud.server.CloudServer` (the mixins
    here, cloud/relayroutes.py, cloud/logroutes.py)."""

    clock: Clock

    async def _device(self, route: _Route) -> str:
        raise NotImplementedError

    def _payload(self, request: Message, formats: Any, limit: int) -> bytes:
        raise NotImplementedError

    async def db(self, fn: Callable[[Storage], Any]) -> Any:
        raise NotImplementedError


class LearnUpstream(Protocol):
    """Where a gateway's server sends its devices' learning exchanges (agent/gateway/learnrelay.py):
    each returns the answer's code ("2.05", "4.04", "5.03", ...) and payload."""

    async def masters(self, sha256: str) -> tuple[str, bytes]: ...

    async def upload(self, device: str, body: bytes) -> tuple[str, bytes]: ...


def _answer(answer: tuple[str, bytes], success: Code) -> Message:
    code, payload = answer
    if code.startswith("2."):
        return Message(code=success, payload=payload, content_format=CF_CBOR if payload else None)
    if code in _REFUSALS:
        raise _Failure(_REFUSALS[code], payload.decode("utf-8", "replace"))
    raise _Failure(
        Code.SERVICE_UNAVAILABLE, payload.decode("utf-8", "replace"), max_age=RETRY_AFTER
    )


class ComputeRoutes(RouteHost):
    """Handlers of the computing resources (see the module docstring)."""

    inference: CloudInference
    #: a gateway's server: its devices' rounds are the cloud's (None: this endpoint's own)
    learn_upstream: LearnUpstream | None = None
    _masters_kept: dict[str, bytes] | None = None  # sha256 -> masters, the most recent last

    async def _inference_body(self, request: Message) -> Any:
        payload = self._payload(request, (CF_CBOR,), self.limits.state_bytes)
        try:
            return records.loads(payload)
        except records.RecordError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None

    async def _run_inference(self, work: Awaitable[dict[str, Any]]) -> Message:
        try:
            result = await work
        except NoSuchModel as err:
            raise _Failure(Code.NOT_FOUND, str(err)) from None
        except InferenceBusy as err:  # the device sends it again after Max-Age
            raise _Failure(Code.SERVICE_UNAVAILABLE, str(err), max_age=RETRY_AFTER) from None
        except InferenceError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        except ModelError as err:
            log.error("event=model_unavailable error=%s", err)
            raise _Failure(
                Code.SERVICE_UNAVAILABLE, "model unavailable", max_age=RETRY_AFTER
            ) from None
        return Message(code=Code.CONTENT, payload=records.dumps(result), content_format=CF_CBOR)

    async def _infer_post(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        body = await self._inference_body(request)
        try:
            req = InferRequest.parse(body)
        except InferenceError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        return await self._run_inference(self.inference.infer(device, req))

    async def _validate_post(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        body = await self._inference_body(request)
        try:
            req = ValidateRequest.parse(body)
        except InferenceError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        return await self._run_inference(self.inference.validate(device, req))

    async def _learn_post(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        body = self._payload(request, (CF_CBOR,), MAX_BODY_BYTES)
        if self.learn_upstream is not None:
            return _answer(await self.learn_upstream.upload(device, body), Code.CHANGED)
        now = self.clock.time()
        try:
            new = await self.db(lambda s: accept_upload(s, device, body, now))
        except UploadRefused as err:
            raise _Failure(_REFUSALS[err.code], err.message) from None
        log.info("event=learn_upload device=%s bytes=%d new=%s", device, len(body), new)
        return Message(code=Code.CHANGED)

    async def _masters_get(self, request: Message, route: _Route) -> Message:
        sha = request.opt.uri_path[-1]
        if not SHA256_HEX.match(sha):
            raise _Failure(Code.BAD_REQUEST, "masters are named by their SHA-256 (64 hex digits)")
        # every block is cut from the masters as stored (they never change: no copy is held per
        # peer, so a round's devices fetching at once never void each other's transfers)
        if self.learn_upstream is not None:
            answer = _answer(await self.learn_upstream.masters(sha), Code.CONTENT)
            return blockwise(request, answer)
        if self._masters_kept is None:
            self._masters_kept = {}
        kept = self._masters_kept
        blob = kept.pop(sha, None)
        if blob is None:
            blob = await self.db(lambda s: s.learn_blob(sha))
            if blob is None or hashlib.sha256(blob).hexdigest() != sha:
                raise _Failure(Code.NOT_FOUND, "no such masters")
        kept[sha] = blob  # the most recent last: a round's masters and its check's, read once
        while len(kept) > MASTERS_KEPT:
            del kept[next(iter(kept))]
        return blockwise(request, Message(code=Code.CONTENT, payload=blob, content_format=CF_CBOR))

"""``POST /logs/<device>``: a window of a device's recent log lines, uploaded when an operator
sent it the ``logs`` command (docs/protocol.md "Remote commands and logs"). A mixin of
:class:`cloud.server.CloudServer`, whose ``_render`` dispatches to ``_<route>_<method>``.

The body (agent/wire/logupload.py) is checked whole before anything is kept: over
``UPLOAD_BODY_BYTES`` 4.13, not a log upload (or text that inflates beyond its limit) 4.00; it
is kept as it came (cloud/commandstore.py ``logs``) and answered 2.04.
"""

from __future__ import annotations

import logging

from aiocoap import Message
from aiocoap.numbers.codes import Code

from agent.wire.batch import CF_CBOR
from agent.wire.logupload import UPLOAD_BODY_BYTES, LogUploadError, decode_upload
from cloud.protocol import _Failure, _Route
from cloud.serverroutes import RouteHost

log = logging.getLogger("cloud.server")


class LogRoutes(RouteHost):
    """The handler of ``/logs/<device>``."""

    async def _logs_post(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        body = self._payload(request, (CF_CBOR,), UPLOAD_BODY_BYTES)
        try:
            upload = decode_upload(body)
        except LogUploadError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        now = self.clock.time()
        n = await self.db(
            lambda s: s.put_log_upload(
                device, upload.since, upload.count, upload.left_out, body, now
            )
        )
        log.info(
            "event=logs_upload device=%s n=%d lines=%d bytes=%d", device, n, upload.count, len(body)
        )
        return Message(code=Code.CHANGED)

"""aiocoap's OSCORE client transport as the agent's client contexts use it.

aiocoap 0.4.17's ``TransportOSCORE`` runs each request in a task named after the request, and
that name formats the request with its peer's address: an IPv6 address parse and an interface
name lookup, about 15 us per message on the bench host (Intel Xeon), once for every 1 KiB block
of a 64 KiB batch. :class:`OscoreRequests` is that transport with a fixed task name, nothing
else changed; :func:`install` puts it in place of aiocoap's in one client context (this module
is imported only for ``security = "oscore"``).
"""

from __future__ import annotations

from typing import Any

from aiocoap.transports.oscore import TransportOSCORE

#: The name of every OSCORE request task (aiocoap's: "OSCORE request <the request>").
TASK_NAME = "OSCORE request"


class OscoreRequests(TransportOSCORE):  # type: ignore[misc]
    """aiocoap's OSCORE client transport, its tasks named :data:`TASK_NAME`."""

    def request(self, request: Any) -> None:
        # aiocoap 0.4.17's TransportOSCORE.request, but for the task's name
        t = self.loop.create_task(self._request(request), name=TASK_NAME)
        self._tasks.add(t)

        def done(t: Any, _tasks: set[Any] = self._tasks, _request: Any = request) -> None:
            _tasks.remove(t)
            try:
                t.result()
            except Exception as e:
                _request.add_exception(e)

        t.add_done_callback(done)


def install(ctx: Any) -> None:
    """Replace aiocoap's OSCORE client transport in the client context ``ctx`` (in its place in
    the order of request interfaces) by :class:`OscoreRequests`."""
    interfaces = ctx.request_interfaces
    for i, interface in enumerate(interfaces):
        if type(interface) is TransportOSCORE:
            interfaces[i] = OscoreRequests(ctx, ctx)

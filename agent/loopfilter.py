"""Event loop exception filters: a known library failure in an event loop callback becomes one
call of ``on_match(error)`` (a log line of the caller's choosing) instead of asyncio's logged
traceback; every other exception goes on to the handler that was there before."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class ExceptionFilter:
    """``matches(error, where)`` decides; ``where`` is the repr of the failing callback."""

    def __init__(
        self,
        matches: Callable[[BaseException, str], bool],
        on_match: Callable[[BaseException], None],
    ) -> None:
        self._matches = matches
        self._on_match = on_match
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def remove(self) -> None:
        """Put the previous handler back (unless another filter was installed on top since)."""
        if self._loop is not None and self._loop.get_exception_handler() == self._handle:
            self._loop.set_exception_handler(self._previous)
        self._loop = None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if error is not None and self._matches(error, repr(context.get("handle", ""))):
            self._on_match(error)
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

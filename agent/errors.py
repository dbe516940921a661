"""The agent's kinds of error, below the one root in ``drivers/errors.py``.

The root (:class:`AgentError`) and the errors of parts and buses live with the drivers, which import
nothing from the agent; they are named here too so agent code has one place to import errors from.
Callers act on each kind differently. OS and library errors are wrapped at the boundary
(``raise StoreError(...) from err``); messages say what failed and what to do next.
"""

from __future__ import annotations

import errno
import os

from drivers.errors import (
    AgentError,
    DeviceDataError,
    DeviceIOError,
    DeviceNotFound,
    DeviceTimeout,
    DriverError,
)

__all__ = [
    "AgentError",
    "ConfigError",
    "DeviceDataError",
    "DeviceIOError",
    "DeviceNotFound",
    "DeviceTimeout",
    "DriverError",
    "ModelError",
    "StoreError",
    "StoreFull",
    "SyncError",
]


class ConfigError(AgentError):
    """A configuration file is unreadable or invalid.

    ``str(err)`` is one line: ``FILE: KEY.PATH: message``.
    """

    def __init__(self, file: str, path: str, message: str) -> None:
        self.file = file
        self.path = path
        self.message = message
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {message}")


class StoreError(AgentError):
    """The durable queue cannot do what was asked (I/O error, corrupt file, closed store)."""


class StoreFull(StoreError):
    """The disk is full (ENOSPC) or the queue cannot make room within its budget."""


class SyncError(AgentError):
    """An exchange with the cloud endpoint failed."""


class ModelError(AgentError):
    """A model file is missing, corrupt, unsigned, or does not match what the code expects."""


class NotNow(AgentError):
    """The device cannot take a model or a release now for a cause of its own (not enough free
    disk space, a write that failed): tried again later, never reported as a refusal (a refusal
    blocks that version at the endpoint and stops a roll-out)."""


#: errno values saying the filesystem (or the user's quota) has no room: a condition of the
#: device, not of what was being written.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def no_room(err: BaseException) -> bool:
    """An OSError saying there is no room (:data:`NO_ROOM`)."""
    return isinstance(err, OSError) and err.errno in NO_ROOM


def says_no_room(text: str) -> bool:
    """A program's output with the C library's words for :data:`NO_ROOM` (pip, venv)."""
    return any(os.strerror(code) in text for code in NO_ROOM)

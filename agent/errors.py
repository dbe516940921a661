"""The error family of the agent.

One root, :class:`AgentError`, and a few kinds that callers act on differently. OS and library
errors are wrapped at the boundary (``raise DeviceIOError(...) from err``). Messages are written for
an operator: they say what failed and, where it helps, what to do next.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


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


class DriverError(AgentError):
    """A sensor part or its bus misbehaved."""


class DeviceNotFound(DriverError):
    """Nothing answers at the configured address or port, or the identity check failed."""


class DeviceIOError(DriverError):
    """A transfer with a part failed (NACK mid-read, bus error, port error)."""


class DeviceDataError(DeviceIOError):
    """A part answered, but with data that fails a check (CRC, checksum, range, framing)."""


class DeviceTimeout(DriverError):
    """A part did not answer, or did not finish a conversion, within its deadline."""


class StoreError(AgentError):
    """The durable queue cannot do what was asked (I/O error, corrupt file, closed store)."""


class StoreFull(StoreError):
    """The disk is full (ENOSPC) or the queue cannot make room within its budget."""


class SyncError(AgentError):
    """An exchange with the cloud endpoint failed."""


class ModelError(AgentError):
    """A model file is missing, corrupt, unsigned, or does not match what the code expects."""

"""The root of the error family, and the errors of parts and buses.

One root, :class:`AgentError`, for every error the product raises on purpose; the agent adds its
own kinds below it in ``agent/errors.py``. OS and library errors are wrapped at the boundary
(``raise DeviceIOError(...) from err``). Messages are written for an operator: they say what failed
and, where it helps, what to do next.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


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

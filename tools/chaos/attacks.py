"""The hostile inputs of a chaos run and the small disk:

- :func:`flood`: malformed datagrams (``tools/hostile.py``) sent straight to the endpoint's
  port, paced, with the answers counted by CoAP code and the host's UDP receive-buffer drops
  read from ``/proc/net/snmp`` (a datagram dropped there never reached the endpoint).
- :class:`DesiredWriter`: hostile desired documents (``tools/hostile.py``) written into the
  endpoint's database around its checks, as a buggy tool would, key by key into the ``desired``
  table (a value that does not decode goes in as its CBOR bytes, which the endpoint serves as
  they are); the endpoint's poller notices the change and notifies the observing agent. Through
  ``edge-agent-cloud desired set`` they would never be served: the endpoint refuses them.
- :func:`mount_tmpfs`, :func:`fill`, :func:`unmount`: a small disk, filled up to ENOSPC with a
  ballast file and emptied again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agent.wire import statedoc
from tools.hostile import Datagram, HostileDocument

FLOOD_BATCH = 25  # datagrams sent back to back
FLOOD_PAUSE = 0.02  # seconds between batches (about 1,250 datagrams a second)
SETTLE = 1.5  # seconds for the endpoint to finish with the last datagrams (and log them)


@dataclass
class Flood:
    """What a flood of malformed datagrams did."""

    sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # "4.00", "RST", ...
    log_bytes: int = 0  # growth of the endpoint's log over the flood
    rcvbuf_errors: int | None = None  # host-wide UDP receive-buffer drops during the flood

    def merge(self, other: Flood) -> None:
        self.sent += other.sent
        self.answers.update(other.answers)
        self.log_bytes += other.log_bytes
        if other.rcvbuf_errors is not None:
            self.rcvbuf_errors = (self.rcvbuf_errors or 0) + other.rcvbuf_errors


def udp_rcvbuf_errors() -> int | None:
    """The host's UDP RcvbufErrors counter (Linux), or None."""
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
    except OSError:
        return None
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    if len(udp) < 2 or "RcvbufErrors" not in udp[0]:
        return None
    return int(udp[1][udp[0].index("RcvbufErrors")])


def _size(path: Path) -> int:
    return path.stat().st_size


def _code(reply: bytes) -> str:
    if len(reply) < 4:
        return "short"
    mtype = (reply[0] >> 4) & 3
    code = reply[1]
    if code == 0:
        return "RST" if mtype == 3 else "empty"
    return f"{code >> 5}.{code & 31:02d}"


async def flood(port: int, datagrams: list[Datagram], endpoint_log: Path) -> Flood:
    """Send ``datagrams`` to 127.0.0.1:``port`` and measure the endpoint log's growth."""
    result = Flood()
    before_log = _size(endpoint_log)
    before_drops = udp_rcvbuf_errors()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))

    def drain() -> None:
        while True:
            try:
                reply = sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                return
            result.answers[_code(reply)] += 1

    try:
        for i, d in enumerate(datagrams):
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                sock.send(d.data)
                result.sent += 1
            if i % FLOOD_BATCH == FLOOD_BATCH - 1:
                drain()
                await asyncio.sleep(FLOOD_PAUSE)
        await asyncio.sleep(SETTLE)
        drain()
    finally:
        sock.close()
    after_drops = udp_rcvbuf_errors()
    if before_drops is not None and after_drops is not None:
        result.rcvbuf_errors = after_drops - before_drops
    result.log_bytes = _size(endpoint_log) - before_log
    return result


class DesiredWriter:
    """Writes whole desired documents into the endpoint's database (module docstring)."""

    def __init__(self, cloud_db: Path, device: str) -> None:
        self.cloud_db = cloud_db
        self.device = device

    def write(self, doc: HostileDocument) -> int:
        """Make ``doc`` the device's desired document; returns its revision. StateError if the
        document cannot even be split into keys (hostile.py promises it can)."""
        parsed = statedoc.DesiredDoc.from_cbor(doc.payload)
        rows = [
            (self.device, key, entry.version, statedoc.encode_value(entry.value), time.time())
            for key, entry in parsed.entries.items()
        ]
        db = sqlite3.connect(self.cloud_db, timeout=10.0, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM desired WHERE device = ?", (self.device,))
            db.executemany(
                "INSERT INTO desired (device, key, version, value, updated, blocked) "
                "VALUES (?, ?, ?, ?, ?, NULL)",
                rows,
            )
            db.execute("UPDATE devices SET desired_rev = ? WHERE id = ?", (parsed.rev, self.device))
            db.execute("COMMIT")
        finally:
            db.close()
        return parsed.rev


# -- the small disk ------------------------------------------------------------------------------


def mount_tmpfs(path: Path, size_mb: int) -> None:
    """Mount a tmpfs of ``size_mb`` MiB at ``path`` (needs root); CalledProcessError if not."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )


def unmount(path: Path) -> None:
    """Unmount ``path`` (lazily if it is busy); quiet if it is not mounted."""
    if not os.path.ismount(path):
        return
    done = subprocess.run(["umount", str(path)], capture_output=True)
    if done.returncode != 0 and os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> int:
    """Write ``path`` (a ballast file) until its file system is full; returns the bytes."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (1 << 16, 1 << 12, 1 << 9):
            block = b"\xa5" * chunk
            while True:
                try:
                    n = os.write(fd, block)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
                written += n
                if n < chunk:
                    break
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
    return written


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

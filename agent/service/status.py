"""The local status endpoint: a Unix socket that answers with the running agent's live state.

The agent listens on ``status.sock`` in its runtime directory (``$RUNTIME_DIRECTORY`` under systemd,
else the data directory). A client connects and reads one JSON document; nothing is sent to it.
``edge-agent status`` is that client, printing a summary (or the JSON with ``--json``). The socket
is mode 0660, so members of the service's group can read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.files import loads_json

log = logging.getLogger(__name__)

SOCKET_NAME = "status.sock"
CLIENT_TIMEOUT = 5.0


def socket_path(data_dir: Path) -> Path:
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    base = Path(runtime.split(":")[0]) if runtime else data_dir
    return base / SOCKET_NAME


class StatusServer:
    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o660)
        log.debug("event=status_listening path=%s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            doc = self.snapshot()
            writer.write(json.dumps(doc, default=str).encode() + b"\n")
            await writer.drain()
        except Exception as err:  # a status request must never take the agent down
            log.warning("event=status_failed error=%r", str(err))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


#: The largest status answer read (the agent's is a few kilobytes)
MAX_ANSWER_BYTES = 4 << 20


def query(path: Path, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Read the status document from the socket at ``path`` (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        chunks, size = [], 0
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:  # a peer that never stops is not the agent
                raise ValueError(f"more than {MAX_ANSWER_BYTES} bytes")
    doc = loads_json(b"".join(chunks))
    if not isinstance(doc, dict):
        raise ValueError("not a status document (a JSON object)")
    return doc


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def format_status(doc: dict[str, Any]) -> str:
    """A human summary of the status document."""
    lines = [
        f"device    {doc.get('device_id', '?')}   version {doc.get('version', '?')}   "
        f"uptime {_age(doc.get('uptime_s'))}",
    ]
    link = doc.get("link") or {}
    lines.append(
        f"link      {link.get('state', 'n/a')}"
        + (f"   rtt {link['rtt_ms']:.0f} ms" if link.get("rtt_ms") is not None else "")
        + (f"   loss {link['loss'] * 100:.1f}%" if link.get("loss") is not None else "")
        + (f"   endpoint {link['endpoint']}" if link.get("endpoint") else "")
    )
    queue = doc.get("queue") or {}
    depth = queue.get("depth") or {}
    lines.append(
        "queue     "
        + (", ".join(f"{k} {v}" for k, v in depth.items()) or "n/a")
        + (f"   {queue['bytes'] / 1e6:.2f} MB" if queue.get("bytes") is not None else "")
        + (f"   oldest {_age(queue.get('oldest_age_s'))}" if queue.get("oldest_age_s") else "")
        + (f"   set aside {queue['set_aside']}" if queue.get("set_aside") else "")
    )
    models = doc.get("models") or {}
    if "error" in models:
        lines.append(f"models    none: {models['error']}")
    else:
        lines.append(
            "models    "
            + (
                ", ".join(
                    f"{role} {m.get('name')}@{m.get('version')}"
                    + (" (active)" if m.get("active") else "")
                    for role, m in models.items()
                    if isinstance(m, dict)
                )
                or "n/a"
            )
        )
    alert = doc.get("last_alert")
    if alert:
        top = ", ".join(
            str(c[0]) if isinstance(c, list | tuple) else str(c)
            for c in alert.get("channels", [])[:3]
        )
        fault = f" ({alert['fault']})" if alert.get("fault") else ""
        lines.append(
            f"alert     {alert.get('kind', '?')} {alert.get('verdict', '?')}{fault} "
            f"score {alert.get('score', 0):.3g}   {_age(alert.get('age_s'))} ago   {top}"
        )
    else:
        lines.append("alert     none")
    lines.append("sensors")
    for s in doc.get("sensors", []):
        lines.append(
            f"  {s['name']:<12} {s['state']:<9} reads {s['reads']:<8} errors {s['errors']:<6}"
            + (f" last error: {s['last_error']}" if s["state"] != "ok" and s["last_error"] else "")
        )
    return "\n".join(lines)

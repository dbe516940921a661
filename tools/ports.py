"""Ports for tests, benches and the chaos run on loopback: :func:`free_port`.

A port the kernel hands out for ``bind(port 0)`` lies in the ephemeral range, the same range
outgoing connections take their local ports from; when tests run in parallel (``./tools/dev
test`` runs a worker per core) a port probed free can be taken by another process's TCP
connection before the server binds it (an aiocoap server binds UDP and TCP on its port). So the
port comes from below the ephemeral range, where nothing is allocated automatically, at a random
place, and is checked free for both UDP and TCP on the address.
"""

from __future__ import annotations

import random
import socket

LOWEST = 20000
_FALLBACK_EPHEMERAL_START = 32768


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_START


def _free(host: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free for UDP and TCP now, outside the ephemeral range."""
    top = _ephemeral_start()
    low = LOWEST if top > LOWEST + 1000 else 1024
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(low, top)
        if _free(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a crowded range: the kernel's
        s.bind((host, 0))
        return int(s.getsockname()[1])

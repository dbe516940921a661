#!/usr/bin/env python3
"""fleetnet: endpoint hosts behind a UDP load balancer, emulated with network namespaces.

The topology docs/fleet.md describes, on one machine (root; Linux network namespaces and veth
pairs)::

    namespace DEV (devices, 10.N.3.2) --veth-- root namespace --veth-- namespace H1 (10.N.1.2)
                                        |  nginx stream on 10.N.3.1:5683 (UDP),       |
                                        |  hash of the device's address -> H1 or H2   endpoint
                                        |  PostgreSQL on 10.N.1.1 and 10.N.2.1
                                        +---veth-- namespace H2 (10.N.2.2): endpoint

Each namespace has its own interfaces, addresses and port space, so the endpoints of H1 and H2
are two hosts as far as UDP and PostgreSQL can tell; traffic between them goes through the root
namespace, where the load balancer and the database run. Nothing leaves the machine: the
namespaces have no route but to the root namespace, and the root namespace does not forward.

Use it from a test or a bench::

    with Topology() as net, Nginx(net.lb_config(upstreams, port), workdir) as lb:
        proc = net.popen("h1", ["edge-agent-cloud", "serve", ...])
        net.run("dev", [sys.executable, "tools/fleet.py", ...])
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

NAMESPACES = ("h1", "h2", "dev")
NGINX_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


class NetError(RuntimeError):
    """The topology cannot be built here (not root, no ip, a namespace in the way)."""


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {done.stderr.strip()}")


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


class Topology:
    """Three namespaces, each with a veth pair to the root namespace (module docstring).
    ``net`` picks the second octet of 10.net.0.0/16 (random when None)."""

    def __init__(self, net: int | None = None) -> None:
        why = available()
        if why is not None:
            raise NetError(why)
        self.net = net if net is not None else 100 + secrets.randbelow(150)
        self.tag = f"ea{secrets.token_hex(2)}"
        self.names = {role: f"{self.tag}-{role}" for role in NAMESPACES}
        self._made: list[str] = []

    # addresses -------------------------------------------------------------------------------

    def root_addr(self, role: str) -> str:
        """The root namespace's address on the link to ``role``."""
        return f"10.{self.net}.{NAMESPACES.index(role) + 1}.1"

    def addr(self, role: str) -> str:
        """The address of namespace ``role``."""
        return f"10.{self.net}.{NAMESPACES.index(role) + 1}.2"

    @property
    def subnet(self) -> str:
        return f"10.{self.net}.0.0/16"

    # building --------------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        try:
            for role in NAMESPACES:
                self._add(role)
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, role: str) -> None:
        ns = self.names[role]
        outside, inside = f"{self.tag}{role}o", f"{self.tag}{role}i"
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns)
        _ip("addr", "add", f"{self.root_addr(role)}/24", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("link", "set", "lo", "up", netns=ns)
        _ip("addr", "add", f"{self.addr(role)}/24", "dev", inside, netns=ns)
        _ip("link", "set", inside, "up", netns=ns)
        _ip("route", "add", "default", "via", self.root_addr(role), netns=ns)

    def close(self) -> None:
        """Delete the namespaces (their veth ends go with them, and the root ends too)."""
        for ns in reversed(self._made):
            with contextlib.suppress(NetError):
                _ip("netns", "del", ns)
        self._made.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # running ---------------------------------------------------------------------------------

    def argv(self, role: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[role], *argv]

    def popen(self, role: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside namespace ``role``."""
        return subprocess.Popen(self.argv(role, argv), **kwargs)

    def run(
        self, role: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.argv(role, argv), **kwargs)


def lb_config(
    workdir: Path,
    listen: tuple[str, int],
    upstreams: Sequence[tuple[str, int]],
    key: str = "$remote_addr",
    timeout_s: int = 600,
) -> str:
    """An nginx configuration: one UDP listener balancing over ``upstreams`` by a consistent
    hash of ``key`` (``$remote_addr``: a device's address; add ``$remote_port`` when many
    devices share an address, as the emulated ones do), logging each session's upstream."""
    servers = "\n".join(f"        server {host}:{port};" for host, port in upstreams)
    return f"""load_module {NGINX_MODULE};
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 16384; }}
stream {{
    log_format sessions '$remote_addr:$remote_port $upstream_addr $session_time '
                        '$bytes_received $bytes_sent';
    access_log {workdir}/sessions.log sessions;
    upstream endpoints {{
        hash {key} consistent;
{servers}
    }}
    server {{
        listen {listen[0]}:{listen[1]} udp;
        proxy_pass endpoints;
        proxy_timeout {timeout_s}s;
    }}
}}
"""


class Nginx:
    """nginx in the foreground with ``config`` (written to ``workdir/nginx.conf``)."""

    def __init__(self, config: str, workdir: Path) -> None:
        self.workdir = workdir
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        if shutil.which("nginx") is None:
            raise NetError("nginx is not installed (Debian: nginx libnginx-mod-stream)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config)
        check = subprocess.run(
            ["nginx", "-t", "-c", str(conf), "-p", str(self.workdir)],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise NetError(f"nginx -t: {check.stderr.strip()}")
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(self.workdir), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not (self.workdir / "nginx.pid").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise NetError(f"nginx did not start: {self.errors()}")
            time.sleep(0.05)
        return self

    def errors(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def sessions(self) -> list[tuple[str, str]]:
        """(client address:port, upstream address:port) of each session logged so far (nginx
        writes a session's line when it ends)."""
        path = self.workdir / "sessions.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out.append((parts[0], parts[1]))
        return out

    def close(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)  # graceful: sessions end and are logged
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""A live device over SSH: one ``ssh`` connection carries file operations to a helper there.

The system ssh client connects with BatchMode (never a password prompt), the given identity file
and host-key policy. On the device, python3 (as root, through ``sudo -n`` for another user) reads
the source of :mod:`flash_lib.fsops` from stdin, executes it and serves requests for the root
directory (``--prefix``, ``/`` by default) until the connection closes. Nothing is installed on
the device for this, and file contents stream over the same connection.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flash_lib import fsops
from flash_lib.errors import FlashError

CONNECT_TIMEOUT = 10  # seconds for ssh's ConnectTimeout
CHUNK = 1 << 20
BOOTSTRAP = (
    'PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3; '
    'if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; '
    'exec $SUDO "$PY" -c '
    "'import sys;exec(compile(sys.stdin.buffer.read(int(sys.stdin.buffer.readline())),"
    '"flash-helper","exec"))'
    "'"
)


@dataclass(frozen=True)
class Destination:
    user: str | None
    host: str
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        who = f"{self.user}@" if self.user else ""
        return f"{who}{host}" + (f":{self.port}" if self.port else "")


def parse_destination(text: str) -> Destination:
    """``user@host``, ``user@host:port``, ``host``, ``user@[v6addr]:port``."""
    user, _, hostport = text.rpartition("@")
    port: int | None = None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", hostport)
    if m:
        host, port_text = m.group(1), m.group(2)
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
    else:
        host, port_text = hostport, None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise FlashError(f"{text!r}: the port must be a number 1-65535")
        port = int(port_text)
    if not host or any(c.isspace() for c in host) or host.startswith("-"):
        raise FlashError(f"{text!r}: expected user@host[:port]")
    return Destination(user or None, host, port)


def _explain(dest: Destination, stderr: str) -> str:
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    text = " ".join(lines)
    last = lines[-1] if lines else "the connection closed"
    for pattern, message in (
        (
            r"Connection refused|No route to host|Connection timed out|timed out|"
            r"Could not resolve hostname|Network is unreachable|Name or service not known",
            f"cannot reach {dest} over SSH: {last}",
        ),
        (
            r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED",
            f"the host key of {dest} is unknown or has changed ({last}): check it, add it to "
            "known_hosts, or pass --host-key-check accept-new for a new device",
        ),
        (
            r"Permission denied",
            f"SSH login to {dest} was refused ({last}): pass the right key with -i/--identity",
        ),
        (
            r"sudo: .*password|a terminal is required",
            f"{dest.user or 'the SSH user'} is not root on {dest.host} and sudo asks for a "
            "password: log in as root or allow that user passwordless sudo",
        ),
        (
            r"python3: (command )?not found|No such file",
            f"no python3 on {dest.host}: install python3 on the device first",
        ),
    ):
        if re.search(pattern, text):
            return message
    return f"SSH to {dest} failed: {last}"


class SshFS:
    """TargetFS over an SSH connection (root of the target = ``prefix`` on the device)."""

    def __init__(
        self,
        dest: Destination,
        *,
        prefix: str = "/",
        identity: Path | None = None,
        known_hosts: Path | None = None,
        host_key_check: str = "accept-new",
        ssh: str = "ssh",
    ) -> None:
        self.dest = dest
        self.prefix = prefix
        cmd = [
            ssh,
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-o",
            f"StrictHostKeyChecking={host_key_check}",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ServerAliveInterval=15",
        ]
        if known_hosts is not None:
            cmd += ["-o", f"UserKnownHostsFile={known_hosts}"]
        if identity is not None:
            cmd += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
        if dest.port:
            cmd += ["-p", str(dest.port)]
        cmd += [f"{dest.user}@{dest.host}" if dest.user else dest.host]
        cmd += ["--", "sh -c " + shlex.quote(BOOTSTRAP)]
        self.command = cmd
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    # -- connection ------------------------------------------------------------------------
    def open(self) -> dict[str, Any]:
        try:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as err:
            raise FlashError(f"cannot run {self.command[0]}: {err.strerror}") from None
        source = Path(fsops.__file__).read_text()
        code = f"{source}\nserve({self.prefix!r})\n".encode()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"%d\n" % len(code) + code)
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail()
        self.info = self.call("info")
        return self.info

    def _fail(self) -> None:
        assert self.proc is not None
        try:
            _, err = self.proc.communicate(timeout=CONNECT_TIMEOUT * 2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        raise FlashError(_explain(self.dest, err.decode("utf-8", "replace")))

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=CONNECT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: Iterator[bytes] | None = None,
        size: int = 0,
    ) -> Any:
        result, _ = self._call(op, args or {}, payload, size)
        return result

    def _call(
        self, op: str, args: dict[str, Any], payload: Iterator[bytes] | None, size: int
    ) -> tuple[Any, bytes]:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"op": op, "args": args, "size": size}).encode() + b"\n")
            for block in payload or ():
                proc.stdin.write(block)
            proc.stdin.flush()
        except BrokenPipeError:
            self._fail()
        line = proc.stdout.readline()
        if not line:
            self._fail()
        try:
            head = json.loads(line)
        except ValueError:
            raise FlashError(
                f"{self.dest}: unexpected output from the device: {line[:200]!r}"
            ) from None
        body = proc.stdout.read(head.get("size", 0)) if head.get("size") else b""
        if not head.get("ok"):
            raise FlashError(f"{self.dest}: {head.get('error')}")
        return head.get("result"), body

    # -- TargetFS --------------------------------------------------------------------------
    def stat(self, path: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.call("stat", {"path": path})
        return result

    def read(self, path: str) -> bytes:
        return self._call("read", {"path": path}, None, 0)[1]

    def digest(self, path: str) -> str:
        return str(self.call("digest", {"path": path}))

    def listdir(self, path: str) -> list[str]:
        return list(self.call("listdir", {"path": path}))

    def write(
        self,
        path: str,
        src: bytes | Path,
        mode: int,
        uid: int,
        gid: int,
        advance: Callable[[int], None],
    ) -> None:
        args = {"path": path, "mode": mode, "uid": uid, "gid": gid}
        if isinstance(src, bytes):
            self.call("write", args, iter([src]), len(src))
            advance(len(src))
            return

        def chunks() -> Iterator[bytes]:
            with open(src, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    yield block
                    advance(len(block))

        self.call("write", args, chunks(), src.stat().st_size)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        self.call("mkdir", {"path": path, "mode": mode, "uid": uid, "gid": gid})

    def chmeta(self, path: str, kind: str, mode: int, uid: int, gid: int) -> None:
        self.call("chmeta", {"path": path, "mode": mode, "uid": uid, "gid": gid})

    def symlink(self, path: str, target: str) -> None:
        self.call("symlink", {"path": path, "target": target})

    def remove(self, path: str) -> None:
        self.call("remove", {"path": path})

    def commit(self) -> None:
        self.call("run", {"argv": ["sync"]})

    def run(self, argv: list[str]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("run", {"argv": argv})
        return result

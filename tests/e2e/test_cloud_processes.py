"""`edge-agent-cloud serve --processes N`: N endpoint processes on one UDP address.

Devices (each its own socket, so the kernel spreads them over the processes) post over OSCORE
and are answered by whichever process holds their address; a desired-state change written by
another process (the command line) reaches the device's observation; a worker killed with
SIGKILL is started again, and its devices carry on through the others meanwhile (through an
Echo round trip each): every record acknowledged is stored exactly once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport
from agent.wire import records as recmod
from agent.wire.batch import IngestAck, WireRecord
from agent.wire.codec import encode_batch
from agent.wire.records import AlertBody
from cloud.storage import open_storage
from drivers.clock import RealClock
from tools.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DEVICES = [f"pump-{i:02d}" for i in range(8)]
WORKERS = 3


def sockets_on(port: int) -> int:
    """How many UDP sockets are bound to ``port`` (the workers listening; aiocoap binds IPv6
    sockets, which hold IPv4 addresses mapped)."""
    count = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as rows:
            for line in rows:
                local = line.split()[1]
                count += local.endswith(f":{port:04X}")
    return count


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


async def cli(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cloud.cli",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


class Device:
    def __init__(self, name: str, creds: Path, uri: str, state: Path) -> None:
        self.name = name
        self.uri = uri
        self.security = ClientSecurity.open("oscore", (uri,), creds / f"{name}.json", state)
        self.transport = CoapTransport(RealClock(), uris=(uri,), security=self.security)
        self.next_seq = 1
        self.acked: set[int] = set()

    async def post(self, count: int = 5) -> None:
        recs = []
        for _ in range(count):
            body = AlertBody(1.7e9 + self.next_seq, {"score": 1.0}).to_cbor()
            recs.append(WireRecord(self.next_seq, "alert", 1.7e9 + self.next_seq, body))
            self.next_seq += 1
        payload = encode_batch(self.name, recs)
        answer = await self.transport.request(
            "POST", f"{self.uri}/ingest/{self.name}", payload, content_format=112, deadline=60
        )
        assert answer.dotted == "2.04", answer
        self.acked.update(IngestAck.from_cbor(answer.payload).seqs())

    async def close(self) -> None:
        await self.transport.close()
        self.security.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_processes_share_one_address(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    data, creds = tmp_path / "data", tmp_path / "creds"
    spec = f"sqlite:{data}" if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    where = ("--data", str(data), "--storage", spec)
    await cli("devices", "add", *where, *DEVICES, "--credential-out", str(creds))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "cloud.cli", "serve", "--listen", f"127.0.0.1:{port}", *where),
        *("--processes", str(WORKERS)),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    devices: list[Device] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            line = (await proc.stdout.readline()).decode()
        match = re.search(rf"listening on (coap://\S+) \({WORKERS} processes\)", line)
        assert match, line
        uri = match.group(1)
        assert sockets_on(port) == WORKERS
        devices = [Device(d, creds, uri, tmp_path / "state" / f"{d}.json") for d in DEVICES]
        await asyncio.gather(*(d.post() for d in devices))

        # desired state set by another process reaches the observation, wherever it is held
        watcher = devices[0]
        seen: asyncio.Queue[dict[str, object]] = asyncio.Queue()

        async def observe() -> None:
            async for response in watcher.transport.observe(
                f"{uri}/state/{watcher.name}/desired", deadline=30
            ):
                if response.success:
                    await seen.put(recmod.loads(response.payload))

        task = asyncio.create_task(observe())
        async with asyncio.timeout(30):
            await seen.get()  # the document as it is
        setting = "sensor/motor/interval=7"
        await cli("desired", "set", *where, "--device", watcher.name, setting)
        async with asyncio.timeout(30):
            while True:
                doc = await seen.get()
                if "sensor/motor/interval" in str(doc):
                    break
        task.cancel()

        # one worker killed mid-run: the others carry on, it comes back
        workers = children(proc.pid)
        assert len(workers) == WORKERS
        os.kill(workers[0], signal.SIGKILL)
        for _ in range(3):
            await asyncio.gather(*(d.post() for d in devices))
        for _ in range(300):  # the parent starts it again within a second or so
            if sockets_on(port) == WORKERS and len(children(proc.pid)) == WORKERS:
                break
            await asyncio.sleep(0.2)
        assert sockets_on(port) == WORKERS
        await asyncio.gather(*(d.post() for d in devices))
    finally:
        for d in devices:
            await d.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "event=worker_exited" in text and "event=worker_restarted" in text
    assert "Traceback" not in text
    storage = open_storage(spec)
    try:
        for d in devices:
            assert set(storage.seqs(d.name)) == d.acked == set(range(1, d.next_seq))
    finally:
        storage.close()


async def test_workers_that_cannot_start_end_the_parent_with_their_code(tmp_path: Path) -> None:
    """The storage is unreachable: the workers exit 69 with one line each; the parent stops the
    others and exits 69 too, no traceback anywhere."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "cloud.cli", "serve", "--listen", f"127.0.0.1:{free_port()}"),
        *("--data", str(tmp_path / "data"), "--processes", "2"),
        *("--storage", "postgresql://edge:secret@127.0.0.1:1/edge"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 69, text
    assert "exited with 69 before it listened" in text
    assert "Traceback" not in text and "secret" not in text  # the password is never printed
    assert out == b""

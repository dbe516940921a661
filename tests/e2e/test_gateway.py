"""The gateway tier with real processes: the cloud endpoint (``edge-agent-cloud serve``), one
gateway (``edge-agent gateway``) and agents on the simulated rig whose only endpoint is the
gateway (``edge-agent run``).

- every record a device committed is stored exactly once in the cloud, through a SIGKILL of the
  gateway and an outage of the cloud, with 5 % loss and 1 % duplication on both links (the
  impairment proxy between devices and gateway, and between gateway and cloud);
- a desired change made while the cloud is down (written to its database) reaches the devices
  once the cloud is back, through the gateway, and their reported state comes back up with it;
- a model version assigned to every device is fetched by the gateway once and installed by all.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cbor2
import pytest
from linkem import Impairment, LinkEmulator

from agent.modelstore.signing import SignedManifest, load_public_key
from agent.ota.updater import ReleaseFetcher, stage
from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport
from agent.wire.batch import CF_CBOR
from cloud.storage import SQLiteStorage
from drivers.clock import RealClock
from tools.chaos.harness import agent_config, free_udp_port

from ..unit.cloud.test_listen import reuseport_sockets
from ..unit.ota.test_release import make_bundle

pytestmark = pytest.mark.timeout(420)

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ("pump-a", "pump-b", "pump-c")
GATEWAY = "gw-1"
PROBE = "probe-1"
FALLBACK = "pump-c"  # lists the cloud as its second endpoint
TIME_SCALE = 5


def cloud(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def spawn(tmp: Path, name: str, *argv: str, prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """``python -m ARGV`` logging to ``tmp/NAME.log`` (``prefix``: e.g. ``ip netns exec NS``)."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", *argv],
        cwd=ROOT,
        stdout=open(tmp / f"{name}.log", "ab"),  # the child keeps it
        stderr=subprocess.STDOUT,
    )


def stop(p: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


async def until(check: Callable[[], Any], within: float, what: str) -> Any:
    end = time.monotonic() + within
    while time.monotonic() < end:
        found = await asyncio.to_thread(check)
        if found:
            return found
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out: {what}")


class Site:
    """The cloud, the gateway and the devices of one test, in ``tmp``."""

    devices: tuple[str, ...] = DEVICES
    site_prefix: Sequence[str] = ()
    time_scale: float = TIME_SCALE  # how the gateway and the devices are started (a namespace)

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "cloud-data"  # the example config's [models] public_key is beside it
        self.cloud_port = free_udp_port()
        self.gw_port = free_udp_port()
        self.lan_port = self.gw_port  # where the devices reach the gateway (a proxy may sit there)
        self.up_port = self.cloud_port  # where the gateway reaches the cloud (likewise)
        self.gw_dir = tmp / "gateway"
        self.cloud_proc: subprocess.Popen[bytes] | None = None
        self.gw_proc: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    def setup(self) -> None:
        cloud("models", "keygen", "--data", str(self.data))
        cloud("models", "publish", str(ROOT / "models" / "skab-ae.tflite"), "--data",
              str(self.data), "--name", "skab-ae", "--version", "1.0.0")  # fmt: skip
        (self.gw_dir / "devices").mkdir(parents=True)
        for d in self.devices:
            (self.tmp / d).mkdir()
            cred = self.tmp / d / "credential.json"
            cloud("devices", "add", "--data", str(self.data), "--credential-out", str(cred), d)
            shutil.copy(cred, self.gw_dir / "devices" / f"{d}.json")
            text = agent_config(d, self.tmp / d, self.lan_port, 1.0)
            if d == FALLBACK:  # the gateway first, the cloud second; back to the gateway soon
                gw = f'"coap://127.0.0.1:{self.lan_port}"'
                text = text.replace(
                    f"endpoints = [{gw}]", f'endpoints = [{gw}, "{self.upstream()}"]'
                )
                text += "primary_retry = 5.0\n"
            (self.tmp / f"{d}.toml").write_text(text)
        cloud("gateways", "add", "--data", str(self.data), "--credential-out",
              str(self.gw_dir / "credential.json"), GATEWAY)  # fmt: skip
        # a device with no agent: the test speaks for it (validation inference at the gateway)
        probe = self.tmp / "probe-credential.json"
        cloud("devices", "add", "--data", str(self.data), "--credential-out", str(probe), PROBE)
        shutil.copy(probe, self.gw_dir / "devices" / f"{PROBE}.json")
        cloud("gateways", "attach", "--data", str(self.data), GATEWAY, *self.devices, PROBE)
        (self.tmp / "gateway.toml").write_text(
            f'[agent]\ndevice_id = "{GATEWAY}"\ndata_dir = "{self.gw_dir}"\n'
            f'[uplink]\nendpoints = ["{self.upstream()}"]\n'
            f'[gateway]\nlisten = "127.0.0.1:{self.gw_port}"\nforward_interval = 0.5\n'
            "desired_poll = 1.0\n"
        )

    @property
    def gateway_uri(self) -> str:
        return f"coap://127.0.0.1:{self.gw_port}"

    def upstream(self) -> str:
        """The cloud as the gateway (and a device's fallback) reaches it."""
        return f"coap://127.0.0.1:{self.up_port}"

    def start_cloud(self) -> None:
        self.cloud_proc = spawn(
            self.tmp, "cloud", "cloud.cli", "serve", "--listen",
            f"127.0.0.1:{self.cloud_port}", "--data", str(self.data),
        )  # fmt: skip

    def start_gateway(self) -> None:
        self.gw_proc = spawn(
            self.tmp, "gateway", "agent.service.cli", "gateway", "--config",
            str(self.tmp / "gateway.toml"), prefix=self.site_prefix,
        )  # fmt: skip

    def start_agent(self, d: str) -> None:
        self.agents[d] = spawn(
            self.tmp, d, "agent.service.cli", "run", "--config", str(self.tmp / f"{d}.toml"),
            "--simulate", "pump", "--time-scale", str(self.time_scale), prefix=self.site_prefix,
        )  # fmt: skip

    def start_site(self) -> None:
        """The gateway and every device."""
        self.start_gateway()
        for d in self.devices:
            self.start_agent(d)

    async def records_in_cloud(self, least: int, within: float) -> None:
        await until(
            lambda: all(len(self.cloud_seqs(d)) > least for d in self.devices), within,
            "every device's records in the cloud through the gateway",
        )  # fmt: skip

    async def kill_gateway(self, down: float) -> None:
        """SIGKILL the gateway, start it again ``down`` seconds later."""
        stop(self.gw_proc, signal.SIGKILL)
        await asyncio.sleep(down)
        self.start_gateway()

    async def drained(self) -> None:
        """After the devices stopped: the gateway forwarded everything, and nothing is lost."""
        await until(
            lambda: all(self.cloud_seqs(d) >= self.gateway_seqs(d) for d in self.devices), 300,
            "the gateway's backlog forwarded",
        )  # fmt: skip
        self.check_delivery()

    async def model_everywhere(self, version: str, within: float) -> None:
        """Publish ``version`` of skab-ae, assign it to every device: it becomes active on all
        of them, and the gateway downloaded it once."""
        # the float32 reference of skab-ae: same features, another file (another SHA-256 than
        # the version the devices run, so "active with this SHA-256" means they switched)
        cloud("models", "publish", str(ROOT / "models" / "cloud" / "skab-ae.float32.tflite"),
              "--data", str(self.data), "--name", "skab-ae", "--version", version,
              "--entry", "skab-ae")  # fmt: skip
        for d in self.devices:
            cloud("desired", "set", "--data", str(self.data), "--device", d,
                  f'model/anomaly={{"name": "skab-ae", "version": "{version}"}}')  # fmt: skip
        s = SQLiteStorage(self.data / "cloud.sqlite3")
        try:
            published = s.model("skab-ae", version)
            assert published is not None
            sha = SignedManifest.from_cbor(published.manifest).sha256
        finally:
            s.close()

        def installed() -> bool:
            for d in self.devices:
                value = self.reported(d, "model/anomaly") or {}
                if value.get("sha256") != sha or value.get("status") != "active":
                    return False
            return True

        await until(installed, within, f"skab-ae {version} active on every device")
        log = (self.tmp / "gateway.log").read_text()
        assert log.count(f"event=gateway_model_cached name=skab-ae version={version}") == 1

    async def finish(self) -> None:
        """Stop the devices, let the gateway drain (:meth:`drained`), and no process logged a
        traceback."""
        for d in self.devices:
            stop(self.agents[d])
        await self.drained()
        for name in ("gateway", "cloud", *self.devices):
            assert "Traceback" not in (self.tmp / f"{name}.log").read_text(), name

    def close(self) -> None:
        for p in self.agents.values():
            stop(p)
        stop(self.gw_proc)
        stop(self.cloud_proc)

    # -- what is where ----------------------------------------------------------------------------
    def cloud_seqs(self, device: str) -> set[int]:
        s = SQLiteStorage(self.data / "cloud.sqlite3")
        try:
            return set(s.seqs(device))
        finally:
            s.close()

    def gateway_seqs(self, device: str) -> set[int]:
        s = SQLiteStorage(self.gw_dir / "store" / "cloud.sqlite3")
        try:
            return set(s.seqs(device))
        finally:
            s.close()

    def queued(self, device: str) -> set[int]:
        """The seqs still in the device's queue (committed, not acknowledged to it)."""
        with sqlite3.connect(self.tmp / device / "queue.db") as db:
            return {int(r[0]) for r in db.execute("SELECT seq FROM records")}

    def check_delivery(self) -> None:
        """Every record a device committed in this run is in the cloud or still in its queue
        (waiting for the next start): its seqs, numbered one after another, show no gap."""
        for d in self.devices:
            cloud_seqs, queued = self.cloud_seqs(d), self.queued(d)
            seen = cloud_seqs | queued
            gaps = set(range(min(seen), max(seen) + 1)) - seen
            assert not gaps, f"{d}: records lost: {sorted(gaps)[:10]}"
            if d == FALLBACK:  # some went to the cloud directly
                assert self.gateway_seqs(d) <= cloud_seqs, d
            else:
                assert cloud_seqs == self.gateway_seqs(d), d

    async def release_through_gateway(self, version: str) -> None:
        """An agent release assigned to a device behind the gateway: the gateway fetches it
        from the cloud once, before the device sees the assignment, and serves it; the device's
        own staging code (agent/ota/updater.py) downloads it from the gateway and verifies the
        signature with the release key."""
        cloud("releases", "keygen", "--data", str(self.data))
        bundle = make_bundle(self.tmp / f"bundle-{version}")
        cloud("releases", "publish", str(bundle), "--version", version, "--data", str(self.data))
        cloud("releases", "assign", version, "--device", PROBE, "--data", str(self.data))

        def at_gateway() -> tuple[Any, bool] | None:
            """The probe's agent/version as the gateway serves it, and whether it has the
            release; None until the assignment is mirrored."""
            gw = SQLiteStorage(self.gw_dir / "store" / "cloud.sqlite3")
            try:
                entry = gw.desired(PROBE).entries.get("agent/version")
                if entry is None or entry.value["version"] != version:
                    return None
                return entry.value, gw.release(version) is not None
            finally:
                gw.close()

        value, has_release = await until(at_gateway, 120, "the assignment at the gateway")
        assert has_release  # the document reached the gateway's store after the release did
        sha = value["sha256"]
        sec = ClientSecurity.open(
            "oscore", [self.gateway_uri], self.tmp / "probe-credential.json",
            self.tmp / "probe-oscore.json",
        )  # fmt: skip
        transport = CoapTransport(RealClock(), lanes=2, uris=[self.gateway_uri], security=sec)
        fetcher = ReleaseFetcher(transport, self.gateway_uri, ack_timeout=0.3, block_deadline=20.0)
        try:
            key = load_public_key(self.data / "releases" / "release.key.pub")
            staged = await stage(
                fetcher, version=version, sha256=sha, key=key, data_dir=self.tmp / "probe-data"
            )
        finally:
            await transport.close()
        assert staged.manifest.sha256 == sha
        cached = (
            (self.tmp / "gateway.log")
            .read_text()
            .count(f"event=gateway_release_cached version={version} ")
        )
        assert cached == 1, cached  # one download from the cloud

    def reported(self, device: str, key: str) -> Any:
        s = SQLiteStorage(self.data / "cloud.sqlite3")
        try:
            entry = s.reported(device).get(key)
            return None if entry is None else entry.value
        finally:
            s.close()


async def test_gateway_relays_records_state_and_models_exactly_once(tmp_path: Path) -> None:
    site = Site(tmp_path)
    # both links lose datagrams: devices -> gateway and gateway -> cloud through the proxy
    lossy = Impairment(loss=0.05, dup=0.01)
    async with (
        LinkEmulator(listen=("127.0.0.1", 0), target=("127.0.0.1", site.gw_port),
                     impairment=lossy, seed=3) as lan,
        LinkEmulator(listen=("127.0.0.1", 0), target=("127.0.0.1", site.cloud_port),
                     impairment=lossy, seed=4) as up,
    ):  # fmt: skip
        site.lan_port, site.up_port = lan.port, up.port
        await _run(site, tmp_path)


async def _run(site: Site, tmp_path: Path) -> None:
    site.setup()
    site.start_cloud()
    try:
        site.start_site()
        await site.records_in_cloud(50, 120)
        # an edge decision one LAN hop away: the gateway's full-precision model answers /infer
        sec = ClientSecurity.open(
            "oscore", [site.gateway_uri], tmp_path / "probe-credential.json",
            tmp_path / "probe-oscore.json",
        )  # fmt: skip
        t = CoapTransport(RealClock(), lanes=1, uris=[site.gateway_uri], security=sec)
        try:
            body = cbor2.dumps({"model": "skab-ae", "window": [0.1] * 32})
            resp = await t.request("POST", f"{site.gateway_uri}/infer/{PROBE}", body,
                                   content_format=CF_CBOR, deadline=20.0)  # fmt: skip
        finally:
            await t.close()
        assert resp.dotted == "2.05", resp
        assert cbor2.loads(resp.payload)["precision"] == "float32"
        # a SIGKILL of the gateway: devices queue meanwhile, nothing is lost or doubled
        await site.kill_gateway(3)
        # the cloud goes away: the gateway acks its devices and keeps what it cannot forward
        stop(site.cloud_proc)
        before = {d: len(site.gateway_seqs(d)) for d in DEVICES}
        await until(lambda: all(len(site.gateway_seqs(d)) > before[d] + 20 for d in DEVICES), 60,
                    "the gateway answering for its devices while the cloud is down")  # fmt: skip
        # a desired change made while the cloud is down
        cloud("desired", "set", "--data", str(site.data), "--device", DEVICES[0],
              "sensor/motor/interval=2")  # fmt: skip
        site.start_cloud()
        await until(lambda: site.reported(DEVICES[0], "sensor/motor/interval") == 2.0, 90,
                    "the desired change applied on the device and reported back up")  # fmt: skip
        # a model version assigned to every device: one download by the gateway
        await site.model_everywhere("1.0.1", 120)
        # an agent release for a device behind it: one download by the gateway, served by it
        await site.release_through_gateway("2.0.0")
        # the gateway goes away for longer: a device that lists the cloud second falls back to it
        # and returns to the gateway once it is back (one storage identity: both are accepted)
        stop(site.gw_proc)
        await until(
            lambda: len(site.cloud_seqs(FALLBACK) - site.gateway_seqs(FALLBACK)) > 10, 120,
            "the device's records going to the cloud directly",
        )  # fmt: skip
        site.start_gateway()
        mark = len(site.gateway_seqs(FALLBACK))
        await until(lambda: len(site.gateway_seqs(FALLBACK)) > mark + 20, 120,
                    "the device back on the gateway")  # fmt: skip
        # stop the devices, let the gateway drain: every committed record is in the cloud once
        await site.finish()
    finally:
        site.close()


class BareSite(Site):
    """The cloud and the gateway, no devices."""

    devices = ()


@pytest.mark.parametrize("table", ["gateway", "gateway.peers"])
async def test_a_gateway_on_a_port_in_use_exits_75_with_one_line(tmp_path: Path, table: str):
    """The device-facing port and the peers' port are checked free as the endpoint's is (another
    server holds it with SO_REUSEPORT, as aiocoap binds): one line on stderr naming the address,
    exit 75 (EX_TEMPFAIL, systemd restarts it later), no traceback. Before, the device-facing
    port's line went to stdout with exit 1, and a server started on the peers' port."""
    site = BareSite(tmp_path)
    site.setup()
    config = tmp_path / "gateway.toml"
    with reuseport_sockets(1) as held:
        (port,) = held
        text = config.read_text()
        if table == "gateway":
            text = text.replace(f"127.0.0.1:{site.gw_port}", f"127.0.0.1:{port}")
        else:
            text += f'[gateway.peers]\nlisten = "127.0.0.1:{port}"\npeers = []\n'
        config.write_text(text)
        site.start_cloud()
        try:
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "agent.service.cli", "gateway", "--config", str(config)],
                cwd=ROOT, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        finally:
            site.close()
    assert result.returncode == 75, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("edge-agent") and "event=" not in last, last
    assert f"127.0.0.1:{port} is in use by another process" in last, last


async def test_a_gateway_waiting_for_the_cloud_at_its_first_start_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """Before it first listens the gateway waits for the cloud's storage identity; a SIGTERM
    meanwhile was ignored (it retried every 5 s until killed), so systemd's stop timed out."""
    site = BareSite(tmp_path)
    site.setup()  # the cloud is never started
    site.start_gateway()
    assert site.gw_proc is not None
    try:
        log = tmp_path / "gateway.log"
        await until(
            lambda: "event=gateway_waiting_for_cloud" in log.read_text(), 60, "the first wait"
        )
        site.gw_proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(site.gw_proc.wait, 20)
    finally:
        site.close()
    assert code == 0
    text = log.read_text()
    assert "event=gateway_stopped while=starting" in text and "Traceback" not in text

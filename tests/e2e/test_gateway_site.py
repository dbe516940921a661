"""A site behind one gateway, at full size (marked ``long``: about five minutes; not in
``./tools/dev test``'s default run, which has the short version, tests/e2e/test_gateway.py).
Run it with ``./tools/dev test -m long tests/e2e/test_gateway_site.py`` (root: namespaces).

Twenty agents on the simulated rig and the gateway run in a network namespace (the plant
network); the cloud endpoint runs in the root namespace (beyond the uplink). The uplink is the
namespace's veth shaped with tc tbf (256 kbit/s) plus the impairment proxy (tools/linkem.py: 5 %
loss, 40 ms each way) in front of the endpoint; the devices reach the gateway through another
proxy in the namespace (3 % loss, 1 % duplication). The gateway is SIGKILLed and restarted, then the
uplink is cut for two minutes, during which an operator changes a device's desired state (it
reaches the device once the uplink returns). Then a model version is assigned to all twenty:
the gateway downloads it once and every device installs it. At the end every record each device
committed is stored in the cloud exactly once (acknowledged by the gateway, which acknowledges
after its commit) or still queued on the device for its next start, with no gap in any device's
sequence numbers, and the cloud holds exactly the gateway's records.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from linkem import Impairment, LinkEmulator

from tests.e2e.test_gateway import ROOT, Site, cloud, stop, until
from tools.chaos.harness import free_udp_port
from tools.fleetnet import Topology, available

pytestmark = [pytest.mark.long, pytest.mark.timeout(900)]

DEVICES = tuple(f"pump-{i:02d}" for i in range(1, 21))
OUTAGE = 120.0  # seconds without uplink
RATE = "256kbit"


class NamespaceSite(Site):
    devices = DEVICES
    time_scale = 1.0

    def __init__(self, tmp: Path, net: Topology) -> None:
        super().__init__(tmp)
        self.net = net
        self.site_prefix = ("ip", "netns", "exec", net.names["dev"])
        self.proxy_port = 0

        self.lan_port = free_udp_port()  # the devices' side: the impairment proxy in the namespace
        self.lan_proxy: subprocess.Popen[bytes] | None = None

    def upstream(self) -> str:
        return f"coap://{self.net.root_addr('dev')}:{self.proxy_port}"

    def start_site(self) -> None:
        """The LAN too loses datagrams: the devices reach the gateway through the proxy."""
        argv = [sys.executable, str(ROOT / "tools" / "linkem.py"), "run", "--listen",
                f"127.0.0.1:{self.lan_port}", "--target", f"127.0.0.1:{self.gw_port}",
                "--loss", "3%", "--dup", "1%", "--seed", "11"]  # fmt: skip
        self.lan_proxy = self.net.popen("dev", argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
        super().start_site()

    def close(self) -> None:
        super().close()
        stop(self.lan_proxy)


async def test_twenty_devices_behind_a_gateway_through_a_sigkill_and_a_two_minute_outage(
    tmp_path: Path,
) -> None:
    why = available()
    assert why is None, f"network namespaces are needed: {why}"
    with Topology() as net:
        site = NamespaceSite(tmp_path, net)
        uplink = f"{net.tag}devi"  # the namespace's end of its veth: traffic toward the cloud
        tbf = ["tc", "qdisc", "add", "dev", uplink, "root", "tbf", "rate", RATE, "burst", "32kbit",
               "latency", "400ms"]  # fmt: skip
        await asyncio.to_thread(subprocess.run, net.argv("dev", tbf), check=True)
        imp = Impairment(loss=0.05, delay=0.04)
        async with LinkEmulator(
            listen=(net.root_addr("dev"), 0), target=("127.0.0.1", site.cloud_port),
            impairment=imp, seed=7,
        ) as proxy:  # fmt: skip
            site.proxy_port = proxy.port
            site.setup()
            site.start_cloud()
            try:
                site.start_site()
                await site.records_in_cloud(20, 180)
                await site.kill_gateway(5)
                await asyncio.sleep(10)
                proxy.outage(True)
                before = {d: len(site.gateway_seqs(d)) for d in DEVICES}
                await asyncio.sleep(OUTAGE / 2)
                # a desired change made while the uplink is down
                cloud("desired", "set", "--data", str(site.data), "--device", DEVICES[0],
                      "sensor/motor/interval=2")  # fmt: skip
                await asyncio.sleep(OUTAGE / 2)
                grew = {d: len(site.gateway_seqs(d)) - before[d] for d in DEVICES}
                assert all(n > 0 for n in grew.values()), grew  # the site kept working
                assert site.reported(DEVICES[0], "sensor/motor/interval") != 2.0
                proxy.outage(False)
                await until(
                    lambda: site.reported(DEVICES[0], "sensor/motor/interval") == 2.0,
                    180,
                    "the change made during the outage applied and reported",
                )
                # a model version for all twenty: one download over the uplink
                await site.model_everywhere("1.0.1", 300)
                await site.finish()
            finally:
                site.close()

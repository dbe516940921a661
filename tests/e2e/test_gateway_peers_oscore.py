"""Two real gateways of one site (agent/gateway/service.py from their config files, a real
endpoint on loopback for their way up) replicating their peer state under the site secret
(``[gateway.peers] secret``): they converge through their own loops, their contexts' state is
in each data directory, and a plain CoAP client gets 4.01 from both."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from agent.gateway.peersecurity import write_secret
from agent.gateway.service import Gateway
from agent.gateway.settings import load_gateway_config
from agent.service.notify import Health
from agent.service.supervise import Supervisor
from cloud.server import CloudServer
from drivers.clock import RealClock
from tests.e2e.test_gateway_loops import within
from tools.chaos.harness import free_udp_port

NAMES = ("gw-east", "gw-west")


@pytest.mark.timeout(90)
async def test_two_gateways_with_the_site_secret_converge_and_refuse_plain_coap(
    tmp_path: Path,
) -> None:
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    key = tmp_path / "site.key"
    write_secret(key)
    ports = {name: free_udp_port() for name in NAMES}
    gateways: list[Gateway] = []
    running: list[asyncio.Task[int]] = []
    plain = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for name in NAMES:
            data = tmp_path / name
            (data / "devices").mkdir(parents=True)
            device = f"pump-{name}"
            (await server.register(device)).write(data / "devices" / f"{device}.json")
            (await server.register(name, "gateway")).write(data / "credential.json")
            await server.attach(name, [device])
            (other,) = (n for n in NAMES if n != name)
            (tmp_path / f"{name}.toml").write_text(
                f'[agent]\ndevice_id = "{name}"\ndata_dir = "{data}"\n'
                f'[uplink]\nendpoints = ["{server.uri}"]\n'
                '[gateway]\nlisten = "127.0.0.1:0"\n'
                f'[gateway.peers]\nlisten = "127.0.0.1:{ports[name]}"\nperiod = 0.2\n'
                f'peers = {{ {other} = "coap://127.0.0.1:{ports[other]}" }}\n'
                f'secret = "{key}"\n'
            )
            clock = RealClock()
            gw = Gateway(
                load_gateway_config(tmp_path / f"{name}.toml"), Supervisor(clock, Health(clock))
            )
            gateways.append(gw)
            running.append(asyncio.create_task(gw.run()))
        east, west = gateways
        await within(
            20.0, lambda: east.peer_state is not None and west.peer_state is not None, "up"
        )
        assert east.peer_state is not None and west.peer_state is not None
        east.peer_state.set("config/rate", 10)
        west.peer_state.increment("count/alerts", 2)
        want = {"config/rate": 10, "count/alerts": 2}
        await within(
            30.0,
            lambda: east.peer_state.snapshot() == west.peer_state.snapshot() == want,  # type: ignore[union-attr]
            "converged",
        )
        # each has accepted requests of the other (the one exchange that converged them may
        # have been either's): the epoch and replay window each keeps for its peer
        east_from_west = tmp_path / "gw-east" / "peer-oscore" / "from-gw-west.json"
        west_from_east = tmp_path / "gw-west" / "peer-oscore" / "from-gw-east.json"
        await within(10.0, lambda: east_from_west.exists() and west_from_east.exists(), "both")
        for name in NAMES:
            msg = aiocoap.Message(code=Code.GET, uri=f"coap://127.0.0.1:{ports[name]}/peer/digest")
            answer = await asyncio.wait_for(plain.request(msg).response, 10)
            assert answer.code == Code.UNAUTHORIZED
    finally:
        await plain.shutdown()
        for gw in gateways:
            gw.stop()
        for task in running:
            await task
        await server.stop()

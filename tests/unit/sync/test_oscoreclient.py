"""agent/sync/oscoreclient.py: the agent's client contexts use aiocoap's OSCORE transport with a
fixed task name, in the place aiocoap put its own, and OSCORE requests (a Block1 batch among
them) go through it to a real endpoint on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiocoap.transports.oscore import TransportOSCORE

from agent.sync.oscoreclient import TASK_NAME, OscoreRequests
from cloud.server import CloudServer
from tests.e2e.test_security import Principal

DEVICE = "pump-01"


@pytest.mark.timeout(60)
async def test_a_client_context_sends_oscore_through_the_agents_transport(
    endpoint: CloudServer, tmp_path: Path
) -> None:
    device = await Principal(endpoint, tmp_path, DEVICE).open()
    try:
        assert device.transport is not None
        ctx = await device.transport._context(0)
        kinds = [type(i) for i in ctx.request_interfaces]
        assert kinds[0] is OscoreRequests  # first, as aiocoap puts its own
        assert TransportOSCORE not in kinds and kinds.count(OscoreRequests) == 1
        names: set[str] = set()
        request = asyncio.ensure_future(device.req("GET", f"devices/{DEVICE}"))
        while not request.done():
            names.update(t.get_name() for t in asyncio.all_tasks())
            await asyncio.sleep(0)
        assert request.result().dotted == "2.05"
        assert TASK_NAME in names
        assert not any(n.startswith(f"{TASK_NAME} ") for n in names)  # not aiocoap's name
        batch = await device.req("POST", f"ingest/{DEVICE}", bytes(3000), cf=112)  # Block1
        assert batch.dotted == "4.00", batch  # all 3 blocks through OSCORE, then not SenML
    finally:
        await device.close()

"""Fixtures of the end-to-end tests. A module that needs the endpoint started otherwise defines
its own ``server`` (it overrides this one); ``client`` is a plain CoAP client context."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import pytest

from cloud.server import CloudServer


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    """The endpoint as it runs by default (OSCORE required), on a free loopback port."""
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    yield srv
    await srv.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    """A plain CoAP client context (UDP), shut down after the test."""
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield ctx
    await ctx.shutdown()

"""Fixtures shared by unit tests that talk to a real endpoint over loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud.server import CloudServer


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[CloudServer]:
    """The endpoint as it runs by default (OSCORE required), on a free loopback port."""
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    yield srv
    await srv.stop()

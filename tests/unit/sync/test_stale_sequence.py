"""A request that reaches the endpoint behind a newer one of the same device (another lane's, or
the request that set up the endpoint's replay window after a restart) carries a sequence number
the endpoint takes for a replay: aiocoap answers an unprotected 4.01. The transport sends such a
request once more under a fresh number (agent/sync/transport.py, ``STALE_RETRIES``), so the
exchange succeeds instead of counting as a failure; a context the endpoint refuses for good
still fails, after that one retry. Real endpoint, real OSCORE client, loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import SyncError
from cloud.server import CloudServer
from tests.e2e.test_security import Principal

DEVICE = "pump-01"


def _lag_once(device: Principal, behind: int) -> None:
    """The next request is protected with a number ``behind`` below the last one used (as if it
    had been protected first and arrived last); later ones draw from the sequence again."""
    assert device.security is not None
    ctx = device.security._client.context
    taken = ctx.new_sequence_number

    def stale() -> int:
        ctx.new_sequence_number = taken
        return taken() - behind

    ctx.new_sequence_number = stale


@pytest.mark.timeout(60)
async def test_a_request_behind_the_endpoints_window_is_sent_again_and_succeeds(
    endpoint: CloudServer, tmp_path: Path
) -> None:
    device = await Principal(endpoint, tmp_path, DEVICE).open()
    try:
        for _ in range(40):  # the endpoint's window (32 numbers) moves past the first ones
            assert (await device.req("GET", f"devices/{DEVICE}")).dotted == "2.05"
        assert device.transport is not None and device.transport.stale_retries == 0
        _lag_once(device, 36)
        resp = await device.req("GET", f"devices/{DEVICE}")
        assert resp.dotted == "2.05" and resp.attempts == 2  # two round trips: not an RTT sample
        assert device.transport.stale_retries == 1
        again = await device.req("GET", f"devices/{DEVICE}")
        assert again.attempts == 1 and device.transport.stale_retries == 1
    finally:
        await device.close()


@pytest.mark.timeout(60)
async def test_a_refused_context_fails_after_one_retry(
    endpoint: CloudServer, tmp_path: Path
) -> None:
    device = await Principal(endpoint, tmp_path, DEVICE).open()
    try:
        assert (await device.req("GET", f"devices/{DEVICE}")).dotted == "2.05"
        assert await endpoint.revoke(DEVICE)
        with pytest.raises(SyncError, match=r"answer 4\.01 without OSCORE"):
            await device.req("GET", f"devices/{DEVICE}")
        assert device.transport is not None and device.transport.stale_retries == 1
    finally:
        await device.close()

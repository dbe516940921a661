"""Bounds of the router's bookkeeping (agent/sync/routing.py) over a long uptime.

Validations of low-confidence alerts wait in ``Router.pending`` (and in routing.json) until the
endpoint answers a verdict. While the link does not allow the cloud (the link policy of "low" and
"offline": a site on a poor link, an outage of weeks), or while the endpoint keeps answering 4.04
(it has no full-precision version of the device's model: not a final answer), none completes, and
every unsure alert used to add one request, window and all, for as long as the agent ran: memory,
the file rewritten on every save, and one more request per backoff period once the link allows it.
Now the newest ``MAX_PENDING_VALIDATIONS`` are kept; the alerts themselves are in the store either
way."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from agent.sync import routing as routing_mod
from agent.sync.routing import Router, RoutingSettings
from agent.sync.transport import CoapTransport
from drivers.clock import VirtualClock
from tests.unit.sync.test_routing_hostile import an_alert  # unsure: confidence 0.2

pytestmark = pytest.mark.timeout(60)

DEVICE = "pump-23"


def router(tmp_path: Path, clock: VirtualClock) -> Router:
    return Router(
        RoutingSettings(state_path=tmp_path / "routing.json"),
        device_id=DEVICE,
        store=None,
        transport=CoapTransport(clock),
        endpoint="coap://127.0.0.1:9",
        link_allows_cloud=lambda: False,  # a link that stays "low" or "offline"
        clock=clock,
        rng=random.Random(1),
    )


async def test_pending_validations_stay_bounded_while_the_link_never_allows_the_cloud(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routing_mod, "MAX_PENDING_VALIDATIONS", 16, raising=False)
    clock = VirtualClock()
    r = router(tmp_path, clock)
    window = np.zeros(32, dtype=np.float32)
    n = 200
    for seq in range(1, n + 1):
        r.on_alert(an_alert(), seq, window)
        await r.step()  # saves routing.json; sends nothing (the link does not allow it)
    assert len(r.pending) == 16
    assert sorted(r.pending) == list(range(n - 15, n + 1))  # the newest are kept
    assert r.stats.counts["validations_dropped"] == n - 16
    saved = json.loads((tmp_path / "routing.json").read_text())
    assert [p["seq"] for p in saved["pending"]] == list(range(n - 15, n + 1))


async def test_a_state_file_over_the_bound_is_trimmed_on_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A routing.json an earlier version wrote without the bound."""
    pending = [
        {"seq": s, "alert": an_alert().to_dict(), "window": [0.0], "attempts": 3}
        for s in range(1, 41)
    ]
    (tmp_path / "routing.json").write_text(
        json.dumps({"format": routing_mod.STATE_FORMAT, "pending": pending, "verdicts": []})
    )
    monkeypatch.setattr(routing_mod, "MAX_PENDING_VALIDATIONS", 16, raising=False)
    r = router(tmp_path, VirtualClock())
    assert sorted(r.pending) == list(range(25, 41))

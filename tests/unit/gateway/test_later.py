"""The pauses of agent/gateway/later.py: a device whose relay entries the cloud refuses with
another code than 5.03 is paused REFUSED_PAUSE, doubled at each refusal that follows up to
REFUSED_MAX_PAUSE, said once per episode; an acknowledged entry ends the episode."""

from __future__ import annotations

import logging

import pytest

from agent.gateway import later


@pytest.mark.timeout(10)
def test_a_refused_device_is_paused_longer_each_time_up_to_the_cap_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = [100.0]
    held = later.Later(lambda: t[0])
    pauses = []
    with caplog.at_level(logging.DEBUG, logger="agent.gateway"):
        for _ in range(7):
            held.refuse("pump-01", "4.03", "pump-01 is not attached to gw-1", 3)
            held.refuse("pump-01", "4.03", "pump-01 is not attached to gw-1", 3)  # same pass
            assert held.paused() == {"pump-01"}
            pauses.append(held.until["pump-01"] - t[0])
            t[0] = held.until["pump-01"]
        assert held.paused() == set()
        said = [r for r in caplog.records if "event=forward_refused " in r.getMessage()]
        assert len(said) == 1 and "gateways attach" in said[0].getMessage()
        assert said[0].levelno == logging.WARNING
        held.taken("pump-01")
        assert "event=forward_refused_over device=pump-01" in caplog.text
        held.taken("pump-01")  # an episode ends once
        assert caplog.text.count("event=forward_refused_over") == 1
        held.refuse("pump-01", "4.04", "no such device", 1)  # a new episode: said, 5 min
        assert held.until["pump-01"] - t[0] == later.REFUSED_PAUSE
    assert pauses == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0, 3600.0]
    assert held.refusals == 15
    said = [r for r in caplog.records if "event=forward_refused " in r.getMessage()]
    assert len(said) == 2 and "devices add" in said[1].getMessage()

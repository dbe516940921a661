"""The link monitor's classifier, its [link] config and the policy it applies to the uplink.

Exchanges are fed as the uplink reports them (no network): the classifier is a pure function of
the reported outcomes and the clock."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.service import config as configmod
from agent.service.config import example_config
from agent.store.queue import Store
from agent.store.settings import StoreSettings
from agent.sync.link import HIGH, LOW, MEDIUM, OFFLINE, LinkMonitor, LinkSettings, wilson
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Exchange, Uplink, UplinkSettings
from drivers.clock import VirtualClock


def ex(rtt: float = 0.01, *, ok: bool = True, retrans: bool = False) -> Exchange:
    return Exchange("coap://x", ok, rtt if ok else None, retrans, 500, 10, 10 if ok else 0)


def feed(m: LinkMonitor, n: int, **kw) -> None:
    for _ in range(n):
        m.observe(ex(**kw))


def test_wilson_bounds_contain_the_rate_and_narrow_with_samples():
    lo, hi = wilson(10, 100, 1.645)
    assert lo < 0.1 < hi
    lo2, hi2 = wilson(100, 1000, 1.645)
    assert lo < lo2 < 0.1 < hi2 < hi
    assert wilson(0, 0, 1.645) == (0.0, 1.0)


def test_climbs_from_medium_to_high_on_a_clean_link_then_falls_with_rtt_and_loss():
    m = LinkMonitor(LinkSettings(), VirtualClock())
    assert m.state == MEDIUM
    feed(m, 40)
    assert m.state == HIGH
    feed(m, 12, rtt=1.2)  # a slow link: the RTT passes medium_rtt first, then low_rtt
    assert m.state == LOW
    assert [t[:2] for t in m.transitions] == [(MEDIUM, HIGH), (HIGH, MEDIUM), (MEDIUM, LOW)]


def test_loss_alone_degrades_only_when_its_lower_bound_reaches_the_threshold():
    m = LinkMonitor(LinkSettings(initial="high"), VirtualClock())
    for _ in range(3):  # three retransmissions in the first exchanges: bad luck, not a rate
        m.observe(ex(retrans=True))
    feed(m, 5)
    assert m.state == HIGH
    rng = random.Random(2)
    for _ in range(200):
        m.observe(ex(retrans=rng.random() < 0.6))
    assert m.state == LOW


@pytest.mark.parametrize("seed", range(3))
def test_no_flapping_under_a_steady_loss_of_ten_percent_of_exchanges(seed: int):
    m = LinkMonitor(LinkSettings(initial="high"), VirtualClock())
    rng = random.Random(seed)
    for _ in range(5000):  # 5 % packet loss each way: about 10 % of exchanges retransmitted
        m.observe(ex(retrans=rng.random() < 0.0975))
    assert list(m.transitions) == []


def test_offline_needs_failures_and_silence_and_ends_at_the_first_answer():
    clock = VirtualClock()
    s = LinkSettings(initial="high", offline_failures=3, offline_silence=20.0)
    m = LinkMonitor(s, clock)
    feed(m, 10)
    for _ in range(5):  # five failures in quick succession: not yet 20 s of silence
        m.observe(ex(ok=False))
    assert m.state != OFFLINE
    clock.advance(21.0)
    m.observe(ex(ok=False))
    assert m.state == OFFLINE
    assert m.srtt is None and m.loss is None  # measured afresh once it is back
    for _ in range(3):
        m.observe(ex(ok=False))
    assert m.loss is None  # failures while offline are not loss of a working link
    m.observe(ex())
    assert m.state == LOW
    feed(m, 40)
    assert m.state == HIGH


def test_config_link_section_overrides_and_errors_name_the_key(tmp_path: Path):
    base = example_config().read_text()
    path = example_config()
    cfg = configmod.loads(
        base + '\n[link]\nhold = 5\nlow_rtt = 2.0\n[link.low]\nmodel = "full"\nbatch_bytes = 512\n',
        path=path,
    )
    assert cfg.link.hold == 5 and cfg.link.low_rtt == 2.0
    assert cfg.link.policy(LOW).model == "full" and cfg.link.policy(LOW).batch_bytes == 512
    assert cfg.link.policy(LOW).content_format == 65002  # the rest stays default
    assert cfg.link.policy(HIGH).content_format == 112
    cases = {
        "[link.low]\ncontent_format = 7\n": "agent.toml: link.low.content_format: 7 is not one of",
        "[link]\nlow_rtt = 0.1\n": "agent.toml: link.low_rtt: 0.1 must be above medium_rtt",
        "[link.poor]\nsend = false\n": "agent.toml: link.poor: unknown key",
        "[link.offline]\nsend = 1\n": "agent.toml: link.offline.send: expected true or false",
        "[link.medium]\nbatch_bytes = 100000\n": "agent.toml: link.medium.batch_bytes: 100000 is",
    }
    for extra, message in cases.items():
        with pytest.raises(ConfigError) as err:
            configmod.loads(base + "\n" + extra, path=Path("agent.toml"))
        assert str(err.value).startswith(message), str(err.value)


async def test_a_state_change_applies_the_policy_to_the_uplink(tmp_path: Path):
    clock = VirtualClock()
    store = await Store.open(StoreSettings(path=tmp_path / "q.db"))
    settings = UplinkSettings(endpoints=("coap://127.0.0.1:9",), max_inflight=4)
    transport = CoapTransport(clock, lanes=4)
    up = Uplink(
        settings, store, transport, Endpoints(settings.endpoints, clock), clock, device_id="d"
    )
    try:
        m = LinkMonitor(LinkSettings(initial="high"), clock, uplink=up)
        policy = up.policy
        assert (policy.content_format, policy.batch_bytes, policy.max_inflight) == (112, 65536, 4)
        assert m.tier == "full" and m.cloud_validation
        feed(m, 12, rtt=1.5)
        assert m.state == LOW
        assert (up.policy.content_format, up.policy.batch_bytes) == (65002, 1024)
        assert m.tier == "lite" and not m.cloud_validation
        clock.advance(60.0)
        for _ in range(3):
            m.observe(ex(ok=False))
        assert m.state == OFFLINE and up.policy.hold
        m.observe(ex())
        assert m.state == LOW and not up.policy.hold
        status = m.status()
        assert status["state"] == LOW and status["policy"]["content_format"] == 65002
        assert status["transitions"] == 3
    finally:
        await transport.close()
        await store.close()


def test_a_tier_the_analyzer_refuses_is_said_once_and_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A lightweight model the analyzer refuses (agent/detect/analyzer.py: it is not primed
    again until another is loaded): the link asks again at each state change and probe, as it
    should (another model may have come), but said the refusal at each of them, a warning every
    30 s for as long as the link stayed poor. Now once per refusal; a new one is said again."""
    asked: list[str] = []
    why = ["model 'lite': refused"]

    class Analyzer:
        def set_tier(self, tier: str) -> None:
            asked.append(tier)
            if why[0]:
                raise ValueError(why[0])

    m = LinkMonitor(LinkSettings(), VirtualClock(), analyzer=Analyzer)
    lite = next(s for s in (HIGH, MEDIUM, LOW) if m.settings.policy(s).model == "lite")
    m.state = lite
    asked.clear()  # (the initial state's tier, asked at start)
    caplog.clear()
    for _ in range(3):
        m._apply_tier()
    why[0] = "model 'lite 2': refused"
    m._apply_tier()
    said = [r for r in caplog.records if "event=model_tier_failed" in r.getMessage()]
    assert len(asked) == 4 and len(said) == 2
    why[0] = ""
    m._apply_tier()
    m._apply_tier()  # applied: not asked again
    assert len(asked) == 5

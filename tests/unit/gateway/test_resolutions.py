"""The steps a gateway learns from its devices' compact batches (agent/gateway/resolutions.py)
are bounded per device and in total, in memory and in ``resolutions.json``.

Attack named: a compromised device (a valid credential) naming a new channel in each of its
batches, to grow the gateway's table and the file written at every pass without end (a probe
before the bound: 500 batches, 462 entries, a 12 KB file, growing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.gateway import resolutions
from agent.gateway.resolutions import RESOLUTIONS_FILE, Resolutions
from agent.wire import codec
from agent.wire.batch import WireRecord
from agent.wire.compact_format import CF_COMPACT_DEFLATE
from agent.wire.records import TelemetryBody

T0 = 1_700_000_000.0


def batch(channel: str, step: float = 0.01) -> bytes:
    """A device's compact batch of one reading of ``channel`` on a grid of ``step``."""
    rec = WireRecord(1, "telemetry", T0, TelemetryBody("m", T0, {channel: 1.5}).to_cbor())
    return codec.encode_batch(None, [rec], CF_COMPACT_DEFLATE, resolution=lambda s, c: step)


async def test_a_device_naming_ever_new_channels_keeps_only_its_most_recent(
    tmp_path: Path,
) -> None:
    learned = Resolutions(tmp_path)
    learned.observe("pump-01", CF_COMPACT_DEFLATE, batch("a"))
    for i in range(500):
        learned.observe("evil", CF_COMPACT_DEFLATE, batch(f"c{i}"))
        learned.observe("pump-01", CF_COMPACT_DEFLATE, batch("a"))  # still in use: kept
    await learned.save()
    assert len(learned.steps["evil"]) == resolutions.MAX_CHANNELS
    assert ("m", "c499") in learned.steps["evil"] and ("m", "c0") not in learned.steps["evil"]
    assert learned.of("pump-01")("m", "a") == 0.01
    assert learned.evicted == 500 - resolutions.MAX_CHANNELS
    again = Resolutions(tmp_path)  # the file holds what memory does, in the order of use
    assert again.steps == learned.steps and list(again.steps["evil"]) == list(learned.steps["evil"])
    again.observe("evil", CF_COMPACT_DEFLATE, batch("c300"))  # used again: the most recent
    again.observe("evil", CF_COMPACT_DEFLATE, batch("new"))
    assert ("m", "c300") in again.steps["evil"] and ("m", "c244") not in again.steps["evil"]
    # an evicted step is learned again from the device's next batch naming it
    again.observe("evil", CF_COMPACT_DEFLATE, batch("c0"))
    assert again.of("evil")("m", "c0") == 0.01


async def test_all_devices_together_are_bounded_the_least_recent_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolutions, "MAX_CHANNELS", 8)
    monkeypatch.setattr(resolutions, "MAX_STEPS", 20)
    learned = Resolutions(tmp_path)
    for device in ("d1", "d2", "d3"):
        for i in range(8):
            learned.observe(device, CF_COMPACT_DEFLATE, batch(f"c{i}"))
    sizes = {d: len(t) for d, t in learned.steps.items()}
    assert sizes == {"d1": 4, "d2": 8, "d3": 8}  # d1, seen least recently, gave up its oldest
    assert ("m", "c7") in learned.steps["d1"] and ("m", "c0") not in learned.steps["d1"]
    await learned.save()
    doc = json.loads((tmp_path / RESOLUTIONS_FILE).read_text())
    assert sum(len(rows) for rows in doc.values()) == 20


def test_a_file_beyond_the_bounds_is_read_within_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [["m", f"c{i}", 0.01] for i in range(50)]
    (tmp_path / RESOLUTIONS_FILE).write_text(json.dumps({"evil": rows}))
    monkeypatch.setattr(resolutions, "MAX_CHANNELS", 10)
    learned = Resolutions(tmp_path)
    assert list(learned.steps["evil"]) == [("m", f"c{i}") for i in range(40, 50)]

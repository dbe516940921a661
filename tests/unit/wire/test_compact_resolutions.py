"""CompactDecoding.resolutions: the steps a batch quantizes to, read from its group table, so a
gateway forwarding the readings can encode them as compactly again (agent/gateway/relay.py)."""

from __future__ import annotations

import pytest

from agent.wire import codec
from agent.wire.batch import CodecError, WireRecord
from agent.wire.compact_format import CF_COMPACT, CF_COMPACT_DEFLATE, CF_COMPACT_DICT
from agent.wire.records import TelemetryBody

STEPS = {("motor", "current_a"): 0.001, ("motor", "voltage_v"): 0.01}


def _records() -> list[WireRecord]:
    out = []
    for i in range(20):
        values = {"current_a": round(2.0 + 0.001 * i, 3), "voltage_v": 230.0 + 0.01 * i,
                  "raw": 0.1 * i}  # fmt: skip
        body = TelemetryBody("motor", 1_700_000_000.0 + i, values).to_cbor()
        out.append(WireRecord(i + 1, "telemetry", 1_700_000_000.0 + i, body))
    return out


@pytest.mark.parametrize("cf", [CF_COMPACT, CF_COMPACT_DEFLATE, CF_COMPACT_DICT])
def test_resolutions_are_the_steps_the_encoder_used_and_reencoding_is_lossless(cf: int) -> None:
    recs = _records()
    data = codec.encode_batch(None, recs, cf, resolution=lambda s, c: STEPS.get((s, c)))
    enc = codec.encoding_for(cf)
    learned = enc.resolutions(data)
    assert learned == STEPS  # "raw" has no resolution: sent exactly, not listed
    _, decoded = codec.decode_batch(data, cf)
    again = codec.encode_batch(None, decoded, cf, resolution=lambda s, c: learned.get((s, c)))
    assert codec.decode_batch(again, cf)[1] == decoded
    exact = codec.encode_batch(None, decoded, cf)
    assert len(again) < len(exact)  # the point: the steps make it smaller


def test_resolutions_of_a_hostile_batch_is_a_codec_error() -> None:
    enc = codec.encoding_for(CF_COMPACT_DEFLATE)
    with pytest.raises(CodecError):
        enc.resolutions(b"\x01\x02garbage")

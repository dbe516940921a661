#!/usr/bin/env python3
"""Build the preset deflate dictionary of the compact batch encoding (content format 65002).

    .venv/bin/python tools/make_compact_dict.py            # rewrites agent/wire/compact_dict.py
    .venv/bin/python tools/make_compact_dict.py --check    # exit 1 if the shipped one differs

What a dictionary can do for a 1 KiB batch: deflate may copy strings from it (LZ77 history, up to
32 KiB back), but it learns nothing of symbol statistics from it (each batch sends its own
Huffman tables). So it pays off for what every batch repeats verbatim and what is too short to
repeat inside one small batch: the group table (sensor names, channel names, resolutions,
~190 bytes for the reference rig) and the start of the record structure (group ids, seq and time
deltas). It cannot help with the value residuals, which differ in every batch.

The dictionary is made only from synthetic data (never SKAB): the reference rig's configuration
(agent/examples/pump-rig.toml, resolutions of its drivers) fed by the synthetic pump model
(drivers.sim.sources.PumpModel, fixed seed). It holds, nearest the end (cheapest to reach)
last:

1. the group descriptors of every driver's default channels at their typical resolutions,
   the vocabulary of other rigs;
2. the byte section (what deflate compresses) of a typical 1 KiB batch of the reference rig;
3. the group table of the reference rig with all sensors.

The output is deterministic (same bytes on every run); a test checks that the shipped module is
what this script makes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benches.codec import rig_resolutions  # noqa: E402

from agent.service import config as configmod  # noqa: E402
from agent.service.config import example_config  # noqa: E402
from agent.wire.batch import WireRecord  # noqa: E402
from agent.wire.compact import (  # noqa: E402
    FLAG_SPLIT,
    FORMAT_VERSION,
    CompactEncoding,
    Resolution,
    table_bytes,
)
from agent.wire.records import TelemetryBody  # noqa: E402
from drivers.sim.sources import PumpModel  # noqa: E402

OUT = ROOT / "agent" / "wire" / "compact_dict.py"
DICTIONARY_ID = 1
SEED = 20240601
START = 1_700_000_000.0  # wall time of the synthetic run
SECONDS = 600
BATCH_BYTES = 1024
SAMPLE_AT = 300  # seconds into the run: the batch taken as typical starts here
# Typical resolutions of the drivers' default channels (units as the drivers report them).
VOCABULARY: dict[str, dict[str, float]] = {
    "accel": {"x_g": 0.0039, "y_g": 0.0039, "z_g": 0.0039, "vibration_rms_g": 0.0004875},
    "ambient": {"temperature_c": 0.01, "humidity_rh": 0.012, "pressure_hpa": 0.0256},
    "power": {
        "bus_voltage_v": 0.004,
        "shunt_voltage_v": 1e-05,
        "current_a": 0.0002,
        "power_w": 0.004,
    },
    "adc": {"ain0_v": 0.0001875, "ain1_v": 0.0001875, "ain2_v": 0.0001875, "ain3_v": 0.0001875},
    "thermocouple": {"hot_junction_c": 0.0625, "cold_junction_c": 0.0625, "delta_c": 0.0625},
}


def synthetic_records(cfg: configmod.Config) -> list[WireRecord]:
    """The reference rig's telemetry for SECONDS of the synthetic pump, as the agent stores it:
    one record per sensor per sample at its interval, seqs from wall-clock microseconds."""
    model = PumpModel(seed=SEED, dt=1.0)
    records: list[WireRecord] = []
    seq = int(START * 1_000_000)
    for second in range(SECONDS):
        values = model.values_at(float(second))
        t = START + second
        for s in cfg.sensors:
            if second % max(1, round(s.interval)):
                continue
            reading = {ch: values[s.signals[ch]] for ch in s.channels}
            records.append(
                WireRecord(seq, "telemetry", t, TelemetryBody(s.name, t, reading).to_cbor())
            )
            seq += 1
    return records


def typical_section(records: list[WireRecord], resolution: Resolution) -> bytes:
    """The byte section of the 1 KiB batch (as the encoder fills it) starting at SAMPLE_AT."""
    enc = CompactEncoding(65001, "dictionary-builder", deflate=True)
    start = next(i for i, r in enumerate(records) if r.created >= START + SAMPLE_AT)
    lo, hi = 1, len(records) - start + 1  # lo fits, hi does not
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        batch = records[start : start + mid]
        if len(enc.encode(None, batch, resolution=resolution)) <= BATCH_BYTES:
            lo = mid
        else:
            hi = mid
    return enc.sections(None, records[start : start + lo], resolution=resolution)[0]


def build() -> bytes:
    cfg = configmod.load(example_config())
    steps = rig_resolutions(cfg)

    def resolution(sensor: str, channel: str) -> float | None:
        return steps.get((sensor, channel))

    records = synthetic_records(cfg)
    vocabulary = b"".join(
        table_bytes([(name, list(chans), list(chans.values()))])
        for name, chans in VOCABULARY.items()
    )
    section = typical_section(records, resolution)
    groups = sorted({(s.name, s.channels) for s in cfg.sensors})
    table = table_bytes(
        [(name, list(chans), [steps[(name, c)] for c in chans]) for name, chans in groups]
    )
    return vocabulary + section + bytes((FORMAT_VERSION, FLAG_SPLIT)) + table


def module_text(data: bytes) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    lines = textwrap.wrap(b64, 96)
    body = "\n".join(f'    "{line}"' for line in lines)
    return (
        '"""Preset deflate dictionaries of the compact batch encoding (content format 65002).\n\n'
        "Generated by tools/make_compact_dict.py from synthetic data (see there); do not edit.\n"
        f"Dictionary {DICTIONARY_ID}: {len(data)} bytes, "
        f"SHA-256 {hashlib.sha256(data).hexdigest()}.\n"
        '"""\n\n'
        "from __future__ import annotations\n\n"
        "import base64\n\n"
        "_DICTIONARY_1 = (\n"
        f"{body}\n"
        ")\n\n"
        "DICTIONARIES: dict[int, bytes] = {1: base64.b64decode(_DICTIONARY_1)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped module")
    args = parser.parse_args(argv)
    text = module_text(build())
    if args.check:
        same = OUT.read_text(encoding="utf-8") == text
        print("agent/wire/compact_dict.py is " + ("up to date" if same else "OUT OF DATE"))
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Bench of the batch encodings (agent/wire/codec.py, agent/wire/compact.py) on a SKAB replay.

Every SKAB CSV (``--data DIR``, else $EDGE_AGENT_SKAB, else ../shared/data/skab beside the
checkout) is replayed as the reference rig (agent/examples/pump-rig.toml) would record it: one
telemetry record per sensor per row (the seven sensors that have a SKAB signal; the ambient BME280
has none), the row's datetime as the reading time, sequence numbers from wall-clock microseconds
as the store assigns them. Every value is on its channel's real resolution grid, as the sampler
reports it: the driver's ``resolution(channel)`` times the scaling gain, as tests/hil/test_rig.py
computes it (a ``[sensor.resolution]`` override wins).

Measured side by side in one run, as bytes per reading (one channel value):

- high: SenML-CBOR (112) in batches of up to 64 KiB;
- medium: compact + deflate (65001) in batches of up to 8 KiB;
- low: compact + deflate + preset dictionary (65002) in batches of up to 1 KiB;
- compact (65000) without deflate, in batches of up to 1 KiB (what deflate and the dictionary add);

(the batch sizes of the link policy, issue 6; each batch as many records as fit its size, at most
4,096 records, the endpoint's limit), against

- JSON: one JSON object per channel value (device, sensor, channel, time, value; compact
  separators, one per line);
- the xz bound: ``xz -9e`` (lzma, preset 9 | PRESET_EXTREME) of the same quantized columns (the
  integers at each channel's resolution and the time in ms, whole replay, column by column), in
  three layouts (int64 values, int64 deltas, zigzag varint deltas): the smallest is the bound.

Every batch is decoded and checked: seqs and kinds, times to the millisecond, and each value
exactly as sent (``round(x / r)`` steps of ``r``, ``agent.wire.compact.quantize``, within ``r / 2``
of the CSV).
Encode and decode speeds are readings per second of CPU time on this host.

Without SKAB data the bench reports that it skipped, and why. Options (after the bench name):
``--data DIR``; ``--quick`` (two files of valve1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import lzma
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.sense.hardware import Hardware
from agent.service import config as configmod
from agent.service.config import example_config
from agent.sync.datapolicy import DataSettings
from agent.sync.featurize import fold
from agent.wire import codec
from agent.wire.batch import CF_SENML_CBOR, WireRecord
from agent.wire.compact import CF_COMPACT, CF_COMPACT_DEFLATE, CF_COMPACT_DICT
from agent.wire.features import covered
from agent.wire.packing import zigzag
from agent.wire.predict import quantize
from agent.wire.records import TelemetryBody
from benches import Result, workdir
from drivers.base import Options
from drivers.clock import VirtualClock
from drivers.sim.sources import SKAB_CHANNELS, SkabFile, read_skab_csv

MEASURES = (
    "bytes per reading of the SKAB replay at each link level (SenML-CBOR, compact+deflate, "
    "compact+deflate+dictionary), every value decoded back"
)
BASELINE = "one JSON object per reading, and the xz -9e bound of the same quantized columns"

ROOT = Path(__file__).resolve().parent.parent.parent
DEVICE = "pump-rig-01"
MAX_RECORDS = 4096  # the endpoint's limit of records per batch
LEVELS = (  # name, content format, batch bytes
    ("high", CF_SENML_CBOR, 64 * 1024),
    ("medium", CF_COMPACT_DEFLATE, 8 * 1024),
    ("low", CF_COMPACT_DICT, 1024),
    ("compact", CF_COMPACT, 1024),
)
ACCEPT_REDUCTION = 0.95  # the acceptance at the low level
ACCEPT_XZ_RATIO = 1.3


def rig_resolutions(cfg: configmod.Config) -> dict[tuple[str, str], float]:
    """(sensor, channel) -> step of every configured channel: the configured override, else the
    driver's resolution of the source channel times the scaling gain. Builds the drivers without
    opening any bus or port."""
    out: dict[tuple[str, str], float] = {}
    hw = Hardware(cfg, VirtualClock())
    try:
        for scfg, driver in hw.build():
            for ch in scfg.channels:
                if ch in scfg.resolution:
                    out[(scfg.name, ch)] = scfg.resolution[ch]
                    continue
                gain = abs(scfg.scaling[ch].gain) if ch in scfg.scaling else 1.0
                out[(scfg.name, ch)] = driver.resolution(scfg.source_of(ch)) * gain
    finally:
        hw.close()
    return out


def skab_dir(extra: argparse.Namespace) -> Path:
    if extra.data:
        return Path(extra.data)
    env = os.environ.get("EDGE_AGENT_SKAB")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "skab"


@dataclass
class Replay:
    records: list[WireRecord]
    values: int  # channel values in the records
    rows: int
    columns: dict[tuple[str, str], list[tuple[float, float]]]  # (sensor, channel) -> (t, x)
    resolution: dict[tuple[str, str], float]


def replay(files: Sequence[SkabFile], cfg: configmod.Config) -> Replay:
    """The rig's telemetry records for every row of ``files``, in order."""
    res = rig_resolutions(cfg)
    sensors = [s for s in cfg.sensors if all(sig in SKAB_CHANNELS for sig in s.signals.values())]
    sensors = [s for s in sensors if s.signals]
    columns: dict[tuple[str, str], list[tuple[float, float]]] = {
        (s.name, ch): [] for s in sensors for ch in s.channels
    }
    records: list[WireRecord] = []
    seq = None
    values = rows = 0
    for f in files:
        for stamp, row in zip(f.datetimes, f.rows, strict=True):
            t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
            by_signal = dict(zip(f.columns, row, strict=True))
            if seq is None:
                seq = int(t * 1_000_000)  # the store starts at wall-clock microseconds
            rows += 1
            for s in sensors:
                # as the sampler reports them: on each channel's resolution grid
                reading = {
                    ch: quantize(by_signal[s.signals[ch]], res[(s.name, ch)]) for ch in s.channels
                }
                body = TelemetryBody(s.name, t, reading).to_cbor()
                records.append(WireRecord(seq, "telemetry", t, body))
                seq += 1
                values += len(reading)
                for ch, x in reading.items():
                    columns[(s.name, ch)].append((t, x))
    return Replay(records, values, rows, columns, {k: res[k] for k in columns})


def fit_batches(
    records: Sequence[WireRecord], encode: Callable[[Sequence[WireRecord]], bytes], limit: int
) -> list[bytes]:
    """Greedy batches: each the most records (at most MAX_RECORDS) that encode within ``limit``
    bytes, to within 1/128 of the count, searched from the previous batch's count."""
    out: list[bytes] = []
    i = 0
    guess = 64
    while i < len(records):
        top = min(len(records) - i, MAX_RECORDS)
        lo, lo_bytes = 0, b""
        hi = top + 1  # smallest count known not to fit
        n = min(guess, top)
        while lo + max(1, lo // 128) < hi:
            data = encode(records[i : i + n])
            if len(data) <= limit:
                lo, lo_bytes = n, data
                if n == top:
                    break
                step = max(1, n // 16)
                n = min(n + step, top) if hi > top else (lo + hi) // 2
            else:
                hi = n
                n = (lo + hi) // 2 if lo else n // 2
            if n == 0:
                raise RuntimeError(f"one record does not fit {limit} bytes")
        out.append(lo_bytes)
        i += lo
        guess = lo
    return out


def check_batches(batches: Sequence[bytes], cf: int, rep: Replay, exact: bool) -> tuple[int, float]:
    """Decode every batch and compare with the replay; (records checked, decode CPU seconds)."""
    started = time.process_time()
    decoded = [codec.decode_batch(b, cf)[1] for b in batches]
    elapsed = time.process_time() - started
    i = 0
    for batch in decoded:
        for got in batch:
            want = rep.records[i]
            i += 1
            if (got.seq, got.kind) != (want.seq, want.kind):
                raise AssertionError(f"record {i}: {got.seq, got.kind} != {want.seq, want.kind}")
            if exact:
                if got != want:
                    raise AssertionError(f"record {i} differs after the round trip")
                continue
            body = TelemetryBody.from_cbor(got.body)
            orig = TelemetryBody.from_cbor(want.body)
            if body.time != round(orig.time * 1000) / 1000 or body.sensor != orig.sensor:
                raise AssertionError(f"record {i}: time or sensor differs")
            if set(body.values) != set(orig.values):
                raise AssertionError(f"record {i}: channels differ")
            for ch, x in orig.values.items():
                step = rep.resolution[(orig.sensor, ch)]
                if body.values[ch] != quantize(x, step):
                    raise AssertionError(f"record {i} {ch}: {body.values[ch]!r} is not at {step}")
                if abs(body.values[ch] - x) > step / 2 * (1 + 1e-9):
                    raise AssertionError(f"record {i} {ch}: more than half a step from {x!r}")
    if i != len(rep.records):
        raise AssertionError(f"decoded {i} records of {len(rep.records)}")
    return i, elapsed


@dataclass(frozen=True)
class _Queued:
    """A replayed record as the uplink leases it from the store."""

    seq: int
    kind: str
    created: float
    payload: bytes


def features_low(
    rep: Replay, cfg: configmod.Config, result: Result, window: float = 60.0, lease: int = 1000
) -> float:
    """Bytes on the wire per reading under the features policy at the low level (every channel
    of the rig: ``[data.low] policy``, ``window`` seconds, 8 bands for the ADXL345s), the
    uplink's way: leases of ``lease`` records (the low level's batch_records) folded
    (agent/sync/featurize.py), then batches of 1 KiB in 65002. Every batch is decoded: the
    features records stand for every seq once."""
    policy = {f"{s.name}/{ch}": "features" for s in cfg.sensors for ch in s.channels}
    raw = {"window": window, "low": {"policy": policy}}
    data = DataSettings.from_options(Options(raw, "data."), cfg.sensors)
    wire: list[WireRecord] = []
    for i in range(0, len(rep.records), lease):
        leased = [_Queued(r.seq, r.kind, r.created, r.body) for r in rep.records[i : i + lease]]
        wire.extend(fold(leased, data, "low"))

    def enc(recs: Sequence[WireRecord]) -> bytes:
        return codec.encode_batch(None, recs, CF_COMPACT_DICT)

    batches = fit_batches(wire, enc, 1024)
    seqs = [s for b in batches for s in covered(codec.decode_batch(b, CF_COMPACT_DICT)[1])]
    if sorted(seqs) != sorted(r.seq for r in rep.records):
        raise AssertionError("the features records do not stand for every reading once")
    total = sum(len(b) for b in batches)
    result.add(
        f"low, features {window:g} s, leases of {lease}: records, batches",
        f"{len(wire)} features records, {len(batches)} batches",
        f"{len(rep.records) / len(wire):.0f} readings a record",
    )
    return total / rep.values


def json_bytes(rep: Replay) -> int:
    total = 0
    for (sensor, ch), series in rep.columns.items():
        for t, x in series:
            doc = {"device": DEVICE, "sensor": sensor, "channel": ch, "time": t, "value": x}
            total += len(json.dumps(doc, separators=(",", ":"))) + 1
    return total


def xz_bound(rep: Replay) -> tuple[int, dict[str, int]]:
    """xz -9e of the quantized columns (time in ms once, then each channel), in three layouts."""
    first = next(iter(rep.columns.values()))
    cols = [[round(t * 1000) for t, _ in first]]
    for k, series in rep.columns.items():
        step = rep.resolution[k]
        cols.append([round(x / step) for _, x in series])
    layouts: dict[str, bytes] = {}
    layouts["int64"] = b"".join(struct.pack(f"<{len(c)}q", *c) for c in cols)
    deltas = [[c[0]] + [b - a for a, b in itertools.pairwise(c)] for c in cols]
    layouts["int64 deltas"] = b"".join(struct.pack(f"<{len(c)}q", *c) for c in deltas)
    out = bytearray()
    for c in deltas:
        for v in c:
            u = zigzag(v)
            while u >= 0x80:
                out.append((u & 0x7F) | 0x80)
                u >>= 7
            out.append(u)
    layouts["varint deltas"] = bytes(out)
    sizes = {
        name: len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
        for name, data in layouts.items()
    }
    return min(sizes.values()), sizes


def parse(args: argparse.Namespace) -> tuple[argparse.Namespace, bool]:
    p = argparse.ArgumentParser(prog="bench codec")
    p.add_argument("--data", "--skab", dest="data", help="the SKAB data folder")
    extra, _ = p.parse_known_args(getattr(args, "extra", []))
    return extra, bool(getattr(args, "quick", False))


def run(args: argparse.Namespace) -> Result:
    with workdir(args, "codec") as wd:  # writes nothing: stated for the record
        return wd.stamp(_run(args))


def _run(args: argparse.Namespace) -> Result:
    extra, quick = parse(args)
    result = Result()
    folder = skab_dir(extra)
    paths = sorted(folder.glob("*/*.csv"), key=lambda p: (p.parent.name, len(p.stem), p.stem))
    if quick:
        paths = [p for p in paths if p.parent.name == "valve1"][:2]
    if not paths:
        result.add("skipped: no SKAB data", str(folder), "pass --data DIR")
        result.notes.append(f"SKAB data not found at {folder}: pass --data DIR")
        result.summary = {"skipped": f"no SKAB data at {folder}"}
        return result
    cfg = configmod.load(example_config())
    rep = replay([read_skab_csv(p) for p in paths], cfg)
    resolution = rep.resolution.get

    def res_fn(sensor: str, channel: str) -> float | None:
        return resolution((sensor, channel))

    json_total = json_bytes(rep)
    xz_total, xz_sizes = xz_bound(rep)
    per_json = json_total / rep.values
    per_xz = xz_total / rep.values
    result.add("replay", f"{len(paths)} files, {rep.rows} rows", f"{rep.values} readings")
    result.add("JSON object per reading", f"{per_json:.2f} B/reading", "baseline")
    result.add("xz -9e of quantized columns", f"{per_xz:.3f} B/reading", "near-entropy bound")
    per_level: dict[str, float] = {}
    for name, cf, limit in LEVELS:

        def enc(recs: Sequence[WireRecord], cf: int = cf) -> bytes:
            return codec.encode_batch(None, recs, cf, resolution=res_fn)

        batches = fit_batches(rep.records, enc, limit)
        total = sum(len(b) for b in batches)
        bounds = []
        i = 0
        for b in batches:
            n = len(codec.decode_batch(b, cf)[1])
            bounds.append((i, i + n))
            i += n
        started = time.process_time()
        for a, b in bounds:
            enc(rep.records[a:b])
        enc_s = time.process_time() - started
        _, dec_s = check_batches(batches, cf, rep, exact=cf == CF_SENML_CBOR)
        per = total / rep.values
        per_level[name] = per
        result.add(
            f"{name}: {codec.encoding_for(cf).name} ({cf}), batches <= {limit // 1024} KiB",
            f"{per:.3f} B/reading",
            f"{per / per_json:.4f} x JSON, {per / per_xz:.2f} x xz",
        )
        result.add(
            f"{name}: batches, mean size",
            f"{len(batches)}, {total / len(batches):.0f} B",
            f"{len(rep.records) / len(batches):.0f} records a batch (<= {MAX_RECORDS})",
        )
        result.add(
            f"{name}: encode / decode",
            f"{rep.values / enc_s / 1000:.0f} k / {rep.values / dec_s / 1000:.0f} k readings/s",
            "CPU time, this host",
        )
    low = per_level["low"]
    per_features = features_low(rep, cfg, result)
    per_long = features_low(rep, cfg, result, window=600.0, lease=4096)
    for what, per in (("60 s (default)", per_features), ("600 s, leases 4096", per_long)):
        result.add(
            f"low, features {what}: bytes per reading it stands for",
            f"{per:.4f} B/reading",
            f"{per / low:.3f} x compact lossless (low); "
            f"{100 * (1 - per / per_json):.2f} % below JSON",
        )
    reduction = 1 - low / per_json
    ratio = low / per_xz
    verdict = "pass" if reduction >= ACCEPT_REDUCTION else "FAIL"
    result.add(
        "low: reduction vs JSON",
        f"{100 * reduction:.2f} %",
        f"acceptance >= {100 * ACCEPT_REDUCTION:.0f} %: {verdict}",
    )
    result.add(
        "low: ratio to xz bound",
        f"{ratio:.3f}",
        f"acceptance <= {ACCEPT_XZ_RATIO}: {'pass' if ratio <= ACCEPT_XZ_RATIO else 'FAIL'}",
    )
    result.notes.append(
        "xz layouts (bytes): " + ", ".join(f"{k} {v}" for k, v in sorted(xz_sizes.items()))
    )
    result.notes.append("every batch decoded and checked: lossless at sensor resolution, 1 ms")
    result.summary = {
        "bytes_per_reading": {k: round(v, 4) for k, v in per_level.items()},
        "bytes_per_reading_features": round(per_features, 5),
        "features_ratio_to_compact_low": round(per_features / low, 4),
        "bytes_per_reading_features_600s": round(per_long, 5),
        "features_600s_ratio_to_compact_low": round(per_long / low, 4),
        "reduction_vs_json_low": round(reduction, 4),
        "ratio_to_xz_low": round(ratio, 4),
        "json_bytes_per_reading": round(per_json, 3),
        "xz_bytes_per_reading": round(per_xz, 4),
    }
    return result

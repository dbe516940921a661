"""The cost planner: what edge-only, cloud-only and hybrid inference would cost a fleet's device,
and the cheapest split that meets the latency requirement (``edge-agent plan --profile FILE``).

Inputs come from a profile (TOML, below) and from what was measured, each figure from the first
of these sources that has it, and each cites its source in the plan:

1. this device: the summary ``edge-agent bench --quick`` saved in the agent's data directory
   (``DATA/bench/quick.json``, agent/service/quickbench.py; ``--config FILE`` or ``--data-dir
   DIR`` name it; source "measured on this device TIME: bench --quick KEY");
2. bundled: the build machine's full runs (``docs/bench-results/NAME.json``, written by
   ``./tools/dev bench NAME``; the wheel carries them; source "bundled: build machine HOST TIME:
   bench NAME KEY"), or with ``--measured DIR`` only the runs saved in DIR (no device results).

- edge decision latency (sample in, alert committed): ``detect.latency_p99_ms`` of this device,
  else ``bench inference`` ``detect_latency_p99_ms``; one int8 invoke with (de)quantization
  (``inference.latency_p99_us``, else ``latency_p99_us``) is shown beside it;
- cloud model time: ``bench inference`` ``float32_latency_p50_us`` (the cloud's, not the
  device's: bundled only), unless the profile sets it;
- bytes per record, unless the profile sets ``link.bytes_per_record``: with ``link.encoding`` a
  codec level (high, medium, low, compact), that level's bytes per reading times
  ``workload.channels_per_record`` (``codec.bytes_per_reading.LEVEL`` of this device, else
  ``bench codec`` ``bytes_per_reading.LEVEL``); with ``"senml"`` this device's SenML-CBOR level
  (``codec.bytes_per_reading.high``) times the channels, else ``bench sync`` ``bytes_per_record``
  (SenML-CBOR on the wire, both directions, the bench's 2-channel records);
- the store's durable puts per second one at a time (``store.puts_per_s_batch1``, else ``bench
  store`` ``puts_per_s_batch1``) and this device's fsync rate (``fsync.per_s``): shown, and a
  warning when the workload's records per second exceed the store's rate;
- the round trip to the endpoint: the profile's ``link.rtt_ms`` (p99).

The splits (per day; a month is 30 days):

- **edge-only**: every inference on the device. Cost ``N * edge_per_inference``; latency: the
  edge decision latency.
- **cloud-only**: every inference in the cloud; the device uploads the records each one needs.
  Cost ``N * (cloud_per_inference + records_per_inference * bytes_per_record * per_mb / 1e6)``;
  latency: RTT + cloud model time + the upload's serialization at ``link.rate_kbit`` (if given).
- **hybrid**: the edge decides every inference; the low-confidence share is validated in the
  cloud afterwards (agent/sync/routing.py). Cost ``N * edge_per_inference + N * share *
  (cloud_per_inference + validation_bytes * per_mb / 1e6)``; latency: the edge's.
  ``validation_bytes`` is computed from the wire format of a validation (request and verdict).

Telemetry the device uploads anyway is the same in every split and is left out. A split meets the
requirement when its latency is within ``workload.latency_requirement_ms`` and, with
``workload.require_validation = true``, when unsure results are checked by the full model
(edge-only does not). Ties go to the split that depends least on the link.

Profile (every key under its table; unknown keys are errors)::

    [workload]
    daily_inferences = 86400        # required
    latency_requirement_ms = 100    # required, p99 per decision
    records_per_inference = 1       # records the cloud needs for one inference
    channels_per_record = 8         # for link.encoding = a codec level
    low_confidence_share = 0.05     # required unless measured (bench inference, same key)
    require_validation = false

    [prices]
    currency = "EUR"                # a label
    cloud_per_inference = 0.00001   # required
    per_mb = 0.5                    # required, per 10^6 bytes over the link
    edge_per_inference = 0.0

    [link]
    rtt_ms = 120                    # required
    rate_kbit = 256                 # optional: adds serialization time to cloud-only latency
    encoding = "senml"              # or a codec level (high, medium, low, compact)
    bytes_per_record = 67.2         # optional: overrides the measured figure

    [cloud]
    inference_ms = 1.0              # optional: overrides the measured float32 latency
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ConfigError
from agent.files import read_config_text, read_json
from agent.service.config import parse_toml
from agent.wire import records
from drivers.base import Options

DAYS_PER_MONTH = 30
SECONDS_PER_DAY = 86400
#: CoAP header, token and options of one message, and the UDP/IP headers are not counted (as
#: in bench sync, which counts UDP payloads).
COAP_MESSAGE_OVERHEAD = 32
WINDOW_VALUES = 32  # the shipped anomaly model's input (4 steps x 8 channels)
SPLITS = ("edge-only", "hybrid", "cloud-only")  # tie order: least dependent on the link first


def default_measured_dir() -> Path:
    """docs/bench-results/ of the checkout this module runs from, else the installed package's: the
    build machine's figures, the fallback after this device's own (``DeviceResults``)."""
    checkout = Path(__file__).resolve().parents[2] / "docs" / "bench-results"
    installed = Path(sys.prefix) / "share" / "edge-agent" / "bench-results"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


@dataclass(frozen=True)
class Value:
    """A number with where it came from (``profile``, ``measured on this device ...``,
    ``bundled: build machine ...``, ``computed``)."""

    value: float
    source: str


@dataclass(frozen=True)
class Profile:
    daily_inferences: float
    latency_requirement_ms: float
    records_per_inference: float = 1.0
    channels_per_record: int = 8
    low_confidence_share: float | None = None
    require_validation: bool = False
    currency: str = ""
    cloud_per_inference: float = 0.0
    per_mb: float = 0.0
    edge_per_inference: float = 0.0
    rtt_ms: float = 0.0
    rate_kbit: float | None = None
    encoding: str = "senml"
    bytes_per_record: float | None = None
    cloud_inference_ms: float | None = None

    @classmethod
    def from_options(cls, top: Options) -> Profile:
        w = top.table("workload", required=True)
        p = top.table("prices", required=True)
        link = top.table("link", required=True)
        cloud = top.table("cloud")
        profile = cls(
            daily_inferences=w.number("daily_inferences", minimum=0.0),
            latency_requirement_ms=w.number("latency_requirement_ms", above=0.0),
            records_per_inference=w.number("records_per_inference", 1.0, minimum=0.0),
            channels_per_record=w.integer("channels_per_record", 8, minimum=1, maximum=4096),
            low_confidence_share=(
                w.number("low_confidence_share", 0.0, minimum=0.0, maximum=1.0)
                if w.has("low_confidence_share")
                else None
            ),
            require_validation=w.boolean("require_validation", False),
            currency=p.string("currency", ""),
            cloud_per_inference=p.number("cloud_per_inference", minimum=0.0),
            per_mb=p.number("per_mb", minimum=0.0),
            edge_per_inference=p.number("edge_per_inference", 0.0, minimum=0.0),
            rtt_ms=link.number("rtt_ms", minimum=0.0),
            rate_kbit=link.number("rate_kbit", 1.0, above=0.0) if link.has("rate_kbit") else None,
            encoding=link.string("encoding", "senml"),
            bytes_per_record=(
                link.number("bytes_per_record", 1.0, above=0.0)
                if link.has("bytes_per_record")
                else None
            ),
            cloud_inference_ms=(
                cloud.number("inference_ms", 0.0, minimum=0.0)
                if cloud.has("inference_ms")
                else None
            ),
        )
        for t in (w, p, link, cloud):
            t.finish()
        top.finish()
        return profile


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile. Raises ConfigError ``FILE: key.path: message``."""
    path = Path(path)
    return parse_toml(
        read_config_text(path), path.name, lambda raw: Profile.from_options(Options(raw))
    )


def _finite(value: Any, file: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(file, key, f"expected a number, got {value!r}")
    return float(value)


def _lookup(summary: Any, key: str) -> Any:
    value = summary
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _read_doc(path: Path) -> dict[str, Any] | None:
    """A saved bench run: None when the file does not exist, ConfigError when it is not one."""
    try:
        doc = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(str(path), "", f"unreadable bench result ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("summary"), dict):
        raise ConfigError(str(path), "summary", "missing: not a saved bench run")
    return doc


class Measured:
    """The benchmarks' saved summaries in a directory (``docs/bench-results/NAME.json``): the
    bundled ones (``bundled=True``: the build machine's) or those of ``--measured DIR``."""

    def __init__(self, directory: Path, *, bundled: bool = False) -> None:
        self.directory = Path(directory)
        self.bundled = bundled
        self._docs: dict[str, dict[str, Any] | None] = {}

    def doc(self, bench: str) -> dict[str, Any] | None:
        if bench not in self._docs:
            self._docs[bench] = _read_doc(self.directory / f"{bench}.json")
        return self._docs[bench]

    def get(self, bench: str, key: str) -> Any:
        doc = self.doc(bench)
        return None if doc is None else _lookup(doc["summary"], key)

    def number(self, bench: str, key: str) -> Value | None:
        value = self.get(bench, key)
        if value is None:
            return None
        path = str(self.directory / f"{bench}.json")
        doc = self.doc(bench) or {}
        quick = " (quick run)" if doc.get("quick") else ""
        where = "bundled: build machine" if self.bundled else "--measured:"
        run = f"{doc.get('host', '?')} {doc.get('finished', '?')}"
        return Value(
            _finite(value, path, f"summary.{key}"), f"{where} {run}: bench {bench} {key}{quick}"
        )

    def provenance(self) -> dict[str, str]:
        return {
            name: f"{doc.get('finished', '?')}{' quick' if doc.get('quick') else ''}"
            for name, doc in sorted(self._docs.items())
            if doc is not None
        }


class DeviceResults:
    """What ``edge-agent bench --quick`` measured on this device (``DATA/bench/quick.json``,
    agent/service/quickbench.py); every figure is absent when the file is."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._doc = _read_doc(self.path)

    @property
    def present(self) -> bool:
        return self._doc is not None

    def get(self, key: str) -> Any:
        return None if self._doc is None else _lookup(self._doc["summary"], key)

    def number(self, key: str) -> Value | None:
        value = self.get(key)
        if value is None or self._doc is None:
            return None
        finished = self._doc.get("finished", "?")
        return Value(
            _finite(value, str(self.path), f"summary.{key}"),
            f"measured on this device {finished}: bench --quick {key}",
        )

    def fs_warning(self) -> str | None:
        """Said when the run's directory was on tmpfs or ramfs (its store rates are RAM's)."""
        d = self._doc or {}
        if not d.get("no_fsync"):
            return None
        where = f"{d.get('fs_type', '?')} ({d.get('dir', '?')})"
        return (
            f"this device's figures were measured on {where}: durable there involves no fsync; "
            "run edge-agent bench --quick --dir DIR on the agent's storage"
        )

    def provenance(self) -> str:
        d = self._doc or {}
        return (
            f"{self.path} ({d.get('finished', '?')}, {d.get('host', '?')}, in {d.get('dir', '?')}"
            f" on {d.get('fs_type', '?')})"
        )


def _first(*values: Value | None) -> Value | None:
    return next((v for v in values if v is not None), None)


def validation_bytes() -> int:
    """Bytes of one validation exchange: the request (seq, alert, window) and the verdict, in
    the wire format of agent/sync/routing.py and cloud/inference.py, plus CoAP message overhead."""
    alert = {
        "time": 1_700_000_000.0,
        "kind": "raise",
        "score": 1.2345678,
        "threshold": 1.0,
        "channels": [["Volume Flow RateRMS", 1.2345678], ["Pressure", 0.5], ["Current", 0.25]],
        "verdict": "novel_anomaly",
        "fault": None,
        "confidence": 0.61234567,
        "novelty": None,
        "model": "skab-ae",
    }
    # model inputs are float32: each value is a 5-byte CBOR float
    window = [float(np.float32(0.1234567 * i)) for i in range(WINDOW_VALUES)]
    request = records.dumps({"seq": 1_795_439_964_079_445, "alert": alert, "window": window})
    verdict = records.dumps(
        {
            "seq": 1_795_439_964_079_445,
            "anomalous": True,
            "score": 5.0134269231930375,
            "threshold": 1.0,
            "verdict": "known_failure",
            "fault": "valve",
            "confidence": 0.9975500702857971,
            "model": "skab-ae",
            "classifier": "skab-clf",
            "precision": "float32",
        }
    )
    return len(request) + len(verdict) + 2 * COAP_MESSAGE_OVERHEAD


@dataclass(frozen=True)
class Split:
    name: str
    latency_ms: float
    meets: bool
    why: str  # "" when it meets, else what fails
    daily_cost: float
    monthly_cost: float
    daily_bytes: float
    cloud_inferences_per_day: float


@dataclass(frozen=True)
class Plan:
    profile: str
    measured_dir: str
    currency: str
    requirement_ms: float
    inputs: dict[str, dict[str, Any]]
    splits: list[Split] = field(default_factory=list)
    choice: str | None = None
    measured: dict[str, str] = field(default_factory=dict)
    device_results: str | None = None  # this device's bench --quick summary, when read
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _need(value: Value | None, file: str, key: str, how: str) -> Value:
    if value is None:
        raise ConfigError(file, key, f"is required: {how}")
    return value


def plan(
    profile_path: str | Path,
    measured_dir: str | Path | None = None,
    device_results: str | Path | None = None,
) -> Plan:
    """Load the profile and the measurements and compute the three splits. ``device_results``:
    this device's ``bench --quick`` summary (read first when it exists); ``measured_dir``: the
    saved bench runs to fall back on (default: the bundled ones)."""
    profile_path = Path(profile_path)
    label = profile_path.name
    prof = load_profile(profile_path)
    mdir = Path(measured_dir) if measured_dir is not None else default_measured_dir()
    m = Measured(mdir, bundled=measured_dir is None)
    device = DeviceResults(Path(device_results)) if device_results is not None else None

    def dev(key: str) -> Value | None:
        return device.number(key) if device is not None else None

    hint = f"no measured value in {mdir}" + (f" or {device.path}" if device is not None else "")

    edge_ms = _need(
        _first(dev("detect.latency_p99_ms"), m.number("inference", "detect_latency_p99_ms")),
        str(mdir / "inference.json"),
        "summary.detect_latency_p99_ms",
        "run edge-agent bench --quick on the device (./tools/dev bench inference in a checkout)",
    )
    invoke_us = _first(dev("inference.latency_p99_us"), m.number("inference", "latency_p99_us"))
    if prof.cloud_inference_ms is not None:
        cloud_ms = Value(prof.cloud_inference_ms, "profile")
    else:
        us = _need(
            m.number("inference", "float32_latency_p50_us"),
            label,
            "cloud.inference_ms",
            f"{hint} (bench inference float32_latency_p50_us); set it or run the bench",
        )
        cloud_ms = Value(us.value / 1000.0, us.source)

    ch = prof.channels_per_record
    if prof.bytes_per_record is not None:
        bpr = Value(prof.bytes_per_record, "profile")
    elif prof.encoding == "senml":
        per_dev = dev("codec.bytes_per_reading.high")  # SenML-CBOR is the high level
        if per_dev is not None:
            bpr = Value(per_dev.value * ch, f"{per_dev.source} (SenML-CBOR) x {ch}")
        else:
            bpr = _need(
                m.number("sync", "bytes_per_record"),
                label,
                "link.bytes_per_record",
                f"{hint} (bench sync bytes_per_record); set it or run edge-agent bench --quick",
            )
    else:
        found = [m.get("codec", "bytes_per_reading")]
        if device is not None:
            found.append(device.get("codec.bytes_per_reading"))
        levels = {name for f in found if isinstance(f, dict) for name in f}
        if levels and prof.encoding not in levels:
            known = ", ".join(["senml", *sorted(levels)])
            raise ConfigError(label, "link.encoding", f"{prof.encoding!r} is not one of {known}")
        key = f"bytes_per_reading.{prof.encoding}"
        per = _need(
            _first(dev(f"codec.{key}"), m.number("codec", key)),
            label,
            "link.bytes_per_record",
            f"{hint} (bench codec bytes_per_reading); set it or run edge-agent bench --quick",
        )
        bpr = Value(per.value * ch, f"{per.source} x {ch}")

    if prof.low_confidence_share is not None:
        share = Value(prof.low_confidence_share, "profile")
    else:
        share = _need(
            m.number("inference", "low_confidence_share"),
            label,
            "workload.low_confidence_share",
            f"{hint} (bench inference low_confidence_share); set it in the profile",
        )
    vbytes = Value(float(validation_bytes()), "computed from the wire format")
    store_rate = _first(dev("store.puts_per_s_batch1"), m.number("store", "puts_per_s_batch1"))
    fsync_rate = dev("fsync.per_s")

    n = prof.daily_inferences
    up_bytes = prof.records_per_inference * bpr.value
    serialization_ms = 0.0
    if prof.rate_kbit:
        serialization_ms = up_bytes * 8 / (prof.rate_kbit * 1000) * 1000
    per_mb = prof.per_mb / 1e6
    req = prof.latency_requirement_ms

    def split(name: str, latency: float, cost: float, nbytes: float, cloud_n: float) -> Split:
        problems = []
        if latency > req:
            problems.append(f"latency {latency:.3g} ms > {req:g} ms")
        if prof.require_validation and name == "edge-only":
            problems.append("unsure results are not validated")
        return Split(
            name=name,
            latency_ms=latency,
            meets=not problems,
            why="; ".join(problems),
            daily_cost=cost,
            monthly_cost=cost * DAYS_PER_MONTH,
            daily_bytes=nbytes,
            cloud_inferences_per_day=cloud_n,
        )

    edge_cost = n * prof.edge_per_inference
    validated = n * share.value
    splits = [
        split("edge-only", edge_ms.value, edge_cost, 0.0, 0.0),
        split(
            "hybrid",
            edge_ms.value,
            edge_cost + validated * (prof.cloud_per_inference + vbytes.value * per_mb),
            validated * vbytes.value,
            validated,
        ),
        split(
            "cloud-only",
            prof.rtt_ms + cloud_ms.value + serialization_ms,
            n * (prof.cloud_per_inference + up_bytes * per_mb),
            n * up_bytes,
            n,
        ),
    ]
    meeting = [s for s in splits if s.meets]
    choice = None
    if meeting:
        best = min(meeting, key=lambda s: (round(s.daily_cost, 12), SPLITS.index(s.name)))
        choice = best.name
    inputs = {
        "daily_inferences": asdict(Value(n, "profile")),
        "latency_requirement_ms": asdict(Value(req, "profile")),
        "edge_latency_p99_ms": asdict(edge_ms),
        "cloud_rtt_ms": asdict(Value(prof.rtt_ms, "profile")),
        "cloud_inference_ms": asdict(cloud_ms),
        "bytes_per_record": asdict(bpr),
        "records_per_inference": asdict(Value(prof.records_per_inference, "profile")),
        "validation_bytes": asdict(vbytes),
        "low_confidence_share": asdict(share),
        "cloud_per_inference": asdict(Value(prof.cloud_per_inference, "profile")),
        "per_mb": asdict(Value(prof.per_mb, "profile")),
        "edge_per_inference": asdict(Value(prof.edge_per_inference, "profile")),
    }
    if invoke_us is not None:
        inputs["edge_invoke_p99_us"] = asdict(invoke_us)
    warnings = []
    if device is not None and device.fs_warning():
        warnings.append(str(device.fs_warning()))
    if store_rate is not None:
        inputs["store_puts_per_s_batch1"] = asdict(store_rate)
        needed = n * prof.records_per_inference / SECONDS_PER_DAY
        if needed > store_rate.value:
            warnings.append(
                f"the workload stores {needed:.3g} records/s, more than the store's "
                f"{store_rate.value:.3g} durable puts/s one at a time: the device must batch them"
            )
    if fsync_rate is not None:
        inputs["fsync_per_s"] = asdict(fsync_rate)
    if serialization_ms:
        inputs["upload_serialization_ms"] = asdict(Value(serialization_ms, "computed"))
    return Plan(
        profile=str(profile_path),
        measured_dir=str(mdir),
        device_results=(device.provenance() if device is not None and device.present else None),
        currency=prof.currency,
        requirement_ms=req,
        inputs=inputs,
        splits=splits,
        choice=choice,
        measured=m.provenance(),
        warnings=warnings,
    )


def _money(value: float, currency: str) -> str:
    text = f"{value:,.2f}" if value >= 1 or value == 0 else f"{value:.4g}"
    return f"{text} {currency}".strip()


def format_plan(p: Plan) -> str:
    cur = p.currency
    lines = [f"profile {p.profile}"]
    if p.device_results is not None:
        lines.append(f"measured on this device: {p.device_results}")
    fallback = "fallback " if p.device_results is not None else ""
    lines.append(f"{fallback}bench runs in {p.measured_dir}")
    if p.measured:
        lines.append("  read: " + ", ".join(f"{k} {v}" for k, v in p.measured.items()))
    lines.append("inputs:")
    for key, v in p.inputs.items():
        lines.append(f"  {key:<24} {v['value']:>14,.6g}  ({v['source']})")
    table = [("split", "latency p99", f"meets <= {p.requirement_ms:g} ms", "per day", "per month")]
    for s in p.splits:
        table.append(
            (
                s.name,
                f"{s.latency_ms:.3g} ms",
                "yes" if s.meets else f"no: {s.why}",
                _money(s.daily_cost, cur),
                _money(s.monthly_cost, cur),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines.append("")
    for i, row in enumerate(table):
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2])]
        cells += [row[3].rjust(widths[3]), row[4].rjust(widths[4])]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines += [f"warning: {w}" for w in p.warnings]
    if p.choice is None:
        lines.append("no split meets the requirement")
    else:
        lines.append(f"cheapest split that meets the requirement: {p.choice}")
    return "\n".join(lines)

"""``edge-agent bench --quick``: what this device's storage and CPU do with the agent's own code, in
seconds, measured by the installed agent and saved where ``edge-agent plan`` looks first.

Measured in one run, each headline figure beside a baseline measured in the same run:

- **fsync**: a 512-byte ``pwrite`` at the next offset of a file (wrapping at 64 KiB) and its
  ``fsync``, repeated (:data:`FSYNC_MAX` times or :data:`FSYNC_SECONDS`): fsyncs per second,
  p50/p99. No durable store commits faster than this one at a time.
- **store**: the agent's Store (agent/store/, the config's ``[store] durability``, 128-byte
  records) put in batches of 1 and of 100, records per second; baseline: plain ``sqlite3``, one
  row per transaction, WAL, ``synchronous=FULL``, interleaved round by round with the batch-1 puts.
- **inference**: the shipped anomaly model (int8, one window, one thread): quantize + invoke +
  dequantize, p50/p99 over :data:`INVOKES` calls; baseline: the bare interpreter invoke of an
  input already quantized, interleaved. (The float32 reference stays off devices.)
- **detect**: the edge decision latency ``edge-agent plan`` needs: from the push of the sample
  that ends a raising window to its alert committed in the Store, p50/p99 over
  :data:`DETECT_ALERTS` alerts (the shipped models, a synthetic flow drop).
- **codec**: bytes per reading of the reference pump rig's channels (agent/examples/pump-rig.toml,
  each value on its channel's resolution grid) over :data:`CODEC_SECONDS` of the synthetic pump
  (drivers/sim/sources.py), in SenML-CBOR (``high``) and the compact encodings (``medium``,
  ``low``, ``compact``) at the link policies' batch limits (agent/sync/link.py); baseline: one JSON
  object per reading. Every batch is decoded again and counted.

Where: a new directory ``bench-quick-*`` in ``--dir`` (default: the agent's data directory),
removed afterwards. Run as root, where another user can change ``--dir`` or a directory above it
(the agent's user owns its data directory), the directory is made instead in the nearest directory
above ``--dir`` on the same filesystem that only root can change (:func:`run_parent`): SQLite and
the Store open their files by name, and that user could swap a directory of the path for a link
between two of those opens. The report names it and its filesystem type (the mount's, from
/proc/self/mountinfo); on tmpfs or ramfs it says that durable there involves no fsync. The process
runs on one CPU when the agent does (``[agent] cpu_affinity``, agent/service/cpu.py).

The document is written atomically to ``DATA/bench/quick.json`` (DATA: ``[agent] data_dir``):
``format``, ``bench`` ("quick"), ``finished`` (UTC), ``host``, ``agent`` (version), ``dir``,
``fs_type``, ``no_fsync`` (tmpfs/ramfs), ``cpu``, ``elapsed_s`` and ``summary``, whose keys
``edge-agent plan`` maps to its inputs (agent/service/planner.py): ``detect.latency_p99_ms`` (edge
decision latency), ``inference.latency_p99_us``, ``codec.bytes_per_reading.LEVEL`` (bytes per
record: times the profile's channels per record; ``high`` for ``encoding = "senml"``),
``store.puts_per_s_batch1`` and ``fsync.per_s``. Run as root, the files it leaves in DATA get the
data directory's owner, so the agent's user can run the next one; :func:`save` acts on
descriptors there and follows no link (DATA/bench a link is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import json
import os
import platform
import secrets
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__
from agent.errors import AgentError, ModelError

FORMAT = 1
RESULT_DIR = "bench"  # under the data directory
RESULT_FILE = "quick.json"
NO_FSYNC_FS = ("tmpfs", "ramfs")  # filesystems whose fsync writes nothing anywhere

# Sizes and time caps (tests may shorten them): each loop stops at its count or its time.
FSYNC_MAX = 200
FSYNC_SECONDS = 2.0
FSYNC_WRITE = 512
FSYNC_SPAN = 64 * 1024
STORE_ROUNDS = 3
STORE_BATCH1_MAX = 100  # puts per round, each side
STORE_BATCH100_MAX = 20
STORE_SECONDS = 1.0  # per round and side
PAYLOAD = bytes(range(128))
INVOKES = 300
INVOKE_ROUNDS = 5
DETECT_ALERTS = 20
DETECT_MAX_EPISODES = 60  # a fault and a recovery each; stops early without alerts
EPISODE_SAMPLES = 120
CODEC_SECONDS = 600
CODEC_T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the synthetic readings' first time
CODEC_SEED = 1

# The synthetic pump of the detect latency, per model channel (agent.detect.features.CHANNELS):
# SKAB's anomaly-free operating point and its noise; a fault drops the flow by 15 %.
_LEVEL = (0.21, 0.27, 2.4, 0.1, 89.0, 28.0, 229.0, 125.0)
_NOISE = (0.002, 0.002, 0.45, 0.25, 0.1, 0.01, 10.0, 0.5)
_FLOW = "Volume Flow RateRMS"
_FLOW_DROP = 0.15


def result_path(data_dir: Path) -> Path:
    """Where the quick bench saves its document and ``edge-agent plan`` looks for it."""
    return Path(data_dir) / RESULT_DIR / RESULT_FILE


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem ``path`` is on (ext4, tmpfs, ...), from the mount that holds it
    in /proc/self/mountinfo (``stat -f`` calls ext4 "ext2/ext3"); "unknown" when not found."""
    real = os.path.realpath(path)
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8")
        except OSError:
            return "unknown"
    try:
        st_dev = os.stat(real).st_dev
        dev = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    except OSError:
        dev = ""
    best: tuple[bool, int] | None = None
    fs_type = "unknown"
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        point = fields[4].encode().decode("unicode_escape")  # \040 for a space
        if real != point and not real.startswith(point.rstrip("/") + "/"):
            continue
        key = (fields[2] == dev, len(point))  # the path's device first, then the deepest mount
        if best is None or key >= best:  # a later mount over the same point hides the earlier
            best, fs_type = key, tail[0]
    return fs_type


def _pcts(samples: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(samples, dtype=np.float64)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


# --- fsync ---------------------------------------------------------------------------------------
def measure_fsync(directory: Path) -> dict[str, Any]:
    path = directory / "fsync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    block = bytes(range(256)) * (FSYNC_WRITE // 256)
    samples: list[float] = []
    try:
        os.pwrite(fd, block, 0)
        os.fsync(fd)  # the file exists on disk: what follows is the steady state
        started = time.perf_counter()
        while len(samples) < FSYNC_MAX and time.perf_counter() - started < FSYNC_SECONDS:
            offset = (len(samples) * FSYNC_WRITE) % FSYNC_SPAN
            t0 = time.perf_counter()
            os.pwrite(fd, block, offset)
            os.fsync(fd)
            samples.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    p50, p99 = _pcts(samples)
    return {
        "per_s": round(len(samples) / sum(samples), 1),
        "p50_ms": round(p50 * 1000, 3),
        "p99_ms": round(p99 * 1000, 3),
        "count": len(samples),
    }


# --- the store and its plain sqlite3 baseline ---------------------------------------------------
class PlainSqlite:
    """The baseline: one row per transaction, WAL, synchronous=FULL, no store around it."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA page_size = 4096")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute(
            "CREATE TABLE records (seq INTEGER PRIMARY KEY, kind INTEGER NOT NULL, "
            "created REAL NOT NULL, payload BLOB NOT NULL)"
        )
        self.seq = 0

    def put_one(self) -> None:
        self.seq += 1
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute(
            "INSERT INTO records VALUES (?, 3, ?, ?)", (self.seq, time.time(), PAYLOAD)
        )
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


async def measure_store(directory: Path, durability: str) -> dict[str, Any]:
    from agent.store.queue import NewRecord, Store
    from agent.store.settings import StoreSettings
    from agent.wire.records import Kind

    (directory / "store").mkdir()
    store = await Store.open(
        StoreSettings(path=directory / "store" / "queue.db", durability=durability)
    )
    plain = PlainSqlite(directory / "plain.db")
    one = [NewRecord(Kind.TELEMETRY, PAYLOAD)]
    hundred = one * 100
    totals = {"ours1": [0, 0.0], "plain1": [0, 0.0], "ours100": [0, 0.0]}
    try:
        await store.put(one)  # warm up: files created, caches primed
        plain.put_one()
        for _ in range(STORE_ROUNDS):  # interleaved: the machine's load falls on both alike
            started = time.perf_counter()
            n = 0
            while n < STORE_BATCH1_MAX and time.perf_counter() - started < STORE_SECONDS:
                await store.put(one)
                n += 1
            totals["ours1"][0] += n
            totals["ours1"][1] += time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(n):  # the same count as ours
                plain.put_one()
            totals["plain1"][0] += n
            totals["plain1"][1] += time.perf_counter() - started
            started = time.perf_counter()
            n = 0
            while n < STORE_BATCH100_MAX and time.perf_counter() - started < STORE_SECONDS:
                await store.put(hundred)
                n += 1
            totals["ours100"][0] += 100 * n
            totals["ours100"][1] += time.perf_counter() - started
    finally:
        await store.close()
        plain.close()
    rate = {k: n / secs for k, (n, secs) in totals.items()}
    return {
        "durability": durability,
        "puts_per_s_batch1": round(rate["ours1"], 1),
        "puts_per_s_batch100": round(rate["ours100"], 1),
        "baseline_sqlite_puts_per_s_batch1": round(rate["plain1"], 1),
        "ratio_batch1_vs_sqlite": round(rate["ours1"] / rate["plain1"], 3),
        "puts_batch1": int(totals["ours1"][0]),
    }


# --- inference and the decision latency ---------------------------------------------------------
def measure_inference(models_dir: Path, model: str) -> dict[str, Any]:
    from agent.detect.inference import TFLiteModel, load_manifest

    m = TFLiteModel.open(load_manifest(models_dir), model, num_threads=1)
    rng = np.random.default_rng(0)
    wins = rng.normal(0.0, 1.0, size=(64, *m.input_shape)).astype(np.float32)
    quantized = [m.input.quantize(w[None]) for w in wins]
    for i in range(20):  # warm up
        m.predict(wins[i])
        m.invoke_raw(quantized[i])
    full: list[float] = []
    bare: list[float] = []
    per_round = max(1, INVOKES // INVOKE_ROUNDS)
    for _ in range(INVOKE_ROUNDS):  # interleaved
        for i in range(per_round):
            t0 = time.perf_counter_ns()
            m.predict(wins[i % 64])
            full.append((time.perf_counter_ns() - t0) / 1000)
        for i in range(per_round):
            t0 = time.perf_counter_ns()
            m.invoke_raw(quantized[i % 64])
            bare.append((time.perf_counter_ns() - t0) / 1000)
    p50, p99 = _pcts(full)
    b50, b99 = _pcts(bare)
    return {
        "model": model,
        "bytes": m.size,
        "runtime": m.runtime,
        "latency_p50_us": round(p50, 2),
        "latency_p99_us": round(p99, 2),
        "baseline_invoke_p50_us": round(b50, 2),
        "baseline_invoke_p99_us": round(b99, 2),
        "count": len(full),
    }


async def measure_detect(directory: Path, models_dir: Path, durability: str) -> dict[str, Any]:
    from agent.detect.detector import Detector, DetectSettings
    from agent.detect.features import CHANNELS
    from agent.store.queue import NewRecord, Store
    from agent.store.settings import StoreSettings
    from agent.wire.records import AlertBody, Kind

    det = Detector.from_settings(DetectSettings(models_dir=models_dir))
    rng = np.random.default_rng(3)
    level, noise = np.array(_LEVEL), np.array(_NOISE)
    flow = CHANNELS.index(_FLOW)

    def rows(n: int, fault: bool) -> np.ndarray:
        r = level + rng.normal(size=(n, len(CHANNELS))) * noise
        if fault:
            r[:, flow] -= _FLOW_DROP * level[flow]
        return r

    n0 = det.spec.commissioning
    det.feed(np.arange(n0, dtype=float), rows(n0, False))
    (directory / "detect").mkdir()
    store = await Store.open(
        StoreSettings(path=directory / "detect" / "queue.db", durability=durability)
    )
    latencies: list[float] = []
    t = float(n0)
    try:
        for _ in range(DETECT_MAX_EPISODES):
            if len(latencies) >= DETECT_ALERTS:
                break
            for fault in (True, False):
                for r in rows(EPISODE_SAMPLES, fault):
                    t0 = time.perf_counter_ns()
                    alerts = det.push(t, r)
                    if alerts:
                        await store.put(
                            [
                                NewRecord(Kind.ALERT, AlertBody(a.time, a.to_dict()).to_cbor())
                                for a in alerts
                            ]
                        )
                        if any(a.kind.value == "raise" for a in alerts):
                            latencies.append((time.perf_counter_ns() - t0) / 1e6)
                    t += 1.0
    finally:
        await store.close()
    if not latencies:
        return {"skipped": "the synthetic fault raised no alert"}
    p50, p99 = _pcts(latencies)
    return {
        "latency_p50_ms": round(p50, 3),
        "latency_p99_ms": round(p99, 3),
        "alerts": len(latencies),
    }


# --- codec ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    name: str
    content_format: int
    batch_bytes: int
    batch_records: int


def codec_levels() -> list[Level]:
    """The link policies' encodings and batch limits, and compact without deflate."""
    from agent.sync.link import DEFAULT_POLICIES
    from agent.wire.compact import CF_COMPACT

    out = [
        Level(name, p.content_format, p.batch_bytes, p.batch_records)
        for name, p in DEFAULT_POLICIES.items()
        if name in ("high", "medium", "low")
    ]
    low = DEFAULT_POLICIES["low"]
    return [*out, Level("compact", CF_COMPACT, low.batch_bytes, low.batch_records)]


def rig_readings(rig_config: Path, seconds: int) -> tuple[list[Any], dict[tuple[str, str], float]]:
    """The rig's telemetry records over ``seconds`` of the synthetic pump, each sensor at its
    interval, each value on its channel's resolution grid; and the resolutions."""
    from agent.sense.hardware import Hardware
    from agent.service import config as configmod
    from agent.wire.batch import WireRecord
    from agent.wire.predict import quantize
    from agent.wire.records import TelemetryBody
    from drivers.clock import VirtualClock
    from drivers.sim.sources import PumpModel

    cfg = configmod.load(rig_config)
    res: dict[tuple[str, str], float] = {}
    hw = Hardware(cfg, VirtualClock())  # builds the drivers; opens no bus or port
    try:
        for scfg, driver in hw.build():
            for ch in scfg.channels:
                if ch in scfg.resolution:  # the configured override wins
                    res[(scfg.name, ch)] = scfg.resolution[ch]
                    continue
                gain = abs(scfg.scaling[ch].gain) if ch in scfg.scaling else 1.0
                res[(scfg.name, ch)] = driver.resolution(scfg.source_of(ch)) * gain
    finally:
        hw.close()
    pump = PumpModel(seed=CODEC_SEED)
    sensors = [s for s in cfg.sensors if s.signals and all(c in s.signals for c in s.channels)]
    records: list[WireRecord] = []
    seq = int(CODEC_T0 * 1_000_000)
    for k in range(seconds):
        values = pump.values_at(float(k))
        for s in sensors:
            if k % max(1, round(s.interval)):
                continue
            reading = {ch: quantize(values[s.signals[ch]], res[(s.name, ch)]) for ch in s.channels}
            t = CODEC_T0 + k
            records.append(
                WireRecord(seq, "telemetry", t, TelemetryBody(s.name, t, reading).to_cbor())
            )
            seq += 1
    return records, res


def fit_batches(
    records: Sequence[Any], encode: Callable[[Sequence[Any]], bytes], level: Level
) -> list[bytes]:
    """Greedy batches: each the most records (at most ``batch_records``) whose encoding fits
    ``batch_bytes`` (binary search on the count)."""
    out: list[bytes] = []
    i = 0
    while i < len(records):
        lo, hi = 0, min(level.batch_records, len(records) - i) + 1  # lo fits, hi does not
        best = b""
        while lo + 1 < hi:
            n = (lo + hi) // 2
            data = encode(records[i : i + n])
            if len(data) <= level.batch_bytes:
                lo, best = n, data
            else:
                hi = n
        if lo == 0:
            raise ValueError(f"{level.name}: one record does not fit {level.batch_bytes} bytes")
        out.append(best)
        i += lo
    return out


_COMPACT: dict[str, Any] = {"separators": (",", ":")}


def measure_codec(rig_config: Path) -> dict[str, Any]:
    from agent.wire import codec
    from agent.wire.records import TelemetryBody

    records, res = rig_readings(rig_config, CODEC_SECONDS)
    bodies = [TelemetryBody.from_cbor(r.body) for r in records]
    readings = sum(len(b.values) for b in bodies)
    json_bytes = sum(  # one JSON object per reading, one per line
        len(json.dumps({"sensor": b.sensor, "channel": ch, "time": b.time, "value": x}, **_COMPACT))
        + 1
        for b in bodies
        for ch, x in b.values.items()
    )

    def resolution(sensor: str, channel: str) -> float | None:
        return res.get((sensor, channel))

    per: dict[str, float] = {}
    batches: dict[str, int] = {}
    for level in codec_levels():

        def encode(recs: Sequence[Any], cf: int = level.content_format) -> bytes:
            return codec.encode_batch(None, recs, cf, resolution=resolution)

        out = fit_batches(records, encode, level)
        decoded = sum(len(codec.decode_batch(b, level.content_format)[1]) for b in out)
        if decoded != len(records):
            raise AssertionError(f"{level.name}: decoded {decoded} records of {len(records)}")
        per[level.name] = round(sum(map(len, out)) / readings, 4)
        batches[level.name] = len(out)
    return {
        "bytes_per_reading": per,
        "baseline_json_bytes_per_reading": round(json_bytes / readings, 3),
        "batches": batches,
        "records": len(records),
        "readings": readings,
        "seconds": CODEC_SECONDS,
    }


# --- the run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuickSettings:
    """What a run needs to know of the agent: where, how durable, which models, which CPUs."""

    where: Path  # the run's temporary directory is made in here
    durability: str = "full"
    models_dir: Path | None = None  # None: the shipped models (agent/detect/analyzer.py)
    model: str | None = None  # None: the agent's default anomaly model (agent/detect/detector.py)
    rig_config: Path | None = None  # None: the packaged reference rig
    single_cpu: bool = True  # as the agent runs by default ([agent] cpu_affinity = "single")


def _host() -> str:
    return f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}"


def _section(doc: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one part; a model the runtime refuses skips that part and says why."""
    try:
        doc[name] = fn()
    except ModelError as err:
        doc[name] = {"skipped": str(err)}


def only_root_changes(directory: Path) -> bool:
    """Whether no user but root can add, remove or rename entries of ``directory`` (a path
    without links) or of a directory above it: each is root's and writable by no one else, or
    sticky (/tmp: another user's entries only)."""
    for d in (directory, *directory.parents):
        st = os.lstat(d)
        if st.st_uid != 0 or not stat.S_ISDIR(st.st_mode):
            return False
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return False
    return True


def run_parent(where: Path) -> Path:
    """The directory the run's temporary directory is made in: ``where``; as root, when a user
    other than root can change ``where`` or a directory above it, the nearest directory above it
    on the same filesystem that only root can change (the same storage is measured). AgentError
    when there is none (``where`` is the top of a filesystem that other user owns)."""
    if os.geteuid() != 0:
        return where
    real = Path(os.path.realpath(where))
    if only_root_changes(real):
        return real
    dev = os.stat(real).st_dev
    for d in real.parents:
        if os.stat(d).st_dev != dev:
            break
        if only_root_changes(d):
            return d
    raise AgentError(
        f"bench: another user can change {where} and no directory above it on its filesystem is "
        f"root's alone: run the bench as the owner of {where} (sudo -u edge-agent edge-agent bench "
        "--quick) or give --dir DIR"
    )


def run_quick(s: QuickSettings) -> dict[str, Any]:
    """Measure everything in a new directory in ``s.where`` (removed afterwards); the document."""
    from agent.detect.analyzer import shipped_models_dir
    from agent.detect.detector import DEFAULT_MODEL
    from agent.service.config import example_config
    from agent.service.cpu import pin_to_one_cpu

    models_dir = s.models_dir or shipped_models_dir()
    model = s.model or DEFAULT_MODEL
    rig = s.rig_config or example_config()
    started = time.perf_counter()
    fs_type = filesystem_type(s.where)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-quick-", dir=run_parent(s.where)))
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpu = pin_to_one_cpu() if s.single_cpu else None
    summary: dict[str, Any] = {}
    try:
        summary["fsync"] = measure_fsync(run_dir)
        summary["store"] = asyncio.run(measure_store(run_dir, s.durability))
        _section(summary, "inference", lambda: measure_inference(models_dir, model))
        _section(
            summary,
            "detect",
            lambda: asyncio.run(measure_detect(run_dir, models_dir, s.durability)),
        )
        summary["codec"] = measure_codec(rig)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if cpu is not None and allowed is not None:
            os.sched_setaffinity(0, allowed)
    return {
        "format": FORMAT,
        "bench": "quick",
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": _host(),
        "agent": __version__,
        "dir": str(run_dir),
        "fs_type": fs_type,
        "no_fsync": fs_type in NO_FSYNC_FS,
        "cpu": f"pinned to CPU {cpu}" if cpu is not None else "any CPU",
        "elapsed_s": round(time.perf_counter() - started, 1),
        "summary": summary,
    }


@contextlib.contextmanager
def _result_dir(data_dir: Path) -> Iterator[tuple[int, os.stat_result]]:
    """A descriptor of DATA/bench (made if missing) and DATA's stat, following no link in DATA:
    ``bench`` is opened with O_NOFOLLOW as a directory that must be root's, this user's or
    DATA's owner's (else AgentError). A new ``bench`` is fsynced into DATA on the way out."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    dfd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        owner = os.fstat(dfd)
        try:
            os.mkdir(RESULT_DIR, 0o755, dir_fd=dfd)
            made = True
        except FileExistsError:
            made = False
        bfd = _open_result_dir(dfd, result_path(data_dir).parent, owner)
        try:
            yield bfd, owner
        finally:
            os.close(bfd)
        if made:
            _fsync_quietly(dfd)
    finally:
        os.close(dfd)


def _new_file(bfd: int, name: str) -> int:
    return os.open(
        name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=bfd
    )


def check_result_dir(data_dir: Path) -> None:
    """Before the measurement: DATA/bench can be written (a new file made and removed there,
    by descriptor, as :func:`save` will); AgentError or OSError when not."""
    with _result_dir(data_dir) as (bfd, _owner):
        probe = f".{RESULT_FILE}.{secrets.token_hex(8)}.probe"
        os.close(_new_file(bfd, probe))
        os.unlink(probe, dir_fd=bfd)


def save(doc: dict[str, Any], data_dir: Path) -> Path:
    """Write ``doc`` to ``DATA/bench/quick.json`` atomically, following no link in DATA
    (:func:`_result_dir`): a new file of a random name (O_EXCL, O_NOFOLLOW) in ``bench``,
    fsynced and renamed, all by descriptor. As root, the directory and the file get the data
    directory's owner (fchown), so the agent's user can run the next bench and read it."""
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    with _result_dir(data_dir) as (bfd, owner):
        chown = os.geteuid() == 0 and owner.st_uid != 0
        tmp = f".{RESULT_FILE}.{secrets.token_hex(8)}.tmp"
        try:
            with os.fdopen(_new_file(bfd, tmp), "wb") as out:
                out.write(data)
                out.flush()
                if chown:
                    os.fchown(out.fileno(), owner.st_uid, owner.st_gid)
                os.fsync(out.fileno())
            os.replace(tmp, RESULT_FILE, src_dir_fd=bfd, dst_dir_fd=bfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=bfd)
            raise
        bench = os.fstat(bfd)
        if chown and (bench.st_uid, bench.st_gid) != (owner.st_uid, owner.st_gid):
            os.fchown(bfd, owner.st_uid, owner.st_gid)
        _fsync_quietly(bfd)  # the rename
    return result_path(data_dir)


def _fsync_quietly(fd: int) -> None:
    """fsync of a directory (some filesystems refuse it: ignored, as agent/files.py does)."""
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _open_result_dir(dfd: int, where: Path, owner: os.stat_result) -> int:
    """A descriptor of DATA/bench (``where``): not a link, a directory, root's, this user's or
    DATA's owner's."""
    fix = "remove it and run again (the bench makes the directory)"
    try:
        bfd = os.open(
            RESULT_DIR,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            dir_fd=dfd,
        )
    except OSError as err:
        if err.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        what = "not a directory"  # O_DIRECTORY|O_NOFOLLOW gives ENOTDIR for a symlink too
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(RESULT_DIR, dir_fd=dfd, follow_symlinks=False).st_mode):
                what = "a symlink: not followed"
        raise AgentError(f"bench: {where} is {what}; {fix}") from err
    st = os.fstat(bfd)
    if st.st_uid not in (0, owner.st_uid, os.geteuid()):
        os.close(bfd)
        raise AgentError(
            f"bench: {where} belongs to uid {st.st_uid}, not to root or the data directory's "
            f"owner (uid {owner.st_uid}): not written; {fix}"
        ) from PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(where))
    return bfd


def where_lines(doc: dict[str, Any]) -> list[str]:
    lines = [f"ran in {doc['dir']} ({doc['fs_type']}; removed afterwards), {doc['cpu']}"]
    if doc["no_fsync"]:
        lines.append(
            f"{doc['fs_type']}: durable here involves no fsync (the figures are RAM's, not the "
            "device's storage): give --dir DIR on the storage the agent writes to"
        )
    return lines


def format_report(doc: dict[str, Any]) -> str:
    """The run as a table: each figure and the baseline measured beside it."""
    s = doc["summary"]
    rows: list[tuple[str, str, str]] = [("figure", "value", "baseline (same run)")]
    f = s["fsync"]
    rows.append(
        (
            f"fsync after a {FSYNC_WRITE}-byte write",
            f"{f['per_s']:,.0f} /s",
            f"p50 {f['p50_ms']:.3g} ms, p99 {f['p99_ms']:.3g} ms ({f['count']} fsyncs)",
        )
    )
    st = s["store"]
    rows.append(
        (
            f"store put, batch 1 (durability {st['durability']})",
            f"{st['puts_per_s_batch1']:,.0f} records/s",
            f"plain sqlite3, a row per transaction: {st['baseline_sqlite_puts_per_s_batch1']:,.0f}"
            f"/s (ratio {st['ratio_batch1_vs_sqlite']:.2f})",
        )
    )
    rows.append(("store put, batch 100", f"{st['puts_per_s_batch100']:,.0f} records/s", ""))
    inf = s["inference"]
    if "skipped" in inf:
        rows.append(("int8 inference", "skipped", inf["skipped"]))
    else:
        rows.append(
            (
                f"int8 inference p50 / p99 ({inf['model']}, {inf['runtime']})",
                f"{inf['latency_p50_us']:.1f} / {inf['latency_p99_us']:.1f} us",
                f"bare invoke p50 {inf['baseline_invoke_p50_us']:.1f} us, "
                f"p99 {inf['baseline_invoke_p99_us']:.1f} us",
            )
        )
    det = s["detect"]
    if "skipped" in det:
        rows.append(("detect latency", "skipped", det["skipped"]))
    else:
        rows.append(
            (
                "detect latency p50 / p99 (sample -> alert committed)",
                f"{det['latency_p50_ms']:.2f} / {det['latency_p99_ms']:.2f} ms",
                f"{det['alerts']} alerts; one fsync p99 {f['p99_ms']:.3g} ms",
            )
        )
    c = s["codec"]
    base = c["baseline_json_bytes_per_reading"]
    for name, per in c["bytes_per_reading"].items():
        rows.append(
            (
                f"codec {name}: bytes per reading",
                f"{per:.3f} B",
                f"JSON object per reading {base:.1f} B (ratio {per / base:.3f})",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"edge-agent bench --quick: edge-agent {doc['agent']} on {doc['host']}"]
    lines += where_lines(doc)
    lines.append("")
    for i, (a, b, ref) in enumerate(rows):
        lines.append(f"{a.ljust(widths[0])}  {b.rjust(widths[1])}  {ref}".rstrip())
        if i == 0:
            lines.append("-" * (widths[0] + widths[1] + 24))
    lines.append(
        f"codec: {c['readings']} readings of the pump rig ({c['records']} records, "
        f"{c['seconds']} s of the synthetic pump)"
    )
    return "\n".join(lines)

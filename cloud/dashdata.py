"""What the dashboard shows, read from the endpoint's storage: the fleet, a device's telemetry
series, its alerts and anomaly threshold, and its link over time.

Every function here runs on the storage thread (``CloudServer.db(fn)``) and returns JSON-ready
dicts of bounded size, whatever the database holds. The SQL is written once, with ``?``
placeholders, in what SQLite and PostgreSQL share (row values, ``LIKE``, integer ``%``,
``LIMIT``/``OFFSET``), and runs through :meth:`cloud.storebase.Storage.reader` on either
storage; only the placeholders (and link_history's value columns) differ by dialect:

- a series holds at most :data:`MAX_POINTS` points: a longer one is cut into ``MAX_POINTS / 2``
  time buckets and keeps each bucket's lowest and highest value (spikes stay visible);
- a window is read from at most about :data:`MAX_SCAN` telemetry records: beyond that a
  pseudo-random one in k (by a hash of the seq, so that no sensor is left out by aliasing) is
  read, and the answer says ``"sampled": k``;
- at most :data:`MAX_SERIES` channels, :data:`MAX_ALERTS` alerts and :data:`MAX_DEVICES` devices;
- texts that came from devices are cut to :data:`MAX_TEXT` characters, numbers that are not
  finite become null, and a body that does not decode is counted and skipped.

Where the anomaly score comes from: the agent reports no score series (its telemetry carries the
sensor channels only, and reported state has no score). Alerts carry the score that raised or
cleared them and the threshold in force (``Alert.to_dict()``), so the score chart plots those, and
the threshold line is, in this order, the reported ``detect/<model>/threshold`` (the value in
effect on the device), the desired one, or the one the newest alert carries.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from agent.wire import statedoc
from agent.wire.records import AlertBody, RecordError, TelemetryBody
from cloud import linkhistory
from cloud.storage import Sql, Storage
from cloud.storebase import finite_float

log = logging.getLogger(__name__)

MAX_POINTS = 600  # per series
MAX_SCAN = 10_000  # telemetry records read for one window
MAX_SERIES = 48  # channels of one device
MAX_ALERTS = 500  # in one window (the newest)
MAX_DEVICES = 500  # in the fleet view
MAX_TEXT = 64
ALERT_DAY = 86_400.0  # the fleet view counts alerts over this many seconds

#: Reported keys the fleet view shows (prefixes end in "/").
FLEET_KEYS = ("queue/depth", "agent/version", "link/", "model/", "sensor/", "detect/")

#: What decoding a stored body may raise: a body stored before ingest refused it (a bignum time
#: or value: OverflowError) is undecodable like a corrupted one.
UNDECODABLE = (RecordError, OverflowError, ValueError)

# A hash of the seq in 64-bit integer arithmetic (no overflow, the same in SQLite and
# PostgreSQL): a Lehmer step modulo a prime.
_HASH = "(((seq % 1048573) * 48271) % 1048573)"


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _label(value: Any) -> str | None:
    """A text, or a number shown as text (a model version may be either)."""
    number = finite_float(value)
    if number is not None:
        return str(int(number)) if number.is_integer() else str(number)
    return _text(value)


def _key(key: Any) -> str:
    """A map key as text (one that has none, such as an integer of over 4300 digits, as its
    type's name)."""
    try:
        return str(key)[:MAX_TEXT]
    except ValueError:
        return f"<{type(key).__name__}>"


def _plain(value: Any, depth: int = 0) -> Any:
    """A reported value as JSON: texts cut, non-finite numbers null, at most 2 levels deep."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return finite_float(value)
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, dict) and depth < 2:
        items = list(value.items())[:16]
        return {_key(k): _plain(v, depth + 1) for k, v in items}
    if isinstance(value, list) and depth < 2:
        return [_plain(v, depth + 1) for v in value[:16]]
    return None


def _reported(db: Sql, devices: list[str]) -> dict[str, dict[str, Any]]:
    """Reported values of :data:`FLEET_KEYS` of ``devices``, per device (values that do not
    decode: left out)."""
    if not devices:  # "IN ()" is SQLite's only
        return {}
    where = " OR ".join("key LIKE ?" if k.endswith("/") else "key = ?" for k in FLEET_KEYS)
    args: list[Any] = [k + "%" if k.endswith("/") else k for k in FLEET_KEYS]
    sql = f"SELECT device, key, value FROM reported WHERE ({where})"
    sql += f" AND device IN ({','.join('?' * len(devices))})"
    args += devices
    out: dict[str, dict[str, Any]] = {}
    for device, key, raw in db.execute(sql, args):
        try:
            value = statedoc.decode_value(bytes(raw))
        except Exception:  # a value corrupted at rest: not shown
            continue
        out.setdefault(device, {})[key] = _plain(value)
    return out


def _summary(reported: dict[str, Any]) -> dict[str, Any]:
    """The fleet view's fields from a device's reported values."""
    models = {
        key.partition("/")[2]: value
        for key, value in sorted(reported.items())
        if key.startswith("model/") and isinstance(value, dict)
    }
    sensors = {
        key.split("/")[1]: value
        for key, value in sorted(reported.items())
        if key.startswith("sensor/") and key.endswith("/health") and key.count("/") == 2
    }
    return {
        "queue_depth": finite_float(reported.get("queue/depth")),
        "agent_version": _text(reported.get("agent/version")),
        "link": {
            "state": _text(reported.get("link/state")),
            "rtt_ms": finite_float(reported.get("link/rtt_ms")),
            "loss": finite_float(reported.get("link/loss")),
        },
        "models": {
            slot: {k: _label(v.get(k)) for k in ("name", "version", "status", "error")}
            for slot, v in models.items()
        },
        "sensors": {name: _text(v) for name, v in sensors.items()},
        "thresholds": {
            key.split("/")[1]: finite_float(value)
            for key, value in reported.items()
            if key.startswith("detect/") and key.endswith("/threshold")
        },
    }


def _alert_fields(seq: int, time: float, body: bytes) -> dict[str, Any] | None:
    try:
        data = AlertBody.from_cbor(bytes(body)).data
    except UNDECODABLE:
        return None
    channels = data.get("channels")
    top = []
    if isinstance(channels, list):
        for item in channels[:5]:
            if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
                top.append([item[0][:MAX_TEXT], finite_float(item[1])])
    return {
        "seq": seq,
        "t": finite_float(time),
        "kind": _text(data.get("kind")) or "raise",
        "score": finite_float(data.get("score")),
        "threshold": finite_float(data.get("threshold")),
        "verdict": _text(data.get("verdict")),
        "fault": _text(data.get("fault")),
        "confidence": finite_float(data.get("confidence")),
        "model": _text(data.get("model")),
        "channels": top,
    }


def _active(alert: dict[str, Any] | None) -> bool:
    """An episode is on after ``alert``: it raised one, or it is a changepoint inside one (a
    change repeats its episode's verdict, ``normal`` outside one)."""
    if alert is None:
        return False
    return alert["kind"] == "raise" or (alert["kind"] == "change" and alert["verdict"] != "normal")


def _last_alert(db: Sql, device: str, before: float | None = None) -> Any:
    sql = "SELECT seq, time, body FROM records WHERE device = ? AND kind = 'alert'"
    args: list[Any] = [device]
    if before is not None:
        sql += " AND time < ?"
        args.append(before)
    row = db.execute(sql + " ORDER BY time DESC LIMIT 1", args).fetchone()
    return None if row is None else _alert_fields(*row)


def fleet(storage: Storage, now: float) -> dict[str, Any]:
    """Every registered device (up to :data:`MAX_DEVICES`) with what it last reported."""
    with storage.reader() as db:
        return _fleet(db, now)


def _fleet(db: Sql, now: float) -> dict[str, Any]:
    rows = db.execute(
        "SELECT id, registered, last_seen FROM devices ORDER BY id LIMIT ?", (MAX_DEVICES + 1,)
    ).fetchall()
    truncated = len(rows) > MAX_DEVICES
    rows = rows[:MAX_DEVICES]
    reported = _reported(db, [r[0] for r in rows])  # of the shown devices only
    devices = []
    failed: list[str] = []
    for device, registered, last_seen in rows:
        entry: dict[str, Any] = {
            "id": device,
            "registered": finite_float(registered),
            "last_seen": finite_float(last_seen),
        }
        for part, build, empty in (
            ("records", lambda d=device: _records_part(db, d, now), _NO_RECORDS),
            ("reported", lambda d=device: _summary(reported.get(d, {})), _summary({})),
        ):
            try:
                entry.update(build())
            except (ArithmeticError, ValueError, TypeError, RecursionError) as err:
                # one device's data that no view foresaw: its entry shows that part empty
                entry.update(empty)
                entry.setdefault("unreadable", []).append(part)
                failed.append(f"{device}/{part}:{type(err).__name__}")
        devices.append(entry)
    if failed:  # one line per request, no traceback: a device's data, not the endpoint, is at fault
        log.warning(
            "event=fleet_entry_unreadable count=%d parts=%r action=left_out",
            len(failed),
            ",".join(failed[:8]),
        )
    return {"now": now, "devices": devices, "truncated": truncated}


#: :func:`_records_part` of a device whose records cannot be read.
_NO_RECORDS: dict[str, Any] = {
    "last_seq": None,
    "alerts_24h": 0,
    "last_alert": None,
    "alert_active": False,
}


def _records_part(db: Sql, device: str, now: float) -> dict[str, Any]:
    """The fleet view's fields from a device's records: its last seq and its alerts."""
    (last_seq,) = db.execute("SELECT max(seq) FROM records WHERE device = ?", (device,)).fetchone()
    (alerts,) = db.execute(
        "SELECT count(*) FROM records WHERE device = ? AND kind = 'alert' AND time >= ?",
        (device, now - ALERT_DAY),
    ).fetchone()
    last = _last_alert(db, device)
    return {
        "last_seq": last_seq,
        "alerts_24h": alerts,
        "last_alert": last,
        "alert_active": _active(last),
    }


def registered(storage: Storage, device: str) -> bool:
    with storage.reader() as db:
        return db.execute("SELECT 1 FROM devices WHERE id = ?", (device,)).fetchone() is not None


def device(storage: Storage, device: str, now: float) -> dict[str, Any] | None:
    """One device's registry entry and reported summary; None when it is not registered."""
    with storage.reader() as db:
        row = db.execute(
            "SELECT id, registered, last_seen, desired_rev FROM devices WHERE id = ?", (device,)
        ).fetchone()
        if row is None:
            return None
        last = _last_alert(db, device)
        reported = _reported(db, [device]).get(device, {})
    return {
        "id": row[0],
        "registered": finite_float(row[1]),
        "last_seen": finite_float(row[2]),
        "desired_rev": row[3],
        "last_alert": last,
        "alert_active": _active(last),
        "now": now,
        **_summary(reported),
    }


def window_end(storage: Storage, device: str, now: float, window: float) -> tuple[float, str]:
    """Where a window that was not given an end ends: now, or (when the device sent no
    telemetry in the window ending now) at its newest telemetry, so that a silent device still
    shows its last data. Returns (until, "now" | "latest")."""
    with storage.reader() as db:
        row = db.execute(
            "SELECT time FROM records WHERE device = ? AND kind = 'telemetry' "
            "ORDER BY time DESC LIMIT 1",
            (device,),
        ).fetchone()
    if row is not None and math.isfinite(row[0]) and row[0] < now - window:
        return float(row[0]), "latest"
    return now, "now"


def minmax(
    times: list[float], values: list[float], since: float, until: float, max_points: int
) -> tuple[list[float], list[float]]:
    """At most ``max_points`` points of a series (times ascending): the lowest and the highest
    value of each of ``max_points // 2`` equal time buckets, in time order."""
    if len(times) <= max_points:
        return times, values
    buckets = max(1, max_points // 2)
    width = (until - since) / buckets or 1.0
    out_t: list[float] = []
    out_v: list[float] = []
    current = -1
    lo = hi = 0

    def flush() -> None:
        for i in sorted({lo, hi}):
            out_t.append(times[i])
            out_v.append(values[i])

    for i, t in enumerate(times):
        b = min(buckets - 1, max(0, int((t - since) / width)))
        if b != current:
            if current >= 0:
                flush()
            current, lo, hi = b, i, i
        elif values[i] < values[lo]:
            lo = i
        elif values[i] > values[hi]:
            hi = i
    if current >= 0:
        flush()
    return out_t, out_v


def series(storage: Storage, device: str, since: float, until: float) -> dict[str, Any]:
    """The telemetry of ``device`` in ``[since, until]``: one series per (sensor, channel)."""
    with storage.reader() as db:
        return _series(db, device, since, until)


def _series(db: Sql, device: str, since: float, until: float) -> dict[str, Any]:
    (count,) = db.execute(
        "SELECT count(*) FROM records WHERE device = ? AND time >= ? AND time <= ?",
        (device, since, until),
    ).fetchone()
    stride = max(1, math.ceil(count / MAX_SCAN))
    sql = (
        "SELECT time, body FROM records WHERE device = ? AND kind = 'telemetry' "
        "AND time >= ? AND time <= ?"
    )
    args: list[Any] = [device, since, until]
    if stride > 1:
        sql += f" AND {_HASH} % ? = 0"
        args.append(stride)
    per: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    undecodable = dropped = 0
    for time, body in db.execute(sql + " ORDER BY time", args):
        try:
            reading = TelemetryBody.from_cbor(bytes(body))
        except UNDECODABLE:
            undecodable += 1
            continue
        for channel, value in reading.values.items():
            key = (reading.sensor[:MAX_TEXT], channel[:MAX_TEXT])
            target = per.get(key)
            if target is None:
                if len(per) >= MAX_SERIES:
                    dropped += 1
                    continue
                target = per[key] = ([], [])
            if math.isfinite(value):
                target[0].append(float(time))
                target[1].append(value)
    out = []
    for (sensor, channel), (times, values) in sorted(per.items()):
        t, v = minmax(times, values, since, until, MAX_POINTS)
        out.append({"sensor": sensor, "channel": channel, "points": len(times), "t": t, "v": v})
    return {
        "device": device,
        "since": since,
        "until": until,
        "records": count,
        "sampled": stride,
        "undecodable": undecodable,
        "dropped_channels": dropped,
        "series": out,
    }


def alerts(storage: Storage, device: str, since: float, until: float) -> dict[str, Any]:
    """The alerts of ``device`` in ``[since, until]`` (the newest :data:`MAX_ALERTS`, ascending),
    whether an alert was active at ``since``, and the threshold to draw."""
    with storage.reader() as db:
        rows = db.execute(
            "SELECT seq, time, body FROM records WHERE device = ? AND kind = 'alert' "
            "AND time >= ? AND time <= ? ORDER BY time DESC LIMIT ?",
            (device, since, until, MAX_ALERTS + 1),
        ).fetchall()
        before = _last_alert(db, device, since)
        reported = _reported(db, [device]).get(device, {})
    truncated = len(rows) > MAX_ALERTS
    items = [a for a in (_alert_fields(*r) for r in reversed(rows[:MAX_ALERTS])) if a]
    return {
        "device": device,
        "since": since,
        "until": until,
        "alerts": items,
        "truncated": truncated,
        "active_at_start": _active(before),
        **thresholds(storage, device, items[-1] if items else before, reported),
    }


def thresholds(
    storage: Storage, device: str, newest: dict[str, Any] | None, reported: dict[str, Any]
) -> dict[str, Any]:
    """Every known threshold (``reported`` values, desired, the newest alert's) and the one to
    draw."""
    known: list[dict[str, Any]] = []
    for key, value in sorted(reported.items()):
        number = finite_float(value)
        if key.startswith("detect/") and key.endswith("/threshold") and number is not None:
            known.append({"model": key.split("/")[1], "value": number, "source": "reported"})
    try:
        desired = storage.desired(device).entries
    except Exception:  # unknown device or a document that does not read: no desired threshold
        desired = {}
    for key, entry in sorted(desired.items()):
        if key.startswith("detect/") and key.endswith("/threshold"):
            value = finite_float(entry.value)
            if value is not None:
                known.append({"model": key.split("/")[1], "value": value, "source": "desired"})
    if newest is not None and newest.get("threshold") is not None:
        known.append(
            {"model": newest.get("model"), "value": newest["threshold"], "source": "alert"}
        )
    model = newest.get("model") if newest else None
    order = {"reported": 0, "desired": 1, "alert": 2}
    ranked = sorted(known, key=lambda k: (order[k["source"]], k["model"] != model))
    return {"thresholds": known, "threshold": ranked[0] if ranked else None}


def link(storage: Storage, device: str, since: float, until: float) -> dict[str, Any]:
    """The reported link over ``[since, until]`` (cloud/linkhistory.py): state changes and RTT
    and loss, with the newest reported values."""
    with storage.reader() as db:
        hist = linkhistory.history(db, device, since, until)
        reported = _reported(db, [device]).get(device, {})
    out: dict[str, Any] = {}
    for key, (times, values) in hist.items():
        name = key.partition("/")[2]
        if key == "link/state":
            out[name] = {"t": times, "v": [_text(v) for v in values]}
        else:
            pairs = [(t, finite_float(v)) for t, v in zip(times, values, strict=True)]
            ts = [t for t, v in pairs if v is not None]
            vs = [v for _, v in pairs if v is not None]
            t, v = minmax(ts, vs, since, until, MAX_POINTS)
            out[name] = {"t": t, "v": v}
    current = _summary(reported)["link"]
    return {"device": device, "since": since, "until": until, "history": out, "current": current}

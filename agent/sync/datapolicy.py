"""The per-channel data policy (``[data]``): what of each channel may leave the device.

- ``raw``: readings are sent as they are (the default);
- ``features``: the uplink sends windowed features (:mod:`agent.sync.featurize`) instead of the
  readings, which stay queued until the endpoint acknowledges the features record that stands
  for them;
- ``local``: the detector sees the values; nothing that leaves the device carries them (they are
  removed before the reading is queued, from alerts, and cloud validation is off for models
  that read them);
- ``drop``: discarded at the source (neither queued nor seen by the detector).

``local`` and ``drop`` are decided at the source, whatever the link: a privacy decision that
followed the link quality would let a channel out whenever the link is good. They are applied
again when a record is sent (:meth:`DataSettings.at_send`), so what was queued before a channel
became ``local`` or ``drop`` (the config changed and the agent restarted, or the set-aside
records were requeued) leaves without it too: a reading without it, an alert without its window
and the detail of the model channels read from it; a reading with nothing else is acknowledged
in the queue unsent, as if it had never been queued.

``raw`` and ``features`` may differ per link level (``[data.low] policy = {...}``) and are
decided at send time by the link level of that moment, so a backlog queued while offline goes
as features when the link comes back poor and raw when it comes back good. A features record
stands for whole readings, so at each level the channels a sensor sends are either all
``features`` or all ``raw`` (a config error otherwise).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agent.wire.records import AlertBody, Kind, RecordError, TelemetryBody, alert_withheld
from drivers.base import Options, Reading

RAW, FEATURES, LOCAL, DROP = "raw", "features", "local", "drop"
POLICIES = (RAW, FEATURES, LOCAL, DROP)
#: The link levels (agent/sync/link.py STATES, which imports the uplink, which imports this).
LEVELS = ("high", "medium", "low", "offline")
#: Drivers whose channels are vibration: their features include FFT band energies.
VIBRATION_DRIVERS = frozenset({"adxl345"})


@dataclass(frozen=True)
class DataSettings:
    """``[data]``: the policy of each (sensor, channel), per link level."""

    #: (sensor, channel) -> policy where the link level does not matter (local, drop, raw)
    base: Mapping[tuple[str, str], str] = field(default_factory=dict)
    #: level -> the sensors sent as features at that level
    featured: Mapping[str, frozenset[str]] = field(default_factory=dict)
    window: float = 60.0  # seconds of readings per features record (aligned to the epoch)
    window_samples: int = 0  # > 0: that many readings per features record instead
    bands: int = 8  # FFT bands of vibration channels
    vibration: frozenset[str] = frozenset()  # sensors whose channels are vibration

    def policy(self, sensor: str, channel: str, level: str | None = None) -> str:
        """The policy of a channel at ``level`` (None: the level-independent part)."""
        base = self.base.get((sensor, channel), RAW)
        if base == RAW and level is not None and sensor in self.featured.get(level, ()):
            return FEATURES
        return base

    def features_at(self, level: str | None) -> frozenset[str]:
        """The sensors whose readings go as features at ``level``."""
        return self.featured.get(level, frozenset()) if level is not None else frozenset()

    @property
    def local_channels(self) -> frozenset[tuple[str, str]]:
        return frozenset(k for k, p in self.base.items() if p == LOCAL)

    @property
    def active(self) -> bool:
        """Anything but ``raw`` anywhere."""
        return any(p != RAW for p in self.base.values()) or any(self.featured.values())

    # -- at the source -----------------------------------------------------------------------
    def at_source(self, reading: Reading) -> tuple[Reading | None, Reading | None]:
        """(what the detector sees, what is queued): ``drop`` channels removed from both,
        ``local`` ones from the queued reading; None where no channel is left."""
        if not self.base:
            return reading, reading
        sensor = reading.sensor
        seen = {c: v for c, v in reading.values.items() if self.policy(sensor, c) != DROP}
        sent = {c: v for c, v in seen.items() if self.policy(sensor, c) != LOCAL}
        detect = reading if len(seen) == len(reading.values) else _with(reading, seen)
        queue = detect if len(sent) == len(seen) else _with(reading, sent)
        return (detect if seen else None), (queue if sent else None)

    @property
    def withheld_sensors(self) -> frozenset[str]:
        """The sensors with a ``local`` or ``drop`` channel."""
        return frozenset(s for (s, _), p in self.base.items() if p in (LOCAL, DROP))

    @property
    def withholds(self) -> bool:
        """Some channel is ``local`` or ``drop``."""
        return bool(self.withheld_sensors)

    # -- at send time --------------------------------------------------------------------------
    def at_send(self, kind: str, payload: bytes, private: Collection[str] = ()) -> bytes | None:
        """A queued record's body as it may leave now: a reading without its ``local`` and
        ``drop`` channels (None when it has no other), an alert without what shows the
        ``private`` model channels; ``payload`` itself when nothing is taken out (a body that
        does not decode too: the endpoint refuses it)."""
        try:
            if kind == Kind.TELEMETRY.value and self.withholds:
                body = TelemetryBody.from_cbor(payload)
                sent = {c: v for c, v in body.values.items() if self.policy(body.sensor, c) == RAW}
                if len(sent) == len(body.values):
                    return payload
                return replace(body, values=sent).to_cbor() if sent else None
            if kind == Kind.ALERT.value and private:
                alert = AlertBody.from_cbor(payload)
                shown = alert_withheld(alert.data, private)
                return payload if shown == alert.data else replace(alert, data=shown).to_cbor()
        except RecordError:
            return payload  # the endpoint refuses it, and the uplink sets it aside
        return payload

    @classmethod
    def from_options(cls, opts: Options, sensors: Iterable[Any] = ()) -> DataSettings:
        """Parse ``[data]``; ``sensors``: the configured sensors (name, driver, channels),
        whose channels every key must name."""
        sensors = list(sensors)
        channels = {(s.name, c) for s in sensors for c in s.channels}
        base = {k: p for k, p in _policy_table(opts, (RAW, FEATURES, LOCAL, DROP), channels)}
        window = opts.number("window", 60.0, above=0.0, maximum=86400.0)
        window_samples = opts.integer("window_samples", 0, minimum=0, maximum=65536)
        bands = opts.integer("bands", 8, minimum=1, maximum=64)
        fixed = {k: p for k, p in base.items() if p in (LOCAL, DROP)}
        featured: dict[str, frozenset[str]] = {}
        for level in LEVELS:
            t = opts.table(level)
            at_level = {k: p for k, p in base.items() if p in (RAW, FEATURES)}
            for key, p in _policy_table(t, (RAW, FEATURES), channels, fixed):
                at_level[key] = p
            t.finish()
            featured[level] = _featured(at_level, fixed, sensors, f"{t.prefix}policy")
        opts.finish()
        return cls(
            base={k: p for k, p in base.items() if p != FEATURES},
            featured=featured,
            window=window,
            window_samples=window_samples,
            bands=bands,
            vibration=frozenset(s.name for s in sensors if s.driver in VIBRATION_DRIVERS),
        )


def _with(reading: Reading, values: dict[str, float]) -> Reading:
    return replace(reading, values=values)


def _policy_table(
    opts: Options,
    allowed: tuple[str, ...],
    channels: set[tuple[str, str]],
    fixed: Mapping[tuple[str, str], str] | None = None,
) -> Iterable[tuple[tuple[str, str], str]]:
    """The (sensor, channel) -> policy pairs of ``opts``' ``policy`` table; a key is a channel
    name (every sensor's channel of that name) or ``sensor/channel``; ``sensor/channel`` wins."""
    raw = opts.value("policy", {})
    if not isinstance(raw, dict):
        raise opts.error("policy", 'expected a table such as { current_a = "local" }')
    out: dict[tuple[str, str], tuple[int, str]] = {}
    for key, value in raw.items():
        where = f"policy.{key}"
        if value not in allowed:
            what = " or ".join(f'"{a}"' for a in allowed)
            extra = " (local and drop hold at every level)" if fixed is not None else ""
            raise opts.error(where, f"{value!r} is not {what}{extra}")
        sensor, _, channel = key.rpartition("/")
        hits = [(s, c) for s, c in channels if c == channel and (not sensor or s == sensor)]
        if not hits:
            raise opts.error(where, f"no sensor has a channel {key!r} (give CHANNEL or SENSOR/CH)")
        for hit in hits:
            if fixed and hit in fixed:
                raise opts.error(
                    where, f"{hit[0]}/{hit[1]} is {fixed[hit]!r} in [data]; a level cannot send it"
                )
            specific = int(bool(sensor))
            if hit not in out or out[hit][0] <= specific:
                out[hit] = (specific, value)
    return [(k, p) for k, (_, p) in out.items()]


def _featured(
    at_level: Mapping[tuple[str, str], str],
    fixed: Mapping[tuple[str, str], str],
    sensors: list[Any],
    where: str,
) -> frozenset[str]:
    """The sensors sent as features at a level: those whose sent channels are all
    ``features`` there (a mix is an error: a features record stands for whole readings)."""
    out = set()
    for s in sensors:
        sent = [c for c in s.channels if (s.name, c) not in fixed]
        marked = [c for c in sent if at_level.get((s.name, c)) == FEATURES]
        if marked and len(marked) != len(sent):
            rest = ", ".join(c for c in sent if c not in marked)
            raise Options({}, f"{where}.").error(
                f"{s.name}/{marked[0]}",
                f"a features record stands for whole readings: sensor {s.name} also sends "
                f"{rest}; give those 'features' too (or 'local'/'drop' in [data])",
            )
        if marked:
            out.add(s.name)
    return frozenset(out)

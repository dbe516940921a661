"""Device state documents and their merge rules (pure functions, no I/O).

Two documents per device (docs/protocol.md, "Device state"):

- *reported*: written by the device. ``{ key => [version, value] }``; the device numbers each
  key's versions. The endpoint keeps, per key, what the key's merge rule says.
- *desired*: written by operators. The endpoint numbers the versions: every change gets the
  document's next revision. Served as ``{"rev": uint, "keys": {key => [version, value]},
  ? "blocked": {key => version}}``.

Reported versions may run at most :data:`MAX_VERSION_AHEAD` ms ahead of the endpoint's clock
(:func:`version_limit`); the endpoint refuses an entry beyond it and merges the others.

Merge rules (:class:`Rule`): last-writer-wins by version for most keys; ``counter/...`` keys merge
by maximum; ``model/...`` keys are last-writer-wins too, and a device's report that it failed to
load the desired model version *blocks* that version: the desired document says so, the device
does not retry it, and an operator's next assignment (a new version) lifts the block.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import cbor2

from agent.errors import AgentError
from agent.wire import records

MAX_VERSION = 2**63 - 1
#: How far (ms) a reported version may run ahead of the endpoint's wall clock in ms. A device
#: numbers versions ``max(last + 1, its wall clock in ms)`` (agent/sync/state.py), so it stays
#: below this while its clock is less than this ahead of the endpoint's and it numbers fewer than
#: one version per millisecond on average; a version far ahead would freeze the key (every later
#: version of the device would be lower), so the endpoint refuses it.
MAX_VERSION_AHEAD = 30 * 86_400_000
MAX_KEY_LENGTH = 128
MAX_INTERVAL = 86_400.0
MIN_INTERVAL = 0.001

_SEG = r"[A-Za-z][A-Za-z0-9_.-]{0,62}"
REPORTED_KEY = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.-]{1,63}){0,4}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MODEL_STATUS = ("active", "loading", "failed")


class StateError(AgentError, ValueError):
    """A state document is malformed or holds a key or value the endpoint refuses."""


class Rule(StrEnum):
    """How the endpoint merges a reported key."""

    LWW = "lww"  # the highest version wins; an equal or lower version changes nothing
    MAX = "max"  # the highest value wins (monotonic counters)
    MODEL = "model"  # LWW, and a reported failure blocks the desired version it names


def rule_for(key: str) -> Rule:
    if key.startswith("counter/") or key == "desired/rev":
        return Rule.MAX
    if key.startswith("model/"):
        return Rule.MODEL
    return Rule.LWW


@dataclass(frozen=True)
class Entry:
    """One key of a state document: its version and its value (None: unset)."""

    version: int
    value: Any


def encode_value(value: Any) -> bytes:
    """The canonical CBOR of a value (storage form; equal values give equal bytes)."""
    try:
        return records.dumps(value)
    except records.RecordError as err:
        raise StateError(str(err)) from None


def decode_value(data: bytes) -> Any:
    return records.loads(data)


def _load(data: bytes, what: str) -> Any:
    try:
        return records.loads(data, max_depth=16)
    except records.RecordError as err:
        raise StateError(f"{what}: {err}") from None


def _version(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_VERSION:
        raise StateError(f"{where}: version must be an unsigned integer below 2**63")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- reported ------------------------------------------------------------------------------------


def parse_reported(data: bytes) -> dict[str, Entry]:
    """A reported-state PUT body: ``{ key => [version, value] }``; :class:`StateError` if bad."""
    doc = _load(data, "reported state")
    if not isinstance(doc, dict):
        raise StateError("reported state: expected a map of key => [version, value]")
    out: dict[str, Entry] = {}
    for key, item in doc.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not REPORTED_KEY.match(key):
            raise StateError(
                f"reported state: {key!r} is not a valid key (e.g. 'sensor/motor/health')"
            )
        if not isinstance(item, list) or len(item) != 2:
            raise StateError(f"reported state: {key}: expected [version, value]")
        version = _version(item[0], f"reported state: {key}")
        value = item[1]
        rule = rule_for(key)
        if rule is Rule.MAX and not (_number(value) and math.isfinite(value) and value >= 0):
            raise StateError(f"reported state: {key}: a counter is a non-negative number")
        if rule is Rule.MODEL and not _valid_model_report(value):
            raise StateError(
                f"reported state: {key}: expected {{name, status: active|loading|failed, "
                "? desired: version, ? error}"
            )
        out[key] = Entry(version, value)
    return out


def _valid_model_report(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or value.get("status") not in MODEL_STATUS:
        return False
    if "name" in value and not isinstance(value["name"], str):
        return False
    desired = value.get("desired")
    return desired is None or (
        isinstance(desired, int) and not isinstance(desired, bool) and 0 <= desired <= MAX_VERSION
    )


def merge_reported(stored: Entry | None, incoming: Entry, rule: Rule) -> Entry | None:
    """The entry to store for a reported key, or None when the stored one stays."""
    if stored is None:
        return incoming
    if rule is Rule.MAX:
        value = max(stored.value, incoming.value)
        version = max(stored.version, incoming.version)
        if version == stored.version and value == stored.value:
            return None
        return Entry(version, value)
    return incoming if incoming.version > stored.version else None


def version_limit(now: float, stored: Entry | None) -> int:
    """The highest version the endpoint takes for a reported key at its wall time ``now`` (s):
    :data:`MAX_VERSION_AHEAD` above its clock in ms, or one above the version it holds already
    (so a key stored before the limit existed can still be overtaken)."""
    limit = int(now * 1000) + MAX_VERSION_AHEAD
    if stored is not None:
        limit = max(limit, stored.version + 1)
    return min(limit, MAX_VERSION)


def model_failure(key: str, entry: Entry) -> int | None:
    """The desired version a reported ``model/...`` entry says failed, if it says so."""
    value = entry.value
    if rule_for(key) is not Rule.MODEL or not isinstance(value, dict):
        return None
    if value.get("status") != "failed":
        return None
    desired = value.get("desired")
    return desired if isinstance(desired, int) and not isinstance(desired, bool) else None


def encode_reported(entries: Mapping[str, Entry]) -> bytes:
    return records.dumps({k: [e.version, e.value] for k, e in entries.items()})


# -- desired -------------------------------------------------------------------------------------


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _interval(value: Any) -> str | None:
    ok = _number(value) and MIN_INTERVAL <= value <= MAX_INTERVAL
    return None if ok else f"seconds, {MIN_INTERVAL}..{MAX_INTERVAL:g}"


def _finite(value: Any) -> str | None:
    return None if _number(value) and math.isfinite(value) else "a finite number"


def _model(value: Any) -> str | None:
    expected = '{"name": text, ? "sha256": 64 hex digits, ? "version": text}'
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return expected
    if not set(value) <= {"name", "sha256", "version"}:
        return expected
    if "sha256" in value and not (
        isinstance(value["sha256"], str) and SHA256_HEX.match(value["sha256"])
    ):
        return expected
    if "version" in value and not isinstance(value["version"], str):
        return expected
    return None


DESIRED_KEYS: tuple[tuple[re.Pattern[str], Any, str], ...] = (
    (re.compile(rf"^sensor/{_SEG}/enabled$"), _bool, "sensor/<name>/enabled"),
    (re.compile(rf"^sensor/{_SEG}/interval$"), _interval, "sensor/<name>/interval"),
    (re.compile(rf"^detect/{_SEG}/threshold$"), _finite, "detect/<name>/threshold"),
    (re.compile(rf"^model/{_SEG}$"), _model, "model/<slot>"),
)


def check_desired(key: Any, value: Any) -> None:
    """:class:`StateError` unless ``key`` is a desired key and ``value`` fits it (None unsets)."""
    if not isinstance(key, str):
        raise StateError(f"desired state: key {key!r} is not text")
    for pattern, check, _ in DESIRED_KEYS:
        if pattern.match(key):
            problem = None if value is None else check(value)
            if problem:
                raise StateError(f"desired state: {key}: expected {problem}, got {value!r}")
            return
    known = ", ".join(name for _, _, name in DESIRED_KEYS)
    raise StateError(f"desired state: unknown key {key!r} (known: {known})")


def parse_desired_changes(data: bytes) -> dict[str, Any]:
    """A desired-state PUT body: ``{ key => value / null }``; :class:`StateError` if bad."""
    doc = _load(data, "desired state")
    if not isinstance(doc, dict):
        raise StateError("desired state: expected a map of key => value")
    for key, value in doc.items():
        check_desired(key, value)
    return doc


@dataclass(frozen=True)
class DesiredDoc:
    """The desired state of one device."""

    rev: int = 0
    entries: dict[str, Entry] = field(default_factory=dict)
    blocked: dict[str, int] = field(default_factory=dict)

    def to_cbor(self) -> bytes:
        doc: dict[str, Any] = {
            "rev": self.rev,
            "keys": {k: [e.version, e.value] for k, e in self.entries.items()},
        }
        if self.blocked:
            doc["blocked"] = dict(self.blocked)
        return records.dumps(doc)

    def etag(self) -> bytes:
        """The CoAP ETag of the encoded document (8 bytes of its SHA-256)."""
        return hashlib.sha256(self.to_cbor()).digest()[:8]

    @classmethod
    def from_cbor(cls, data: bytes) -> DesiredDoc:
        doc = _load(data, "desired document")
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
            raise StateError("desired document: expected {rev, keys, ? blocked}")
        rev = _version(doc.get("rev"), "desired document: rev")
        entries: dict[str, Entry] = {}
        for key, item in doc["keys"].items():
            if not isinstance(key, str) or not isinstance(item, list) or len(item) != 2:
                raise StateError("desired document: keys map key => [version, value]")
            entries[key] = Entry(_version(item[0], f"desired document: {key}"), item[1])
        blocked_raw = doc.get("blocked", {})
        if not isinstance(blocked_raw, dict):
            raise StateError("desired document: blocked maps key => version")
        blocked = {
            str(k): _version(v, f"desired document: blocked {k}") for k, v in blocked_raw.items()
        }
        return cls(rev, entries, blocked)


def apply_desired(doc: DesiredDoc, changes: Mapping[str, Any]) -> tuple[DesiredDoc, list[str]]:
    """Apply an operator's changes: (the new document, the keys that changed).

    Changed keys get version ``doc.rev + 1``, which becomes the new ``rev``. Setting a key to the
    value it has is no change, except for a blocked model key: assigning it again is the operator
    asking for a retry, so it gets a new version and the block is lifted. ``None`` unsets a key
    (kept as ``[version, null]`` so the device learns of it).
    """
    version = doc.rev + 1
    entries = dict(doc.entries)
    blocked = dict(doc.blocked)
    changed: list[str] = []
    for key, value in changes.items():
        check_desired(key, value)
        current = entries.get(key)
        if current is None and value is None:
            continue
        if (
            current is not None
            and encode_value(current.value) == encode_value(value)
            and blocked.get(key) != current.version
        ):
            continue
        entries[key] = Entry(version, value)
        blocked.pop(key, None)
        changed.append(key)
    if not changed:
        return doc, []
    return DesiredDoc(version, entries, blocked), changed


def block_failures(doc: DesiredDoc, failures: Mapping[str, int]) -> DesiredDoc:
    """Block each desired key whose current version the device reported as failed."""
    blocked = dict(doc.blocked)
    for key, version in failures.items():
        entry = doc.entries.get(key)
        if entry is not None and entry.version == version:
            blocked[key] = version
    if blocked == doc.blocked:
        return doc
    return DesiredDoc(doc.rev, doc.entries, blocked)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` from a command line: the value is JSON if it parses, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise StateError(f"{text!r}: expected key=value (e.g. sensor/motor/interval=0.5)")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    check_desired(key, value)
    return key, value


def to_json(value: Any) -> Any:
    """A CBOR value made printable as JSON (bytes as hex, non-finite floats as strings)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, cbor2.CBORTag):
        return {"tag": value.tag, "value": to_json(value.value)}
    return str(value)

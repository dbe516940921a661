"""Device state documents and their merge rules (pure functions, no I/O).

Two documents per device (docs/protocol.md, "Device state"):

- *reported*: written by the device. ``{ key => [version, value] }``; the device numbers each
  key's versions. The endpoint keeps, per key, what the key's merge rule says.
- *desired*: written by operators. The endpoint numbers the versions: every change gets the
  document's next revision. Served as ``{"rev": uint, "keys": {key => [version, value]},
  ? "blocked": {key => version}}``.

Reported versions may run at most :data:`MAX_VERSION_AHEAD` ms ahead of the endpoint's clock
(:func:`version_limit`); the endpoint refuses an entry beyond it and merges the others.

Desired values are judged one key at a time, on both sides: a value is at most
:data:`MAX_VALUE_BYTES` of CBOR nested at most :data:`MAX_VALUE_DEPTH` deep, and every number is
in its key's range (:data:`DESIRED_RANGES`). The endpoint refuses a write that breaks a rule
(:func:`parse_desired_changes`, :func:`check_desired`); the device splits a served document into
its keys before decoding any value (:func:`parse_desired_document`, with
:mod:`agent.wire.cborscan`), so a hostile value costs only its own key.

No text in either document (a key or a value, at any depth) holds a NUL (:func:`nul_text`): no
PostgreSQL text keeps one. Other control characters stay in values (a reason may carry a line
break; views escape them); keys are names, without any (:data:`REPORTED_KEY`, DESIRED_KEYS).

Merge rules (:class:`Rule`, by key: :func:`rule_for`):

==========================================  ======  ============================================
key                                         rule    why
==========================================  ======  ============================================
``agent/version``, ``sensor/*/health``,     LWW     one writer (the device); the highest version
``sensor/*/enabled|interval``,                      is the newest value, whatever the order in
``detect/*/threshold``, ``queue/depth``,            which PUTs arrive (a delayed or repeated PUT
``link/*``, ``desired/errors``, others              never rolls a key back)
``counter/*``                               MAX     LWW is wrong for monotonic counters: after a
                                                    lost state directory the version clock may
                                                    restart lower and new counts would be
                                                    ignored; a delayed PUT could lower a count
``desired/rev``                             MAX     the highest desired revision processed; a
                                                    delayed report of an older revision must not
                                                    make the endpoint believe it was undone
``model/<slot>``                            MODEL   LWW, except that a reported failure
                                                    (``status: failed``, ``desired: version``)
                                                    *blocks* that desired version: LWW alone
                                                    would have the device retry a model that
                                                    cannot load after every restart
==========================================  ======  ============================================
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
from agent.wire import cborscan, commands, records
from agent.wire.batch import MAX_STORE_ID
from agent.wire.cborscan import ScanError, Span
from agent.wire.learning import LearningError, RoundTask

MAX_VERSION = 2**63 - 1
#: How far (ms) a reported version may run ahead of the endpoint's wall clock in ms. A device
#: numbers versions ``max(last + 1, its wall clock in ms)`` (agent/sync/state.py), so it stays
#: below this while its clock is less than this ahead of the endpoint's and it numbers fewer than
#: one version per millisecond on average; a version far ahead would freeze the key (every later
#: version of the device would be lower), so the endpoint refuses it.
MAX_VERSION_AHEAD = 30 * 86_400_000
MAX_KEY_LENGTH = 128
#: The deterministic CBOR of one desired value takes at most this many bytes (the largest valid
#: one, a model assignment with a 64-character name, version and SHA-256, takes 219).
MAX_VALUE_BYTES = 256
#: A desired value nests at most this deep (a model assignment, a map of text, is 1 deep).
MAX_VALUE_DEPTH = 4
#: The range (inclusive) of each number a desired key takes, in the key's unit
#: (docs/protocol.md "Desired state").
MIN_INTERVAL, MAX_INTERVAL = 0.001, 86_400.0  # s: as ``[[sensor]] interval`` in the config
#: The detector's anomaly score is the largest standardised residual of the newest sample;
#: calibrated thresholds are about 0.5..1.5 (models/manifest.json). Above 100 no sample ever
#: alerts (alerts silently off), below 0.01 every sample does.
MIN_THRESHOLD, MAX_THRESHOLD = 0.01, 100.0
DESIRED_RANGES = {
    "sensor/<name>/interval": (MIN_INTERVAL, MAX_INTERVAL),
    "detect/<name>/threshold": (MIN_THRESHOLD, MAX_THRESHOLD),
}

_SEG = r"[A-Za-z][A-Za-z0-9_.-]{0,62}"
REPORTED_KEY = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.-]{1,63}){0,4}\Z")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
#: Model names and versions (as agent.modelstore.signing.NAME_RE, which agent.wire cannot import).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")
MODEL_STATUS = ("active", "loading", "failed")


class StateError(AgentError, ValueError):
    """A state document is malformed or holds a key or value the endpoint refuses."""


class ValueTooLarge(StateError):
    """A desired value is larger than :data:`MAX_VALUE_BYTES` (the endpoint answers 4.13)."""


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


class RawValue:
    """A stored desired value that is well-formed CBOR but does not decode here (nested deeper
    than the decoder goes: written before the limits, or around the endpoint). It is served as
    its bytes, so the device refuses that key (and says so in ``desired/errors``)."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawValue) and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"<raw CBOR value of {len(self.data)} bytes>"


def _raw(encoder: Any, value: Any) -> None:
    if isinstance(value, RawValue):
        encoder.write(value.data)
        return
    raise TypeError(f"cannot encode {type(value).__name__}")


def _dumps(obj: Any) -> bytes:
    """Deterministic CBOR, with :class:`RawValue` written as its bytes."""
    try:
        return cbor2.dumps(obj, canonical=True, default=_raw)
    except (cbor2.CBOREncodeError, TypeError, ValueError, RecursionError) as err:
        raise StateError(f"cannot encode as CBOR: {err}") from None


def encode_value(value: Any) -> bytes:
    """The canonical CBOR of a value (storage form; equal values give equal bytes)."""
    if isinstance(value, RawValue):
        return value.data
    return _dumps(value)


def decode_value(data: bytes) -> Any:
    """A stored reported value: as :func:`decode_stored` (a value an older endpoint stored that
    this one would refuse, a bignum say, is a :class:`RawValue`: shown and replaced, never an
    error at every later report of the key); bytes that are not CBOR at all (damaged at rest)
    are a RawValue of a text saying so, replaced by the device's next report of the key too."""
    try:
        return decode_stored(data)
    except StateError:
        size = len(data) if isinstance(data, bytes) else 0
        return RawValue(records.dumps(f"unreadable stored value ({size} bytes)"))


def decode_stored(data: bytes) -> Any:
    """A stored desired value: decoded, or a :class:`RawValue` when it is well-formed CBOR that
    does not decode; :class:`StateError` when it is not CBOR at all (corrupted at rest)."""
    if not isinstance(data, bytes):
        raise StateError(f"stored value: {type(data).__name__}, not CBOR bytes")
    try:
        return records.loads(data)
    except records.RecordError as err:
        try:
            span = cborscan.scan(data)
        except ScanError:
            raise StateError(f"stored value: {err}") from None
        if span.end != len(data):
            raise StateError(f"stored value: {err}") from None
        return RawValue(data)


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


def nul_text(value: Any) -> str | None:
    """The first text in ``value`` (a map key or a value, at any depth) that holds a NUL
    character, or None. Iterative; a value met twice is walked twice (callers refuse shared and
    cyclic values first: :func:`agent.wire.records.check_plain`, the depth limit)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return item
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list | tuple):
            todo.extend(item)
    return None


def _nul_refusal(what: str, value: Any) -> StateError | None:
    text = nul_text(value)
    if text is None:
        return None
    return StateError(f"{what}: the text {show(text)} holds a NUL character (U+0000)")


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
        try:  # the decoder refused tags (bignums, shared values); simple values are left
            records.check_plain(value, f"reported state: {key}")
        except records.RecordError as err:
            raise StateError(str(err)) from None
        if nul := _nul_refusal(f"reported state: {key}", value):
            raise nul
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
    """The entry to store for a reported key, or None when the stored one stays. A stored
    value this endpoint cannot read (a :class:`RawValue`) is replaced."""
    if stored is None or isinstance(stored.value, RawValue):
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


def _in_range(value: Any, low: float, high: float) -> bool:
    # comparisons, not math.isfinite: a bignum compares fine where a float conversion overflows;
    # NaN compares False
    return _number(value) and low <= value <= high


def _interval(value: Any) -> str | None:
    if _in_range(value, MIN_INTERVAL, MAX_INTERVAL):
        return None
    return f"seconds, {MIN_INTERVAL:g}..{MAX_INTERVAL:g}"


def _threshold(value: Any) -> str | None:
    if _in_range(value, MIN_THRESHOLD, MAX_THRESHOLD):
        return None
    return f"an anomaly score threshold, {MIN_THRESHOLD:g}..{MAX_THRESHOLD:g}"


def _model(value: Any) -> str | None:
    expected = (
        '{"name": model name, ? "sha256": 64 hex digits, ? "version": text} '
        "(names and versions: 1-64 letters, digits, '_', '.', '+', '-')"
    )
    if not isinstance(value, dict) or not set(value) <= {"name", "sha256", "version"}:
        return expected
    name = value.get("name")
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        return expected
    if "sha256" in value and not (
        isinstance(value["sha256"], str) and SHA256_HEX.match(value["sha256"])
    ):
        return expected
    version = value.get("version")
    if "version" in value and not (isinstance(version, str) and MODEL_NAME.match(version)):
        return expected
    return None


def _learn(value: Any) -> str | None:
    try:
        RoundTask.from_value(value)
    except LearningError as err:
        return f"a round task (docs/learning.md): {err}"
    return None


def agent_version(value: Any) -> str | None:
    """``agent/version``: a signed release (docs/ota.md); None when ``value`` is one."""
    if (
        isinstance(value, dict)
        and set(value) == {"version", "sha256"}
        and isinstance(value["version"], str)
        and MODEL_NAME.match(value["version"])
        and isinstance(value["sha256"], str)
        and SHA256_HEX.match(value["sha256"])
    ):
        return None
    return '{"version": release version, "sha256": 64 hex digits} (edge-agent-cloud releases list)'


DESIRED_KEYS: tuple[tuple[re.Pattern[str], Any, str], ...] = (
    (re.compile(rf"^sensor/{_SEG}/enabled\Z"), _bool, "sensor/<name>/enabled"),
    (re.compile(rf"^sensor/{_SEG}/interval\Z"), _interval, "sensor/<name>/interval"),
    (re.compile(rf"^detect/{_SEG}/threshold\Z"), _threshold, "detect/<name>/threshold"),
    (re.compile(rf"^model/{_SEG}\Z"), _model, "model/<slot>"),
    (re.compile(rf"^learn/{_SEG}\Z"), _learn, "learn/<model>"),
    (re.compile(r"^agent/version\Z"), agent_version, "agent/version"),
    (
        re.compile(rf"^command/({'|'.join(commands.NAMES)})\Z"),
        commands.check_value,
        "command/<name>",
    ),
)


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages and logs (a hostile value
    may be kilobytes long or nested thousands deep)."""
    if isinstance(value, str | bytes) and len(value) > limit:
        value = value[:limit]
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _depth(value: Any) -> int:
    """How deep the containers of a decoded value nest (0 for a scalar), without recursion."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: list[Any] = [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            children = list(item)
        elif isinstance(item, cbor2.CBORTag):
            todo.append((item.value, depth))
            continue
        else:
            continue
        deepest = max(deepest, depth + 1)
        todo.extend((child, depth + 1) for child in children)
    return deepest


def value_problem(key: str, size: int, depth: int) -> StateError | None:
    """The refusal of a value of ``size`` CBOR bytes nested ``depth`` deep, if over a limit."""
    if size > MAX_VALUE_BYTES:
        return ValueTooLarge(
            f"desired state: {key}: the value has {size} bytes, at most {MAX_VALUE_BYTES}"
        )
    if depth > MAX_VALUE_DEPTH:
        return StateError(
            f"desired state: {key}: the value is nested {depth} deep, at most {MAX_VALUE_DEPTH}"
        )
    return None


def check_desired(key: Any, value: Any) -> None:
    """:class:`StateError` unless ``key`` is a desired key and ``value`` fits it (None unsets):
    its size and depth limits, its type, its range (:class:`ValueTooLarge` for the size)."""
    if not isinstance(key, str):
        raise StateError(f"desired state: key {show(key)} is not text")
    if isinstance(value, RawValue):
        span = _scan_whole(value.data)
        problem = value_problem(key, len(value.data), span.depth if span else 0)
        raise problem or StateError(f"desired state: {key}: the value does not decode")
    depth = _depth(value)
    # the size of a value too deep is not needed (and it may not even encode)
    size = 0 if depth > MAX_VALUE_DEPTH else len(encode_value(value))
    problem = value_problem(key, size, depth) or _nul_refusal(f"desired state: {key}", value)
    if problem is not None:
        raise problem
    for pattern, check, _ in DESIRED_KEYS:
        if pattern.match(key):
            wrong = None if value is None else check(value)
            if wrong:
                raise StateError(f"desired state: {key}: expected {wrong}, got {show(value)}")
            return
    known = ", ".join(name for _, _, name in DESIRED_KEYS)
    raise StateError(f"desired state: unknown key {show(key)} (known: {known})")


def _scan_whole(data: bytes) -> Span | None:
    try:
        span = cborscan.scan(data)
    except ScanError:
        return None
    return span if span.end == len(data) else None


def _text_key(data: bytes, span: Span, what: str) -> str:
    """A map key that must be text of at most :data:`MAX_KEY_LENGTH` characters."""
    if len(span) > MAX_KEY_LENGTH * 4 + 3:
        raise StateError(f"{what}: a key of {len(span)} bytes is too long")
    try:
        key = records.loads(span.of(data), max_depth=1)
    except records.RecordError as err:
        raise StateError(f"{what}: a key does not decode: {err}") from None
    if not isinstance(key, str):
        raise StateError(f"{what}: key {show(key)} is not text")
    return key


def _split(data: bytes, span: Span | None, what: str, expected: str) -> list[tuple[Span, Span]]:
    """The entries of the CBOR map at ``span`` (None: the whole of ``data``, which must be one
    item), split but not decoded; :class:`StateError` with ``expected`` if it is not a map."""
    try:
        if span is None:
            span = cborscan.scan(data)
            if span.end != len(data):
                raise StateError(f"{what}: {len(data) - span.end} bytes after the CBOR item")
        if data[span.start] >> 5 != 5:
            raise StateError(f"{what}: expected {expected}")
        # an indefinite-length map of an odd number of items scans, but is no map
        return cborscan.entries(data, span)
    except ScanError as err:
        raise StateError(f"{what}: not valid CBOR: {err}") from None


def decode_desired_value(key: str, data: bytes, span: Span) -> Any:
    """One desired value from its span, after its size and depth limits (:class:`StateError`
    says which was broken, or why it does not decode)."""
    problem = value_problem(key, len(span), span.depth)
    if problem is not None:
        raise problem
    try:
        return records.loads(span.of(data), max_depth=MAX_VALUE_DEPTH + 1)
    except records.RecordError as err:
        raise StateError(f"desired state: {key}: {err}") from None


def parse_desired_changes(data: bytes) -> dict[str, Any]:
    """A desired-state PUT body: ``{ key => value / null }``; :class:`StateError` if bad, naming
    the first key that breaks a rule (its limits are checked before it is decoded)."""
    what = "desired state"
    out: dict[str, Any] = {}
    for key_span, value_span in _split(data, None, what, "a map of key => value"):
        key = _text_key(data, key_span, what)
        if key in out:
            raise StateError(f"{what}: {key} appears twice")
        value = decode_desired_value(key, data, value_span)
        check_desired(key, value)
        out[key] = value
    return out


@dataclass(frozen=True)
class Refusal:
    """A desired value refused before it was decoded: its version, why, and its CBOR bytes."""

    version: int
    error: str
    data: bytes


@dataclass(frozen=True)
class DesiredParse:
    """A desired document split key by key (:func:`parse_desired_document`): ``entries`` hold
    the values that decoded within the limits (their keys' rules are checked by the reader),
    ``refused`` the values that did not, ``problems`` the entries that have no text key or no
    version (they cannot even be refused by version), as (key or its repr, why)."""

    rev: int
    entries: dict[str, Entry]
    blocked: dict[str, int]
    problems: list[tuple[str, str]]
    refused: dict[str, Refusal]
    store: str | None = None  # the storage identity the endpoint names, if any


def _small(data: bytes, span: Span, what: str) -> Any:
    """A small scalar (a version): at most 16 bytes of CBOR, decoded."""
    if len(span) > 16:
        raise StateError(f"{what}: {len(span)} bytes where a number belongs")
    try:
        return records.loads(span.of(data), max_depth=1)
    except records.RecordError as err:
        raise StateError(f"{what}: {err}") from None


def parse_desired_document(payload: bytes) -> DesiredParse:
    """A served desired document ``{rev, keys, ? blocked}``, read key by key.

    The document is split before any value is decoded: a value over its limits
    (:data:`MAX_VALUE_BYTES`, :data:`MAX_VALUE_DEPTH`) or one that does not decode is refused
    with its version (``refused``) and costs no other key. :class:`StateError` only when there
    is no document to read at all: not well-formed CBOR, not a map, no ``keys`` map, no valid
    ``rev``. A key that comes twice is refused (which one was meant?)."""
    what = "desired document"
    expected = "{rev, keys, ? blocked}"
    fields: dict[str, Span] = {}
    for key_span, value_span in _split(payload, None, what, expected):
        try:
            name = _text_key(payload, key_span, what)
        except StateError:
            continue  # not one of ours: ignored
        if name in fields:
            raise StateError(f"{what}: {name} appears twice")
        fields[name] = value_span
    if "rev" not in fields:
        raise StateError(f"{what}: rev must be an unsigned integer, got nothing")
    rev = _small(payload, fields["rev"], f"{what}: rev")
    if not _is_version(rev):
        raise StateError(f"{what}: rev must be an unsigned integer, got {show(rev)}")
    if "keys" not in fields:
        raise StateError(f"{what}: expected {expected}")
    entries: dict[str, Entry] = {}
    refused: dict[str, Refusal] = {}
    problems: list[tuple[str, str]] = []
    twice: set[str] = set()
    for key_span, item_span in _split(payload, fields["keys"], what, expected):
        try:
            key = _text_key(payload, key_span, what)
        except StateError as err:
            problems.append((show(key_span.of(payload)), str(err)))
            continue
        if key in entries or key in refused:
            twice.add(key)
        try:
            if payload[item_span.start] >> 5 != 4:
                raise StateError(f"expected [version, value], got {_show_span(payload, item_span)}")
            pair = cborscan.items(payload, item_span)
            if len(pair) != 2:
                raise StateError(f"expected [version, value], got {len(pair)} items")
            version = _small(payload, pair[0], f"{what}: {key}: version")
            if not _is_version(version):
                raise StateError(f"expected [version, value], version {show(version)}")
        except StateError as err:
            problems.append((key, str(err)))
            continue
        try:
            entries[key] = Entry(version, decode_desired_value(key, payload, pair[1]))
        except StateError as err:
            entries.pop(key, None)
            refused[key] = Refusal(version, str(err), pair[1].of(payload))
    for key in twice:
        version = max(
            e.version for e in (entries.pop(key, None), refused.get(key)) if e is not None
        )
        refused[key] = Refusal(version, f"desired state: {key} appears twice", b"")
    blocked: dict[str, int] = {}
    if "blocked" in fields:
        try:
            pairs = _split(payload, fields["blocked"], what, "a map of key => version")
        except StateError as err:
            problems.append(("blocked", str(err)))
            pairs = []
        for key_span, version_span in pairs:
            try:
                key = _text_key(payload, key_span, what)
                version = _small(payload, version_span, f"{what}: blocked {key}")
            except StateError:
                continue
            if _is_version(version):
                blocked[key] = version
    return DesiredParse(rev, entries, blocked, problems, refused, _store(payload, fields))


def _store(payload: bytes, fields: Mapping[str, Span]) -> str | None:
    """The storage identity a document names (anything else there is ignored, as an older
    endpoint names none)."""
    span = fields.get("store")
    if span is None or len(span) > MAX_STORE_ID + 2:
        return None
    try:
        named = records.loads(span.of(payload), max_depth=1)
    except records.RecordError:
        return None
    return named if isinstance(named, str) and 0 < len(named) <= MAX_STORE_ID else None


def _show_span(data: bytes, span: Span) -> str:
    if len(span) > 64:
        return f"{len(span)} bytes"
    try:
        return show(records.loads(span.of(data)))
    except records.RecordError:
        return f"{len(span)} bytes"


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_VERSION


@dataclass(frozen=True)
class DesiredDoc:
    """The desired state of one device. A value may be a :class:`RawValue` (a stored value
    that does not decode), which is served as it is."""

    rev: int = 0
    entries: dict[str, Entry] = field(default_factory=dict)
    blocked: dict[str, int] = field(default_factory=dict)
    store: str | None = None  # the identity of the endpoint's storage (docs/protocol.md)

    def to_cbor(self) -> bytes:
        doc: dict[str, Any] = {
            "rev": self.rev,
            "keys": {k: [e.version, e.value] for k, e in self.entries.items()},
        }
        if self.blocked:
            doc["blocked"] = dict(self.blocked)
        if self.store is not None:
            doc["store"] = self.store
        return _dumps(doc)

    def etag(self) -> bytes:
        """The CoAP ETag of the encoded document (8 bytes of its SHA-256)."""
        return hashlib.sha256(self.to_cbor()).digest()[:8]

    @classmethod
    def from_cbor(cls, data: bytes) -> DesiredDoc:
        """The document as served; a value over the limits is kept as a :class:`RawValue`.
        :class:`StateError` if an entry is not ``key => [version, value]``."""
        parsed = parse_desired_document(data)
        if parsed.problems:
            where, why = parsed.problems[0]
            raise StateError(f"desired document: {where}: {why}")
        entries = dict(parsed.entries)
        for key, refusal in parsed.refused.items():
            entries[key] = Entry(refusal.version, RawValue(refusal.data))
        return cls(parsed.rev, dict(sorted(entries.items())), parsed.blocked, parsed.store)


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
    return DesiredDoc(version, entries, blocked, doc.store), changed


def block_failures(doc: DesiredDoc, failures: Mapping[str, int]) -> DesiredDoc:
    """Block each desired key whose current version the device reported as failed."""
    blocked = dict(doc.blocked)
    for key, version in failures.items():
        entry = doc.entries.get(key)
        if entry is not None and entry.version == version:
            blocked[key] = version
    if blocked == doc.blocked:
        return doc
    return DesiredDoc(doc.rev, doc.entries, blocked, doc.store)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` from a command line: the value is JSON if it parses, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise StateError(f"{text!r}: expected key=value (e.g. sensor/motor/interval=0.5)")
    try:
        value = json.loads(raw)
    except RecursionError:
        too_deep = f"{key}: the value is nested too deep (at most {MAX_VALUE_DEPTH})"
        raise StateError(too_deep) from None
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
    if isinstance(value, RawValue):
        return {"undecodable_cbor": value.data[:64].hex(), "bytes": len(value.data)}
    return str(value)

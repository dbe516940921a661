"""State sync's data: its settings, the hooks it calls, the persisted state file's format, and
the parsing and checks of the documents it exchanges with the endpoint (no I/O here).

Persistence: one file (``[state] path``, deterministic CBOR), written atomically (temp file, fsync,
rename, fsync of the directory) *after* desired keys are applied and whenever reported versions or
pending keys change::

    {"format": 1, "device": tstr, "clock": uint,            ; last reported version issued
     "rev": uint,                                           ; highest desired rev processed
     "reported": {key => [version, value]},                 ; last value numbered per key
     "pending": [* key],                                    ; not yet acknowledged by the endpoint
     "applied": {key => [version, value / null]},           ; desired keys applied
     "failed": {key => [version, error: tstr, name: tstr / null]}}  ; desired versions refused

Versions: every reported key carries a version from a hybrid clock, ``max(last + 1, wall-clock
ms)``; the last version is persisted (``clock``), so versions keep increasing across restarts
even when the wall clock steps back, and after a lost state file they start again from the wall
clock. If the endpoint answers with a higher version than the one sent (our clock was behind),
the clock catches up and the key is sent again with a newer version. If it leaves out a key
whose version runs more than ``MAX_VERSION_AHEAD`` ahead of the device's own wall clock (numbered
while that clock ran ahead, years maybe, and since set back), the clock is set back to the wall
clock (:func:`rewound_clock`) and the key numbered again: the endpoint would refuse that version
until its own clock reached it.

A crash between applying a key and persisting it re-applies that key once after the restart (the
same value, so harmless). What was applied or refused is written at once; a document that changes
only ``rev`` is not (a flood of them would write the file each time): the rev is written with the
next save, at most one per ``min_put_interval`` when nothing else changes, and a crash before it
only reports an older rev until the next notification.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.wire import records, statedoc
from agent.wire.records import RecordError
from agent.wire.statedoc import Entry, Rule, StateError
from drivers.base import Options

#: Longest error text kept and reported for a refused desired value.
ERROR_TEXT_MAX = 200
#: ``desired/errors`` is kept to this many bytes of CBOR (the newest refusals first), so that
#: the reported PUT that carries it stays well below the endpoint's 8 KiB body limit whatever a
#: document held.
ERRORS_REPORT_BYTES = 4096
STATE_FORMAT = 1
ERRORS_KEY = "desired/errors"
REV_KEY = "desired/rev"
#: The state file's default name, relative to the data directory.
STATE_FILE = "state.cbor"


@dataclass(frozen=True)
class StateSettings:
    """``[state]``: how often reported state is sent, the deadline of each exchange, and where
    the state file lives."""

    report_interval: float = 300.0  # full reported PUT at least this often
    min_put_interval: float = 2.0  # coalesce changes: at most one PUT per this many seconds
    deadline: float = 30.0  # per exchange
    path: Path = Path(STATE_FILE)  # absolute once read from a config file

    def __post_init__(self) -> None:
        for name in ("report_interval", "deadline"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not (math.isfinite(self.min_put_interval) and self.min_put_interval >= 0):
            raise ValueError(f"min_put_interval must be >= 0, got {self.min_put_interval!r}")

    @classmethod
    def from_options(cls, opts: Options, data_dir: Path) -> StateSettings:
        """Validate the ``[state]`` table (errors name the key) and call ``opts.finish()``.

        Keys: ``report_interval`` (300 s, 1..86400), ``min_put_interval`` (2 s, 0..3600, at most
        ``report_interval``), ``deadline`` (30 s, 1..600), ``path`` (``state.cbor``, relative to
        ``data_dir``).
        """
        report = opts.number("report_interval", 300.0, minimum=1.0, maximum=86400.0)
        min_put = opts.number("min_put_interval", 2.0, minimum=0.0, maximum=3600.0)
        deadline = opts.number("deadline", 30.0, minimum=1.0, maximum=600.0)
        if min_put > report:
            raise opts.error("min_put_interval", f"{min_put:g} is above report_interval")
        raw_path = opts.string("path", STATE_FILE)
        if not raw_path.strip():
            raise opts.error("path", "is empty")
        path = Path(raw_path).expanduser()
        if not path.is_absolute():
            path = Path(data_dir) / path
        opts.finish()
        return cls(report_interval=report, min_put_interval=min_put, deadline=deadline, path=path)


class StateHooks(Protocol):
    """What the runtime provides to :class:`StateSync`."""

    def reported(self) -> dict[str, Any]:
        """The current reported values ``{key: value}``: ``agent/version``,
        ``sensor/<name>/health|enabled|interval``, ``detect/<name>/threshold``, ``queue/depth``,
        ``link/state``, ``model/<slot>``, ``counter/<name>``... (docs/protocol.md)."""

    def apply(self, key: str, value: Any) -> None:
        """Apply one desired key live; ``None`` unsets it (go back to the config file's value).
        Raise ValueError with a message when the value cannot be applied."""


@dataclass(frozen=True)
class Failure:
    """A desired version that could not be applied (it is not retried)."""

    version: int
    error: str
    name: str | None = None  # the model name, for model/<slot>


class StateFileError(ValueError):
    """The persisted state file does not decode or does not have the expected shape."""


def parse_desired_document(payload: bytes) -> statedoc.DesiredParse:
    """A served desired document, read key by key (:func:`agent.wire.statedoc.parse_desired_
    document`): :class:`StateError` only when there is no document at all; an entry without a
    usable key or version is named in ``problems``; a value over the limits, or one that does not
    decode, is in ``refused`` with its version, and costs no other key. Values that decoded are
    checked against their key's rules by the caller."""
    return statedoc.parse_desired_document(payload)


def encode_state(
    device: str,
    clock: int,
    rev: int,
    reported: Mapping[str, Entry],
    pending: set[str],
    applied: Mapping[str, Entry],
    failed: Mapping[str, Failure],
) -> bytes:
    """The persisted state file (the module docstring has its format; :func:`decode_state`)."""
    return records.dumps(
        {
            "format": STATE_FORMAT,
            "device": device,
            "clock": clock,
            "rev": rev,
            "reported": {k: [e.version, e.value] for k, e in reported.items()},
            "pending": sorted(pending),
            "applied": {k: [e.version, e.value] for k, e in applied.items()},
            "failed": {k: [f.version, f.error, f.name] for k, f in failed.items()},
        }
    )


def decode_state(data: bytes) -> dict[str, Any]:
    """The persisted state file, checked; :class:`StateFileError` if it is not one."""
    try:
        doc = records.loads(data)
    except RecordError as err:
        raise StateFileError(str(err)) from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise StateFileError(f"not a state file of format {STATE_FORMAT}")
    if not isinstance(doc.get("device"), str):
        raise StateFileError("device: expected text")
    for name in ("clock", "rev"):
        if not is_version(doc.get(name)):
            raise StateFileError(f"{name}: expected an unsigned integer")

    def entries(name: str) -> dict[str, Entry]:
        raw = doc.get(name)
        if not isinstance(raw, dict):
            raise StateFileError(f"{name}: expected a map")
        out: dict[str, Entry] = {}
        for key, item in raw.items():
            if not (
                isinstance(key, str)
                and isinstance(item, list)
                and len(item) == 2
                and is_version(item[0])
            ):
                raise StateFileError(f"{name}: {key!r}: expected [version, value]")
            out[key] = Entry(item[0], item[1])
        return out

    pending = doc.get("pending")
    if not isinstance(pending, list) or not all(isinstance(k, str) for k in pending):
        raise StateFileError("pending: expected a list of keys")
    failed: dict[str, Failure] = {}
    raw_failed = doc.get("failed")
    if not isinstance(raw_failed, dict):
        raise StateFileError("failed: expected a map")
    for key, item in raw_failed.items():
        if not (
            isinstance(key, str)
            and isinstance(item, list)
            and len(item) == 3
            and is_version(item[0])
            and isinstance(item[1], str)
            and (item[2] is None or isinstance(item[2], str))
        ):
            raise StateFileError(f"failed: {key!r}: expected [version, error, name]")
        failed[key] = Failure(item[0], item[1], item[2])
    return {
        "device": doc["device"],
        "clock": doc["clock"],
        "rev": doc["rev"],
        "reported": entries("reported"),
        "pending": set(pending),
        "applied": entries("applied"),
        "failed": failed,
    }


def is_version(value: Any) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 0 <= value <= statedoc.MAX_VERSION
    )


def rewound_clock(sent: Mapping[str, Entry], acks: Mapping[str, int], wall: float) -> int | None:
    """The version clock to number from again (ms) when the endpoint left out of ``acks`` (refused)
    a key of ``sent`` whose version runs more than ``MAX_VERSION_AHEAD`` ahead of the wall clock
    ``wall`` (s): the wall clock, or the highest version acknowledged if that is higher. None
    when no such key was left out."""
    wall_ms = int(wall * 1000)
    if all(k in acks or e.version <= wall_ms + statedoc.MAX_VERSION_AHEAD for k, e in sent.items()):
        return None
    return max([wall_ms, *acks.values()])


def parse_acks(payload: bytes) -> dict[str, int]:
    try:
        doc = records.loads(payload, max_depth=4)
    except RecordError as err:
        raise StateError(f"reported ack: {err}") from None
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and is_version(v) for k, v in doc.items()
    ):
        raise StateError("reported ack: expected a map of key => version")
    return doc


def same_value(a: Any, b: Any) -> bool:
    try:
        return statedoc.encode_value(a) == statedoc.encode_value(b)
    except StateError:
        return False


def reported_problem(key: str, value: Any) -> str | None:
    """Why the endpoint would refuse ``key: value`` in a reported PUT (its own check), or None."""
    try:
        statedoc.parse_reported(statedoc.encode_reported({key: Entry(0, value)}))
    except (StateError, RecordError) as err:
        return str(err)
    return None


def drop_refused(reported: dict[str, Entry], pending: set[str]) -> dict[str, str]:
    """Take the entries the endpoint would refuse out of ``reported`` and ``pending`` (values a
    state file kept from before the endpoint refused them, e.g. a text holding a NUL); the keys
    taken out, with why."""
    refused: dict[str, str] = {}
    for key, entry in list(reported.items()):
        problem = reported_problem(key, entry.value)
        if problem is not None:
            refused[key] = problem
            del reported[key]
            pending.discard(key)
    return refused


def drop_withdrawn(failed: dict[str, Failure], keys: Set[str]) -> bool:
    """Forget the refusals of keys the endpoint's desired document no longer holds (``keys``:
    the document's, refused ones included); whether any was forgotten. A refusal stays only
    while its key is asked for: each key ever refused stayed otherwise (in the state file, on
    every save), so an endpoint naming new keys grew them without end."""
    gone = [key for key in failed if key not in keys]
    for key in gone:
        del failed[key]
    return bool(gone)


def reported_values(
    values: dict[str, Any],
    applied: Mapping[str, Entry],
    failed: Mapping[str, Failure],
    rev: int,
    reported: Mapping[str, Entry],
) -> dict[str, Any]:
    """The values to report: the runtime's ``values``, and the desired values applied that it
    does not report itself, ``desired/rev``, ``desired/errors`` (once there was an error:
    :func:`errors_report`) and ``model/<slot>`` with ``status: failed`` for each model version
    refused (so that the endpoint blocks it). ``reported``: what was numbered so far."""
    for key, entry in applied.items():
        if entry.value is not None and key not in failed:
            values.setdefault(key, entry.value)
    values[REV_KEY] = rev
    if failed or ERRORS_KEY in reported:
        values[ERRORS_KEY] = errors_report(failed)
    for key, failure in failed.items():
        if statedoc.rule_for(key) is Rule.MODEL:
            report = {"status": "failed", "desired": failure.version, "error": failure.error}
            if failure.name is not None:
                report["name"] = failure.name
            values[key] = report
    return values


def chunks(entries: Mapping[str, Entry], limit: int) -> Iterator[dict[str, Entry]]:
    chunk: dict[str, Entry] = {}
    size = 1
    for key, entry in entries.items():
        n = len(statedoc.encode_reported({key: entry}))
        if chunk and size + n > limit:
            yield chunk
            chunk, size = {}, 1
        chunk[key] = entry
        size += n
    if chunk:
        yield chunk


def halves(chunk: Mapping[str, Entry]) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """``chunk`` cut in two (a refused PUT is sent again in halves)."""
    items = list(chunk.items())
    return dict(items[: len(items) // 2]), dict(items[len(items) // 2 :])


def errors_report(failed: Mapping[str, Failure]) -> dict[str, dict[str, Any]]:
    """The ``desired/errors`` value: ``{key: {"version", "error"}}`` of the refused desired
    versions, newest first up to :data:`ERRORS_REPORT_BYTES` (the oldest are left out)."""
    out: dict[str, dict[str, Any]] = {}
    size = 1
    for key, failure in sorted(failed.items(), key=lambda kv: (-kv[1].version, kv[0])):
        entry = {"version": failure.version, "error": failure.error[:ERROR_TEXT_MAX]}
        size += len(records.dumps({key: entry}))
        if size > ERRORS_REPORT_BYTES:
            break
        out[key] = entry
    return dict(sorted(out.items()))


def model_name(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"]
    return None


def error_text(err: BaseException | str) -> str:
    """The reason kept and reported for a refused desired value, at most ERROR_TEXT_MAX long."""
    text = err if isinstance(err, str) else str(err) or type(err).__name__
    return text[:ERROR_TEXT_MAX]


def show(value: Any) -> str:
    return repr(value)[:ERROR_TEXT_MAX]

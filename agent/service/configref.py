"""The configuration reference (docs/config.md), generated from the parsers themselves.

``edge-agent config-reference`` runs the real parser of the config file
(:func:`agent.service.config.load`'s ``_parse``, the settings modules' ``from_options`` and every
driver's ``parse_options``) on :func:`sample`, a config that sets every key, through
:class:`RecordingOptions`: each typed read records its key path, type, default, allowed values and
range. So the types, defaults and ranges in docs/config.md are the parsers' own; what a key is for
comes from :mod:`agent.service.configdoc`, one sentence per key.

Generation refuses to drift (:class:`ReferenceError`, naming the key): a key the parsers read that
has no description, a description of a key nobody reads, a key read only when present (``has``)
that the sample does not set, and an array of tables or a table of named entries that the sample
leaves empty. tests/unit/service/test_configref.py compares docs/config.md with the output.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.base import Options

_UNSET: Any = object()
#: The rank of what a record says about a key: a later, more specific read wins the type.
_RANK = {"has": 0, "required": 1, "value": 2, "table": 3, "tables": 3}


class ReferenceError(Exception):
    """The reference cannot be generated as it stands (a key without description, ...)."""


@dataclass
class KeyDoc:
    """What the parsers said about one key."""

    path: str  # section id + "." + key, e.g. "uplink.deadline", "sensor[].options@adxl345.window"
    section: str
    key: str
    kind: str = "has"
    default: Any = _UNSET  # _UNSET: required (or, when guarded, unset: read only when present)
    defaults: list[Any] = field(default_factory=list)  # every default seen (they may differ)
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    length: int | None = None
    asked: bool = False  # has() was called on it
    unguarded: bool = False  # read somewhere without asking has() first
    read: bool = False  # a read that gives a value (not only has())
    order: int = 0

    @property
    def guarded(self) -> bool:
        """Read only when present: every read of it came after has()."""
        return self.asked and not self.unguarded


@dataclass
class SectionDoc:
    id: str  # "agent", "sensor[]", "sensor[].options@modbus.register[]", "detect.inputs"
    kind: str = "table"  # "table", "array" (of tables), "map" (a table of named entries)
    order: int = 0
    entries: int = 0  # map entries / array elements seen in the sample
    placeholder: str = ""  # for a map: the name shown for its keys


@dataclass
class Recording:
    keys: dict[str, KeyDoc] = field(default_factory=dict)
    sections: dict[str, SectionDoc] = field(default_factory=dict)
    counter: int = 0

    def section(self, sid: str, kind: str) -> SectionDoc:
        doc = self.sections.get(sid)
        if doc is None:
            self.counter += 1
            doc = self.sections[sid] = SectionDoc(sid, kind, self.counter)
        elif kind != "table":
            doc.kind = kind
        return doc

    def key(self, section: str, key: str) -> KeyDoc:
        path = f"{section}.{key}" if section else key
        doc = self.keys.get(path)
        if doc is None:
            self.counter += 1
            doc = self.keys[path] = KeyDoc(path, section, key, order=self.counter)
        return doc


class _Watched(Mapping[str, Any]):
    """A table's raw mapping that notes when someone lists its keys (a table of named
    entries, such as ``[sensor.signals]``), except while ``finish()`` checks for unknown keys."""

    def __init__(self, raw: Mapping[str, Any], on_iter: Any) -> None:
        self._raw = raw
        self._on_iter = on_iter
        self.quiet = False

    def __getitem__(self, key: str) -> Any:
        return self._raw[key]

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def __iter__(self) -> Iterator[str]:
        if not self.quiet:
            self._on_iter()
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class RecordingOptions(Options):
    """:class:`~drivers.base.Options` that records every key read (see the module docstring).
    ``doc_prefix`` is the section id; nested tables and arrays of tables get theirs."""

    def __init__(
        self,
        raw: Mapping[str, Any],
        prefix: str = "",
        *,
        recording: Recording | None = None,
        section: str = "",
        kind: str = "table",
    ) -> None:
        self.recording = recording if recording is not None else Recording()
        self.section_id = section
        self.doc = self.recording.section(section, kind)
        self._values: dict[str, Any] = {}
        self._asked: set[str] = set()
        super().__init__(_Watched(raw, self._listed), prefix)

    # -- what is recorded ------------------------------------------------------------------
    def _listed(self) -> None:
        if self.doc.kind != "map":
            self.doc.kind = "map"
        self.doc.entries += len(self.raw)

    def _name(self, key: str) -> str:
        """The key as documented: a map's entries are all one placeholder."""
        return "<>" if self.doc.kind == "map" else key

    def _note(self, key: str, kind: str, default: Any = _UNSET, **limits: Any) -> None:
        doc = self.recording.key(self.section_id, self._name(key))
        if kind == "has":
            doc.asked = True
            self._asked.add(key)
            return
        if key not in self._asked:
            doc.unguarded = True
        if _RANK.get(kind, 9) >= _RANK.get(doc.kind, 9):
            doc.kind = kind
        if default is not _UNSET:
            if doc.default is _UNSET:
                doc.default = default
            if default not in doc.defaults:
                doc.defaults.append(default)
        for name, value in limits.items():
            if value is not None:
                setattr(doc, name, value)
        doc.read = True

    def _child_section(self, key: str, suffix: str = "") -> str:
        name = self._name(key)
        if key == "options" and "driver" in self._values:  # a part's own options
            name = f"options@{self._values['driver']}"
        base = f"{self.section_id}." if self.section_id else ""
        return f"{base}{name}{suffix}"

    # -- the accessors -----------------------------------------------------------------------
    def has(self, key: str) -> bool:
        self._note(key, "has")
        return super().has(key)

    def required(self, key: str) -> Any:
        self._note(key, "required")
        return super().required(key)

    def value(self, key: str, default: Any = None) -> Any:
        self._note(key, "value", default)
        return super().value(key, default)

    def number(self, key: str, default: float | None = None, **limits: Any) -> float:
        result = super().number(key, default, **limits)
        self._note(key, "number", _UNSET if default is None else default, **limits)
        return result

    def integer(self, key: str, default: int | None = None, **limits: Any) -> int:
        result = super().integer(key, default, **limits)
        self._note(key, "integer", _UNSET if default is None else default, **limits)
        return result

    def choice(self, key: str, default: Any, choices: Any) -> Any:
        result = super().choice(key, default, choices)
        self._note(key, "choice", _UNSET if default is None else default, choices=tuple(choices))
        return result

    def boolean(self, key: str, default: bool) -> bool:
        result = super().boolean(key, default)
        self._note(key, "boolean", default)
        return result

    def string(self, key: str, default: str | None = None) -> str:
        result = super().string(key, default)
        self._note(key, "string", _UNSET if default is None else default)
        self._values[key] = result
        return result

    def strings(self, key: str, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        result = super().strings(key, default)
        self._note(key, "strings", _UNSET if default is None else default)
        return result

    def numbers(self, key: str, length: int | None = None) -> tuple[float, ...]:
        result = super().numbers(key, length)
        self._note(key, "numbers", length=length)
        return result

    def table(self, key: str, *, required: bool = False) -> Options:
        self._note(key, "table")
        value = self.required(key) if required else self._get(key, {})
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a table, got {value!r}")
        return RecordingOptions(
            value,
            f"{self.prefix}{key}.",
            recording=self.recording,
            section=self._child_section(key),
        )

    def tables(self, key: str) -> list[Options]:
        self._note(key, "tables")
        plain = super().tables(key)  # validates
        section = self._child_section(key, "[]")
        self.recording.section(section, "array").entries += len(plain)
        return [
            RecordingOptions(
                o.raw, o.prefix, recording=self.recording, section=section, kind="array"
            )
            for o in plain
        ]

    def finish(self) -> None:
        raw = self.raw
        assert isinstance(raw, _Watched)
        raw.quiet = True
        try:
            super().finish()
        finally:
            raw.quiet = False


# ---------------------------------------------------------------------------------------------
def sample(work: Path) -> dict[str, Any]:
    """The packaged example config, plus every key it leaves out that the parsers read only when
    present; ``work`` holds the files such keys must name."""
    from agent.detect.analyzer import shipped_models_dir
    from agent.service.config import example_config

    raw = tomllib.loads(example_config().read_text(encoding="utf-8"))
    (work / "skab.csv").write_text("datetime;Accelerometer1RMS\n")
    raw["simulation"] = {
        "source": "pump",
        "file": str(work / "skab.csv"),
        "loop": True,
        "seed": 1,
        "event": [{"fault": "valve_closing", "at": 60.0, "ramp": 20.0, "duration": 600.0}],
    }
    raw["link"] = {"low": {"max_inflight": 2}}
    raw["update"] = {"public_key": str(work / "release.key.pub")}
    raw["data"] = {
        "policy": {"vibration_rms_g": "raw", "motor/supply_v": "local"},
        "window": 60.0,
        "window_samples": 0,
        "bands": 8,
        "low": {"policy": {"vibration_rms_g": "features"}},
    }
    raw["detect"].update(
        models_dir=str(shipped_models_dir()),
        max_age=3.0,
        threshold=1.0,
        raise_after=1,
        clear_after=1,
        commissioning_samples=400,
        inputs={"Current": "motor/current_a"},
    )
    sensors = {s["driver"]: s for s in raw["sensor"]}
    sensors["adxl345"]["resolution"] = {"vibration_rms_g": 0.001}
    sensors["modbus"]["options"]["identity"] = {"table": "holding", "address": 16, "value": 1}
    sensors["line"]["options"]["resolution"] = {"temperature_c": 0.01}
    return raw


def record() -> tuple[Recording, list[str]]:
    """Parse :func:`sample` with :class:`RecordingOptions`; returns the recording and the
    problems that make it incomplete."""
    from agent.service import config as configmod

    with tempfile.TemporaryDirectory(prefix="edge-config-reference-") as tmp:
        work = Path(tmp)
        raw = sample(work)
        top = RecordingOptions(raw)
        configmod.parse_config(raw, work, work / "agent.toml", top=top)
    rec = top.recording
    problems = []
    for k in rec.keys.values():
        if k.asked and not k.read:
            problems.append(f"{k.path}: read only when present, and the sample does not set it")
    for s in rec.sections.values():
        if s.kind in ("array", "map") and s.entries == 0:
            problems.append(f"{s.id}: the sample has no entry in it, so its keys are unknown")
    return rec, problems


# ---------------------------------------------------------------------------------------------
def header(sid: str, placeholders: Mapping[str, str]) -> str:
    """The TOML header of a section id: ``sensor[].options@modbus.register[]`` ->
    ``[[sensor.options.register]]`` (``driver = "modbus"``)."""
    driver = re.search(r"@(\w+)", sid)
    parts = []
    prefix = ""
    for seg in sid.split("."):
        name = re.sub(r"@\w+", "", seg)
        if name == "<>":
            name = placeholders.get(prefix.rstrip("."), "NAME")
        parts.append(name.removesuffix("[]"))
        prefix += seg + "."
    name = ".".join(parts)
    text = f"`[[{name}]]`" if sid.endswith("[]") else f"`[{name}]`"
    return text + (f' with `driver = "{driver.group(1)}"`' if driver else "")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # TOML's basic string escapes are JSON's
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:g}" if abs(value) < 1e9 else f"{value:.0e}".replace("e+", "e")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if value is None:
        return "unset"
    return str(value)


def _type(k: KeyDoc) -> str:
    kinds = {
        "number": "number",
        "integer": "integer",
        "boolean": "boolean",
        "string": "string",
        "choice": "one of",
        "strings": "list of strings",
        "required": "value",
        "table": "table",
        "tables": "array of tables",
    }
    if k.kind == "numbers":
        return f"list of {k.length} numbers" if k.length else "list of numbers"
    if k.kind == "value":
        d = k.default
        if isinstance(d, list | tuple):
            return "list of integers" if all(isinstance(v, int) for v in d) else "list"
        return "value"
    return kinds.get(k.kind, k.kind)


def _allowed(k: KeyDoc) -> str:
    if k.choices:
        return ", ".join(f"`{_toml(c)}`" for c in k.choices)
    limits = []
    if k.above is not None:
        limits.append(f"> {_toml(float(k.above))}")
    if k.minimum is not None:
        limits.append(f">= {_toml(float(k.minimum))}")
    if k.maximum is not None:
        limits.append(f"<= {_toml(float(k.maximum))}")
    return ", ".join(limits)


def _default(k: KeyDoc) -> str:
    if k.key == "<>":
        return "-"
    if k.guarded:
        return "unset"
    if k.default is _UNSET:
        return "**required**"
    if len(k.defaults) > 1:
        return " or ".join(f"`{_toml(d)}`" for d in k.defaults)
    return f"`{_toml(k.default)}`"


INTRO = """\
# Configuration reference

<!-- Generated by `edge-agent config-reference` from the parsers (agent/service/configref.py);
do not edit: tests/unit/service/test_configref.py fails when this file differs from its output.
Regenerate with `.venv/bin/edge-agent config-reference > docs/config.md`. -->

The agent reads one TOML file (`edge-agent run --config FILE`; `agent/examples/pump-rig.toml` is
the reference pump rig). `edge-agent check-config FILE` validates it: every problem is one line
`FILE: key.path: message` and exit 78, and a key that no parser reads is an error, so a misspelt
key never passes silently. Relative paths are relative to the file's directory, except the data
files' (`[store] path`, `[state] path`, `[models] cache_dir`, `[metrics] textfile`), which are
relative to `[agent] data_dir`.

Types, defaults and ranges below are the parsers' own; "unset" means the key is read only when
given (its effect without it is described). Every table but `[agent]` and `[[sensor]]` may be left
out.
"""


def render() -> str:
    """docs/config.md as text; ReferenceError when a key or description is missing."""
    from agent.service.configdoc import KEYS, PLACEHOLDERS, SECTIONS, TYPES

    rec, problems = record()
    keys = {k.path: k for k in rec.keys.values() if k.kind not in ("table", "tables")}
    for path in keys:
        if path not in KEYS:
            problems.append(f"{path}: no description in agent/service/configdoc.py KEYS")
    for path in KEYS:
        if path not in keys:
            problems.append(f"{path}: described in configdoc.py KEYS, but no parser reads it")
    sections = [s for s in rec.sections.values() if s.id]
    for s in sections:
        if s.id not in SECTIONS:
            problems.append(f"{s.id}: no description in agent/service/configdoc.py SECTIONS")
        if s.kind == "map" and s.id not in PLACEHOLDERS:
            problems.append(f"{s.id}: a table of named entries without a name in PLACEHOLDERS")
    for path in TYPES:
        if path not in keys:
            problems.append(f"{path}: a type in configdoc.py TYPES, but no parser reads it")
    for sid in SECTIONS:
        if sid not in rec.sections:
            problems.append(f"{sid}: described in configdoc.py SECTIONS, but no parser reads it")
    if problems:
        raise ReferenceError("config reference: " + "; ".join(problems))

    roots: dict[str, int] = {}
    for s in sorted(sections, key=lambda s: s.order):
        roots.setdefault(s.id.split(".")[0], s.order)

    def place(s: SectionDoc) -> tuple[int, bool, int]:  # a part's options after the rest
        return roots[s.id.split(".")[0]], "@" in s.id, s.order

    out = [INTRO]
    for s in sorted(sections, key=place):
        rows = sorted((k for k in keys.values() if k.section == s.id), key=lambda k: k.order)
        out.append(f"## {header(s.id, PLACEHOLDERS)}\n")
        out.append(SECTIONS[s.id] + "\n")
        if not rows:
            continue
        out.append("| key | type | default | allowed | meaning |")
        out.append("|---|---|---|---|---|")
        for k in rows:
            name = PLACEHOLDERS[s.id] if k.key == "<>" else k.key
            text = KEYS[k.path].replace("|", "\\|")
            kind = TYPES.get(k.path) or _type(k)
            out.append(f"| `{name}` | {kind} | {_default(k)} | {_allowed(k)} | {text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"

"""The replicated state of a site's gateways: state-based CRDTs and the map of them (pure, no I/O).

Every replica applies its own writes locally and merges the states of its peers whenever they
arrive, in any order, any number of times; ``merge`` is commutative, associative and idempotent,
so replicas that have received the same writes hold the same state, byte for byte (the encoding
is canonical: RFC 8949 section 4.2.1, :func:`agent.wire.records.dumps`).

The kind of a key is fixed by its prefix (:func:`kind_for`), so two replicas never disagree about
how to merge it:

=============  ==========================  ==================================================
prefix         kind                        rule that decides
=============  ==========================  ==================================================
``config/*``   :class:`LWWRegister`        the write with the greatest hybrid timestamp
``model/*``    :class:`LWWRegister`        (:mod:`agent.gateway.hlc`) wins: the later write;
                                           at equal wall and logical parts, the greater node id
``ack/*``      :class:`ORSet` (add-wins)   an element is in the set if an add of it has not
                                           been observed by a remove: a remove takes away only
                                           the adds it has seen, so of a concurrent add and
                                           remove of the same alert id, the add wins (an
                                           acknowledgement is never lost to a concurrent
                                           un-acknowledgement)
``count/*``    :class:`PNCounter`          the sum of every node's increments minus its
                                           decrements: nothing is lost, nothing counted twice
=============  ==========================  ==================================================

An LWW register whose value is None is a deletion (a tombstone, so a delayed older write cannot
bring the key back).

The OR-set is the optimized one without tombstones (Bieniusa et al. 2012, "An optimized
conflict-free replicated set"; Riak's ORSWOT): each element keeps the *dots* ``(node, counter)`` of
the adds that made it present, and the set keeps a version vector ``node -> highest counter
seen``. A dot covered by the vector but absent means "removed". Counters are the adding node's
hybrid timestamps (packed), so they keep rising across a lost state file.

Hostile input (:func:`decode_entries`): a message is split into its keys with
:mod:`agent.wire.cborscan` before anything is decoded, and each key is judged on its own against
the limits below (its size, depth, number of nodes and elements, key length, the key's kind). A
bad key is refused with a one-line reason; the others merge.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from agent.errors import AgentError
from agent.gateway.hlc import ClockError, Timestamp, check_node
from agent.wire import cborscan, records
from agent.wire.cborscan import ScanError

MAX_KEY_BYTES = 128  # a key (prefix included), ASCII
MAX_ENTRY_BYTES = 16_384  # the encoding of one key's state
MAX_ENTRY_DEPTH = 12  # nesting of one key's encoding (an LWW value may nest 8 deep)
MAX_VALUE_DEPTH = 8
MAX_NODES = 64  # nodes in one counter or one OR-set's version vector
MAX_ELEMENTS = 512  # elements of one OR-set
MAX_ELEMENT_BYTES = 128
#: A local write is refused when the key's state would take more than half the limits above:
#: the other half is room for what concurrent writes elsewhere add in a merge (a merged state
#: beyond the limits stays here but peers refuse it, with a warning naming the key).
LOCAL_ENTRY_BYTES = MAX_ENTRY_BYTES // 2
LOCAL_ELEMENTS = MAX_ELEMENTS // 2
MAX_KEYS = 10_000  # keys in one state (and one message)
MAX_MESSAGE_BYTES = 1 << 20  # one message between peers
MAX_COUNT = (1 << 63) - 1  # one node's total increments (or decrements) of one counter
MAX_DOT = (1 << 64) - 1  # a version vector entry or a dot's counter (a packed timestamp)
DIGEST_BYTES = 8


@dataclass(frozen=True)
class Bounds:
    """The per-key limits a state is decoded under: a peer's message's (:data:`PEER`), or
    this gateway's own state file's (:data:`HELD`)."""

    entry_bytes: int = MAX_ENTRY_BYTES
    nodes: int = MAX_NODES  # in a counter or a set's version vector; dots of a set's element
    elements: int = MAX_ELEMENTS


PEER = Bounds()
#: A merge is not held to the per-key limits (a merged state beyond them stays on the gateway
#: that holds it, refused by the peers), so the state file reads back whatever the gateway held:
#: the file's size bounds it (agent/gateway/peers.py MAX_FILE_BYTES).
HELD = Bounds(sys.maxsize, sys.maxsize, sys.maxsize)

KEY = re.compile(r"[a-z]+/[\x21-\x7e]+\Z")  # prefix/name, printable ASCII, no spaces


class CrdtError(AgentError, ValueError):
    """A key or an entry is malformed, or an operation does not fit the key's kind."""


def _dumps(item: Any) -> bytes:
    try:
        return records.dumps(item)
    except records.RecordError as err:
        raise CrdtError(str(err)) from None


def _count(value: Any, what: str, limit: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise CrdtError(f"{what} must be an integer in 0..{limit}")
    return value


def _node(value: Any) -> str:
    try:
        return check_node(value)
    except ClockError as err:
        raise CrdtError(str(err)) from None


def _node_map(
    value: Any, what: str, limit: int = MAX_COUNT, nodes: int = MAX_NODES
) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > nodes:
        raise CrdtError(f"{what} must be a map of at most {nodes} node ids to counts")
    return {_node(k): _count(v, f"{what} count", limit) for k, v in value.items()}


def _max_maps(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = max(out.get(k, 0), v)
    return out


def _check_value(value: Any, depth: int = 0) -> None:
    """A value of an LWW register: CBOR-native data only (no tags, no sets), bounded depth."""
    if depth > MAX_VALUE_DEPTH:
        raise CrdtError(f"the value nests deeper than {MAX_VALUE_DEPTH}")
    if value is None or isinstance(value, bool | float | str | bytes):
        return
    if isinstance(value, int):
        if not -(1 << 64) <= value < (1 << 64):
            raise CrdtError("an integer in the value is out of the 64-bit range")
        return
    if isinstance(value, list):
        for item in value:
            _check_value(item, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, str | int):
                raise CrdtError("map keys in the value must be text or integers")
            _check_value(v, depth + 1)
        return
    raise CrdtError(f"the value holds a {type(value).__name__}, not CBOR data")


class Crdt:
    """What every kind has: a canonical CBOR item, and a merge that is a join."""

    kind: ClassVar[str]

    def to_item(self) -> Any:
        raise NotImplementedError

    @classmethod
    def from_item(cls, item: Any, bounds: Bounds = PEER) -> Self:
        raise NotImplementedError

    def merge(self, other: Self) -> Self:
        raise NotImplementedError

    def value(self) -> Any:
        raise NotImplementedError

    def to_cbor(self) -> bytes:
        return _dumps(self.to_item())

    def digest(self) -> bytes:
        """A short hash of the canonical encoding: equal states, equal digests."""
        return hashlib.sha256(self.to_cbor()).digest()[:DIGEST_BYTES]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_cbor() == other.to_cbor()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.to_cbor())


@dataclass(frozen=True, eq=False)
class LWWRegister(Crdt):
    """A value and the hybrid timestamp of its write; the greater timestamp wins a merge (the
    node id breaks ties of wall and logical parts; equal timestamps with different values,
    which only a forged state holds, keep the greater encoding, so merge stays a join)."""

    kind: ClassVar[str] = "lww"

    ts: Timestamp
    data: Any = None

    def __post_init__(self) -> None:
        _check_value(self.data)

    def to_item(self) -> Any:
        return [self.ts.to_item(), self.data]

    @classmethod
    def from_item(cls, item: Any, bounds: Bounds = PEER) -> Self:
        if not isinstance(item, list) or len(item) != 2:
            raise CrdtError("lww: expected [timestamp, value]")
        try:
            ts = Timestamp.from_item(item[0])
        except ClockError as err:
            raise CrdtError(f"lww: {err}") from None
        return cls(ts, item[1])

    def merge(self, other: Self) -> Self:
        if self.ts != other.ts:
            return self if self.ts > other.ts else other
        return self if _dumps(self.data) >= _dumps(other.data) else other

    def value(self) -> Any:
        return self.data

    @property
    def deleted(self) -> bool:
        return self.data is None


@dataclass(frozen=True, eq=False)
class PNCounter(Crdt):
    """Per node, the total of its increments (``p``) and of its decrements (``n``); a merge
    keeps each node's greater totals."""

    kind: ClassVar[str] = "pn"

    p: Mapping[str, int] = field(default_factory=dict)
    n: Mapping[str, int] = field(default_factory=dict)

    def to_item(self) -> Any:
        return [dict(self.p), dict(self.n)]

    @classmethod
    def from_item(cls, item: Any, bounds: Bounds = PEER) -> Self:
        if not isinstance(item, list) or len(item) != 2:
            raise CrdtError("counter: expected [increments, decrements]")
        n = bounds.nodes
        return cls(
            _node_map(item[0], "counter increments", nodes=n),
            _node_map(item[1], "decrements", nodes=n),
        )

    def merge(self, other: Self) -> Self:
        return type(self)(_max_maps(self.p, other.p), _max_maps(self.n, other.n))

    def value(self) -> int:
        return sum(self.p.values()) - sum(self.n.values())

    def increment(self, node: str, by: int) -> Self:
        """This state after ``node`` adds ``by`` (negative: subtracts)."""
        if isinstance(by, bool) or not isinstance(by, int):
            raise CrdtError("a counter moves by an integer")
        side, amount = (self.p, by) if by >= 0 else (self.n, -by)
        total = _count(side.get(node, 0) + amount, "a node's total")
        if node not in side and len(set(self.p) | set(self.n)) >= MAX_NODES:
            raise CrdtError(f"a counter takes at most {MAX_NODES} nodes")
        updated = {**side, _node(node): total}
        return type(self)(updated, self.n) if by >= 0 else type(self)(self.p, updated)


Dot = tuple[str, int]


@dataclass(frozen=True, eq=False)
class ORSet(Crdt):
    """An add-wins observed-remove set of text elements without tombstones (see the module
    docstring). ``entries``: element -> the dots of the adds that hold it; ``clock``: the
    version vector. Every dot is covered by ``clock`` (checked on decode)."""

    kind: ClassVar[str] = "orset"

    clock: Mapping[str, int] = field(default_factory=dict)
    entries: Mapping[str, frozenset[Dot]] = field(default_factory=dict)

    def to_item(self) -> Any:
        return [
            dict(self.clock),
            {e: [list(d) for d in sorted(dots)] for e, dots in self.entries.items()},
        ]

    @classmethod
    def from_item(cls, item: Any, bounds: Bounds = PEER) -> Self:
        if not isinstance(item, list) or len(item) != 2:
            raise CrdtError("set: expected [clock, entries]")
        clock = _node_map(item[0], "set clock", MAX_DOT, bounds.nodes)
        raw = item[1]
        if not isinstance(raw, dict) or len(raw) > bounds.elements:
            raise CrdtError(f"set: entries must be a map of at most {bounds.elements} elements")
        entries: dict[str, frozenset[Dot]] = {}
        for element, dots in raw.items():
            _element(element)
            if not isinstance(dots, list) or not 0 < len(dots) <= bounds.nodes:
                raise CrdtError(f"set: element {element!r} needs 1 to {bounds.nodes} dots")
            parsed: set[Dot] = set()
            for dot in dots:
                if not isinstance(dot, list) or len(dot) != 2:
                    raise CrdtError("set: a dot is [node, counter]")
                node, counter = _node(dot[0]), _count(dot[1], "set: a dot's counter", MAX_DOT)
                if counter > clock.get(node, 0):
                    raise CrdtError(f"set: dot ({node}, {counter}) is not covered by the clock")
                parsed.add((node, counter))
            entries[element] = frozenset(parsed)
        return cls(clock, entries)

    def merge(self, other: Self) -> Self:
        def covered(dot: Dot, clock: Mapping[str, int]) -> bool:
            return dot[1] <= clock.get(dot[0], 0)

        entries: dict[str, frozenset[Dot]] = {}
        for element in set(self.entries) | set(other.entries):
            mine = self.entries.get(element, frozenset())
            theirs = other.entries.get(element, frozenset())
            kept = (
                (mine & theirs)
                | {d for d in mine - theirs if not covered(d, other.clock)}
                | {d for d in theirs - mine if not covered(d, self.clock)}
            )
            if kept:
                entries[element] = frozenset(kept)
        return type(self)(_max_maps(self.clock, other.clock), entries)

    def value(self) -> frozenset[str]:
        return frozenset(self.entries)

    def add(self, node: str, element: str, counter: int) -> Self:
        """This state after ``node`` adds ``element`` with a dot numbered at least ``counter``
        (the node's packed hybrid timestamp) and above every dot of the node seen so far."""
        _element(element)
        if element not in self.entries and len(self.entries) >= LOCAL_ELEMENTS:
            raise CrdtError(f"a set takes at most {LOCAL_ELEMENTS} elements by local adds")
        if node not in self.clock and len(self.clock) >= MAX_NODES:
            raise CrdtError(f"a set takes at most {MAX_NODES} nodes")
        dot = (_node(node), _count(max(counter, self.clock.get(node, 0) + 1), "a dot", MAX_DOT))
        entries = {**self.entries, element: frozenset({dot})}  # the old dots: observed, removed
        return type(self)({**self.clock, node: dot[1]}, entries)

    def remove(self, element: str) -> Self:
        """This state after removing ``element``: the adds observed here are undone; an add
        made concurrently elsewhere survives the merge (add wins)."""
        return type(self)(self.clock, {e: d for e, d in self.entries.items() if e != element})


def _element(element: Any) -> str:
    if (
        not isinstance(element, str)
        or not element
        or len(element.encode("utf-8", "surrogatepass")) > MAX_ELEMENT_BYTES
    ):
        raise CrdtError(f"a set element is 1 to {MAX_ELEMENT_BYTES} bytes of text")
    return element


#: The kind of each key prefix; keys with any other prefix are refused.
KINDS: Mapping[str, type[Crdt]] = {
    "config": LWWRegister,
    "model": LWWRegister,
    "ack": ORSet,
    "count": PNCounter,
}


def check_key(key: Any) -> str:
    """``key`` if it is a valid key (``prefix/name``, printable ASCII, at most
    :data:`MAX_KEY_BYTES` bytes, a known prefix); :class:`CrdtError` if not."""
    if not isinstance(key, str) or len(key) > MAX_KEY_BYTES or not KEY.match(key):
        raise CrdtError(
            f"bad key {str(key)[:80]!r}: prefix/name, printable ASCII, at most {MAX_KEY_BYTES}"
        )
    if key.partition("/")[0] not in KINDS:
        raise CrdtError(f"bad key {key!r}: the prefix must be one of {', '.join(KINDS)}")
    return key


def kind_for(key: str) -> type[Crdt]:
    """The CRDT class of ``key``, from its prefix."""
    return KINDS[check_key(key).partition("/")[0]]


def decode_entry(key: str, item: Any, bounds: Bounds = PEER) -> Crdt:
    """One key's state from its CBOR item; :class:`CrdtError` when it is not one of its kind."""
    return kind_for(key).from_item(item, bounds)


class SiteState:
    """The replicated map ``key -> CRDT`` (the kind of each key fixed by its prefix)."""

    def __init__(self, entries: Mapping[str, Crdt] | None = None) -> None:
        self._entries: dict[str, Crdt] = {}
        self._digests: dict[str, bytes] = {}
        for key, entry in (entries or {}).items():
            self.merge(key, entry)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        """The keys, sorted."""
        return iter(sorted(self._entries))

    def get(self, key: str) -> Crdt | None:
        return self._entries.get(key)

    def merge(self, key: str, incoming: Crdt) -> bool:
        """Merge ``incoming`` into ``key``; True if the key's state changed."""
        kind = kind_for(key)
        if not isinstance(incoming, kind):
            raise CrdtError(f"{key}: takes a {kind.kind}, not a {incoming.kind}")
        current = self._entries.get(key)
        if current is None and len(self._entries) >= MAX_KEYS:
            raise CrdtError(f"{key}: the state holds {MAX_KEYS} keys already")
        merged = incoming if current is None else current.merge(incoming)
        if current is not None and merged.to_cbor() == current.to_cbor():
            return False
        self._entries[key] = merged
        self._digests[key] = merged.digest()
        return True

    def write(self, key: str, new: Crdt) -> None:
        """A local write: ``new`` is the key's state after the operation (derived from its
        current state). Refused (:class:`CrdtError`) beyond :data:`LOCAL_ENTRY_BYTES`."""
        size = len(new.to_cbor())
        if size > LOCAL_ENTRY_BYTES:
            raise CrdtError(
                f"{key}: the state would take {size} bytes, at most {LOCAL_ENTRY_BYTES}"
            )
        self.merge(key, new)

    def merge_state(self, other: SiteState) -> list[str]:
        """Merge every key of ``other``; the keys that changed."""
        return [key for key in other if self.merge(key, other._entries[key])]

    def digest(self) -> dict[str, bytes]:
        """``key -> hash of its state``: what a peer compares to find the keys that differ."""
        return dict(self._digests)

    def encode(self, keys: Iterable[str] | None = None) -> bytes:
        """The canonical CBOR map ``key -> state item`` of ``keys`` (None: all) that exist."""
        chosen = self._entries if keys is None else keys
        return _dumps({k: self._entries[k].to_item() for k in chosen if k in self._entries})

    def snapshot(self) -> dict[str, Any]:
        """Plain values: LWW values (deleted keys left out), counter totals, sorted lists of
        set elements."""
        out: dict[str, Any] = {}
        for key in sorted(self._entries):
            entry = self._entries[key]
            if isinstance(entry, LWWRegister) and entry.deleted:
                continue
            value = entry.value()
            out[key] = sorted(value) if isinstance(value, frozenset) else value
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SiteState) and self.encode() == other.encode()

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Decoded:
    """What :func:`decode_entries` made of a message: the good keys and, per refused key (or
    ``#n`` for an entry whose key could not be read), a one-line reason."""

    entries: dict[str, Crdt] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def decode_entries(
    data: bytes,
    max_keys: int = MAX_KEYS,
    max_bytes: int = MAX_MESSAGE_BYTES,
    bounds: Bounds = PEER,
) -> Decoded:
    """A message ``{ key => state item }`` from a peer (or the state file: ``bounds`` HELD),
    judged one key at a time. :class:`CrdtError` only when the message as a whole is unusable
    (more than ``max_bytes`` or ``max_keys``, not one CBOR map)."""
    if len(data) > max_bytes:
        raise CrdtError(f"the message has {len(data)} bytes, at most {max_bytes}")
    try:
        whole = cborscan.scan(data)
        if whole.end != len(data):
            raise ScanError(f"{len(data) - whole.end} bytes after the map")
        pairs = cborscan.entries(data, whole)
    except ScanError as err:
        raise CrdtError(f"the message is not a CBOR map: {err}") from None
    if len(pairs) > max_keys:
        raise CrdtError(f"the message has {len(pairs)} keys, at most {max_keys}")
    out = Decoded()
    for index, (kspan, vspan) in enumerate(pairs):
        name = f"#{index}"
        try:
            if len(kspan) > MAX_KEY_BYTES + 3:  # + the text string's head
                raise CrdtError(f"a key of {len(kspan)} bytes, at most {MAX_KEY_BYTES}")
            key = check_key(_load(kspan.of(data), 1))
            name = key
            if key in out.entries or key in out.refused:
                raise CrdtError("the key comes twice")
            if len(vspan) > bounds.entry_bytes:
                raise CrdtError(f"the state has {len(vspan)} bytes, at most {bounds.entry_bytes}")
            if vspan.depth > MAX_ENTRY_DEPTH:
                raise CrdtError(f"the state nests {vspan.depth} deep, at most {MAX_ENTRY_DEPTH}")
            item = _load(vspan.of(data), MAX_ENTRY_DEPTH + 1)
            out.entries[key] = decode_entry(key, item, bounds)
        except CrdtError as err:
            out.entries.pop(name, None)  # a key that comes twice keeps neither
            out.refused[name] = str(err)
    return out


def _load(data: bytes, depth: int) -> Any:
    try:
        return records.loads(data, max_depth=depth)
    except records.RecordError as err:
        raise CrdtError(str(err)) from None


def encode_digest(digest: Mapping[str, bytes]) -> bytes:
    """A digest message: the canonical CBOR map ``key -> hash``."""
    return _dumps(dict(digest))


def decode_digest(data: bytes) -> dict[str, bytes]:
    """A peer's digest; :class:`CrdtError` if malformed (a digest is all or nothing: it only
    steers which keys are asked for, and a bad one is simply not used this round)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise CrdtError(f"the digest has {len(data)} bytes, at most {MAX_MESSAGE_BYTES}")
    item = _load(data, 2)
    if not isinstance(item, dict) or len(item) > MAX_KEYS:
        raise CrdtError(f"the digest must be a map of at most {MAX_KEYS} keys")
    for key, value in item.items():
        check_key(key)
        if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
            raise CrdtError(f"digest of {key}: {DIGEST_BYTES} bytes expected")
    return item

"""The site state's CRDTs: hand examples of each rule, the merge laws, convergence of three
replicas under any delivery schedule, encoding round trips and hostile decodes."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.gateway.crdt import (
    LOCAL_ELEMENTS,
    MAX_ENTRY_BYTES,
    MAX_KEY_BYTES,
    MAX_MESSAGE_BYTES,
    Crdt,
    CrdtError,
    LWWRegister,
    ORSet,
    PNCounter,
    SiteState,
    check_key,
    decode_digest,
    decode_entries,
    encode_digest,
    kind_for,
)
from agent.gateway.hlc import Timestamp
from agent.gateway.peers import PeerState
from agent.wire import records
from tests.unit.gateway.helpers import SetClock

T0 = 1_700_000_000.0
NODES = ("gw-1", "gw-2", "gw-3", "gw-4")


def ts(wall: int, logical: int = 0, node: str = "gw-1") -> Timestamp:
    return Timestamp(wall, logical, node)


# -- hand examples ------------------------------------------------------------------------------


def test_lww_the_later_timestamp_wins_whatever_the_order() -> None:
    old, new = LWWRegister(ts(10), "old"), LWWRegister(ts(11), "new")
    assert old.merge(new).value() == "new" == new.merge(old).value()
    same_ms = LWWRegister(ts(10, 1), "counter")  # same millisecond, later by the counter
    assert old.merge(same_ms).value() == "counter"


def test_lww_a_tie_of_wall_and_counter_goes_to_the_greater_node_id() -> None:
    a, b = LWWRegister(ts(10, 0, "gw-1"), "a"), LWWRegister(ts(10, 0, "gw-2"), "b")
    assert a.merge(b).value() == "b" == b.merge(a).value()


def test_lww_forged_equal_timestamps_still_merge_to_one_value() -> None:
    a, b = LWWRegister(ts(10), "a"), LWWRegister(ts(10), "b")
    assert a.merge(b) == b.merge(a)


def test_lww_delete_is_a_tombstone() -> None:
    site = SiteState()
    site.merge("config/x", LWWRegister(ts(10), 5))
    site.merge("config/x", LWWRegister(ts(12), None))
    site.merge("config/x", LWWRegister(ts(11), 7))  # a delayed older write
    assert "config/x" not in site.snapshot()


def test_counter_sums_every_nodes_increments_and_decrements() -> None:
    a = PNCounter().increment("gw-1", 3).increment("gw-1", -1)
    b = PNCounter().increment("gw-2", 4)
    merged = a.merge(b).merge(a)  # duplicates count once
    assert merged.value() == 6
    assert merged.p == {"gw-1": 3, "gw-2": 4} and merged.n == {"gw-1": 1}


def test_orset_concurrent_add_and_remove_the_add_wins() -> None:
    base = ORSet().add("gw-1", "alert-7", 1)
    removed = base.remove("alert-7")  # gw-1 removes the add it has seen
    re_added = base.add("gw-2", "alert-7", 5)  # gw-2, concurrently, adds it again
    assert removed.merge(re_added).value() == {"alert-7"} == re_added.merge(removed).value()


def test_orset_a_remove_takes_away_the_adds_it_has_seen() -> None:
    base = ORSet().add("gw-1", "alert-8", 1).add("gw-2", "alert-9", 2)
    removed = base.remove("alert-8")
    assert removed.merge(base).value() == {"alert-9"} == base.merge(removed).value()
    again = removed.add("gw-3", "alert-8", 3)  # a later add after the remove: back in
    assert again.merge(base).value() == {"alert-8", "alert-9"}


def test_orset_dots_rise_above_the_nodes_counter() -> None:
    s = ORSet().add("gw-1", "a", 100)
    s = s.add("gw-1", "b", 5)  # a counter below what gw-1 used: the dot still rises
    assert s.entries["b"] == {("gw-1", 101)}


def test_kinds_are_fixed_by_prefix() -> None:
    assert kind_for("config/sample_rate") is LWWRegister
    assert kind_for("model/anomaly") is LWWRegister
    assert kind_for("ack/pump-1") is ORSet
    assert kind_for("count/alerts") is PNCounter
    for bad in ("other/x", "config/", "config", "/x", "config/a b", "config/\x00", 7):
        with pytest.raises(CrdtError):
            check_key(bad)
    site = SiteState()
    with pytest.raises(CrdtError, match="takes a lww"):
        site.merge("config/x", PNCounter())


def test_local_writes_stop_at_half_the_limits() -> None:
    site = SiteState()
    with pytest.raises(CrdtError, match="at most"):
        site.write("config/big", LWWRegister(ts(1), "x" * (MAX_ENTRY_BYTES // 2)))
    s = ORSet()
    for i in range(LOCAL_ELEMENTS):
        s = s.add("gw-1", f"e{i}", i + 1)
    with pytest.raises(CrdtError, match="local adds"):
        s.add("gw-1", "one-more", 10_000)


def test_canonical_encoding_is_fixed_bytes() -> None:
    site = SiteState()
    site.merge("config/a", LWWRegister(ts(5, 0, "a"), {"x": [1, 2]}))
    site.merge("count/x", PNCounter({"a": 3}, {"b": 1}))
    site.merge("ack/1", ORSet({"a": 5, "b": 7}, {"x": frozenset({("b", 7)})}))
    expected = [
        "a3",  # a map of three keys, sorted as RFC 8949 section 4.2.1 sorts them
        "65 61636b2f31",  # "ack/1"
        "82 a2 6161 05 6162 07",  # [clock {"a": 5, "b": 7},
        "a1 6178 81 82 6162 07",  #  entries {"x": [["b", 7]]}]
        "67 636f756e742f78",  # "count/x"
        "82 a1 6161 03 a1 6162 01",  # [{"a": 3}, {"b": 1}]
        "68 636f6e6669672f61",  # "config/a"
        "82 83 05 00 6161 a1 6178 82 01 02",  # [[5, 0, "a"], {"x": [1, 2]}]
    ]
    assert site.encode().hex() == "".join(expected).replace(" ", "")


# -- strategies ----------------------------------------------------------------------------------

nodes = st.sampled_from(NODES)
timestamps = st.builds(Timestamp, st.integers(0, 30), st.integers(0, 2), nodes)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 64), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=4)
    | st.binary(max_size=4)
)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=8,
)
lwws = st.builds(LWWRegister, timestamps, values)
counts = st.dictionaries(nodes, st.integers(0, 20), max_size=4)
pns = st.builds(PNCounter, counts, counts)


@st.composite
def orsets(draw: st.DrawFn) -> ORSet:
    clock = draw(st.dictionaries(nodes, st.integers(1, 5), max_size=4))
    dots = [(n, c) for n, top in clock.items() for c in range(1, top + 1)]
    entries: dict[str, frozenset[tuple[str, int]]] = {}
    if dots:
        for element in draw(st.sets(st.sampled_from("abcd"))):
            entries[element] = frozenset(draw(st.sets(st.sampled_from(dots), min_size=1)))
    return ORSet(clock, entries)


kinds = st.one_of(lwws, pns, orsets())


def same_kind(strategy: st.SearchStrategy[Crdt]) -> st.SearchStrategy[tuple[Crdt, Crdt, Crdt]]:
    return st.tuples(strategy, strategy, strategy)


triples = st.one_of(same_kind(lwws), same_kind(pns), same_kind(orsets()))


@settings(max_examples=400, deadline=None)
@given(triples)
@example(  # equal timestamps with different values: only the encoding can decide
    (LWWRegister(ts(1), 0), LWWRegister(ts(1), 0.0), LWWRegister(ts(1), None))
)
@example((LWWRegister(ts(1), math.nan), LWWRegister(ts(1), math.nan), LWWRegister(ts(1), 1)))
def test_property_merge_is_commutative_associative_idempotent(
    abc: tuple[Crdt, Crdt, Crdt],
) -> None:
    a, b, c = abc
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a
    assert a.merge(b).merge(b) == a.merge(b)


@settings(max_examples=300, deadline=None)
@given(kinds)
def test_property_encoding_round_trip(x: Crdt) -> None:
    assert type(x).from_item(records.loads(x.to_cbor())) == x
    key = {LWWRegister: "config/k", PNCounter: "count/k", ORSet: "ack/k"}[type(x)]
    site = SiteState({key: x})
    decoded = decode_entries(site.encode())
    assert decoded.refused == {}
    assert SiteState(decoded.entries) == site
    assert decode_digest(encode_digest(site.digest())) == site.digest()


# -- convergence of three replicas under any delivery schedule -------------------------------------

REPLICAS = 3
replica = st.integers(0, REPLICAS - 1)
actions = st.one_of(
    st.tuples(st.just("set"), replica, st.sampled_from(["config/a", "model/m"]), st.integers(0, 9)),
    st.tuples(st.just("delete"), replica, st.sampled_from(["config/a", "model/m"]), st.none()),
    st.tuples(st.just("add"), replica, st.sampled_from(["ack/p"]), st.sampled_from("xyz")),
    st.tuples(st.just("remove"), replica, st.sampled_from(["ack/p"]), st.sampled_from("xyz")),
    st.tuples(st.just("inc"), replica, st.sampled_from(["count/c", "count/d"]), st.integers(-5, 5)),
    st.tuples(st.just("send"), replica, replica, st.sampled_from(["*", "config/a", "ack/p"])),
    st.tuples(st.just("deliver"), st.integers(0, 99), st.booleans(), st.none()),  # keep: dup
    st.tuples(st.just("drop"), st.integers(0, 99), st.none(), st.none()),
    st.tuples(st.just("tick"), replica, st.integers(-20_000, 20_000), st.none()),  # ms
)


class History:
    """What happened, for the oracles: every LWW write, every count, every OR-set add's dot and
    the dots each operation on an element observed (and so removed)."""

    def __init__(self) -> None:
        self.writes: dict[str, list[tuple[Timestamp, Any]]] = {}
        self.totals: dict[str, int] = {}
        self.added: dict[str, set[tuple[str, int]]] = {}
        self.observed: dict[str, set[tuple[str, int]]] = {}


def apply(state: PeerState, op: str, key: str, arg: Any, h: History) -> None:
    if op in ("set", "delete"):
        stamp = state.set(key, arg)
        h.writes.setdefault(key, []).append((stamp, arg))
    elif op == "inc":
        state.increment(key, arg)
        h.totals[key] = h.totals.get(key, 0) + arg
    else:
        entry = state.entry(key)
        seen = set(entry.entries.get(arg, ())) if isinstance(entry, ORSet) else set()
        h.observed.setdefault(arg, set()).update(seen)
        if op == "add":
            state.add(key, arg)
            new = state.entry(key)
            assert isinstance(new, ORSet)
            h.added.setdefault(arg, set()).update(new.entries[arg])
        else:
            state.remove(key, arg)


@settings(max_examples=300, deadline=None)
@given(st.lists(actions, max_size=80))
def test_property_three_replicas_converge_under_reorder_duplication_and_loss(
    plan: list[tuple[str, Any, Any, Any]],
) -> None:
    clocks = [SetClock(T0) for _ in range(REPLICAS)]
    states = [PeerState(f"gw-{i + 1}", None, clocks[i]) for i in range(REPLICAS)]
    in_flight: list[tuple[int, bytes]] = []
    h = History()

    def deliver(dst: int, data: bytes) -> None:
        report = states[dst].merge_from(data)
        assert report.refused == {}

    for op, a, b, c in plan:
        if op == "send":
            keys = None if c == "*" else [c]
            in_flight.append((b, states[a].encode(keys)))
        elif op == "deliver" and in_flight:
            dst, data = in_flight[a % len(in_flight)] if b else in_flight.pop(a % len(in_flight))
            deliver(dst, data)
        elif op == "drop" and in_flight:
            in_flight.pop(a % len(in_flight))
        elif op == "tick":  # each clock wanders within 30 s: under the 60 s drift bound
            clocks[a].wall = min(max(T0, clocks[a].wall + b / 1000), T0 + 30)
        elif op in ("set", "delete", "add", "remove", "inc"):
            apply(states[a], op, b, c, h)
    for _ in range(2):  # the final full exchange
        for src in range(REPLICAS):
            for dst in range(REPLICAS):
                if src != dst:
                    deliver(dst, states[src].encode())

    encodings = {s.encode() for s in states}
    assert len(encodings) == 1, "replicas differ after the full exchange"
    final = states[0]
    for key, writes in h.writes.items():  # LWW: the write with the greatest timestamp
        stamp, value = max(writes, key=lambda w: w[0])
        entry = final.entry(key)
        assert isinstance(entry, LWWRegister) and entry.ts == stamp and entry.data == value
    for key, total in h.totals.items():  # counters: exactly the sum
        assert final.get(key) == total
    got = final.entry("ack/p")
    for element in "xyz":  # OR-set: the adds no operation observed
        expected = h.added.get(element, set()) - h.observed.get(element, set())
        have = got.entries.get(element, frozenset()) if isinstance(got, ORSet) else frozenset()
        assert set(have) == expected


# -- hostile input -------------------------------------------------------------------------------

GOOD = PNCounter({"gw-1": 2}).to_item()


def message(entries: dict[Any, bytes]) -> bytes:
    """A map whose values are given as raw CBOR bytes."""
    out = bytearray(cbor2.dumps({k: None for k in entries})[:1])
    if len(entries) >= 24:
        out = bytearray(b"\xb9" + len(entries).to_bytes(2, "big"))
    for key, raw in entries.items():
        out += cbor2.dumps(key) + raw
    return bytes(out)


def refused_beside_a_good_key(bad_key: Any, raw: bytes) -> str:
    decoded = decode_entries(message({"count/good": cbor2.dumps(GOOD), bad_key: raw}))
    assert list(decoded.entries) == ["count/good"], decoded
    assert len(decoded.refused) == 1
    return next(iter(decoded.refused.values()))


def test_attack_value_nested_ten_thousand_deep_costs_only_its_key() -> None:
    deep = b"\x82" + cbor2.dumps([1, 0, "gw-1"]) + b"\x81" * 10_000 + b"\x00"
    assert "nests" in refused_beside_a_good_key("config/deep", deep)


def test_attack_oversized_entry_costs_only_its_key() -> None:
    big = cbor2.dumps([[1, 0, "gw-1"], "x" * (MAX_ENTRY_BYTES + 1)])
    assert "bytes" in refused_beside_a_good_key("config/big", big)


def test_attack_overlong_key() -> None:
    assert "key" in refused_beside_a_good_key("config/" + "k" * MAX_KEY_BYTES, cbor2.dumps(GOOD))


@pytest.mark.parametrize(
    ("key", "item", "reason"),
    [
        ("other/x", GOOD, "prefix"),
        (7, GOOD, "bad key"),
        ("config/x", GOOD, "lww"),  # a counter's state under an LWW prefix
        ("count/x", [{"gw-1": -1}, {}], "integer"),
        ("count/x", [{"gw-1": True}, {}], "integer"),
        ("count/x", [{"gw-1": 1 << 63}, {}], "integer"),
        ("count/x", [{f"n{i}": 1 for i in range(65)}, {}], "at most"),
        ("count/x", [{"bad node": 1}, {}], "node id"),
        ("config/x", [[1.5, 0, "gw-1"], 1], "integer"),
        ("config/x", [[1, 0, "gw-1"], cbor2.CBORTag(1, 0)], "datetime"),  # a tag, not data
        ("config/x", [[1, 0, "gw-1"], 1 << 70], "64-bit"),  # a bignum
        ("config/x", [[1, 0, "gw-1"], {1.5: 1}], "map keys"),
        ("ack/x", [{"gw-1": 1}, {"e": [["gw-1", 2]]}], "not covered"),
        ("ack/x", [{"gw-1": 1}, {"e": []}], "dots"),
        ("ack/x", [{"gw-1": 1}, {"": [["gw-1", 1]]}], "element"),
        ("ack/x", [{"gw-1": 1}, {"e" * 129: [["gw-1", 1]]}], "element"),
    ],
)
def test_attack_malformed_entries_are_refused_one_by_one(key: Any, item: Any, reason: str) -> None:
    assert reason in refused_beside_a_good_key(key, cbor2.dumps(item))


def test_attack_a_key_sent_twice_keeps_neither() -> None:
    raw = b"\xa3" + b"".join(
        cbor2.dumps(k) + cbor2.dumps(v)
        for k, v in (("count/a", GOOD), ("count/b", GOOD), ("count/a", GOOD))
    )
    decoded = decode_entries(raw)
    assert list(decoded.entries) == ["count/b"] and "twice" in decoded.refused["count/a"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a CBOR map"),
        (b"\xa1", "not a CBOR map"),  # truncated
        (cbor2.dumps([1, 2]), "map"),
        (cbor2.dumps({}) + b"\x00", "after the map"),
        (b"\xbb" + (1 << 40).to_bytes(8, "big"), "not a CBOR map"),  # declares 2**40 entries
        (b"\x00" * (MAX_MESSAGE_BYTES + 1), "bytes"),
    ],
)
def test_attack_unusable_messages_are_one_clear_error(data: bytes, reason: str) -> None:
    with pytest.raises(CrdtError, match=reason):
        decode_entries(data)


def test_attack_too_many_keys() -> None:
    data = message({f"count/k{i}": cbor2.dumps(GOOD) for i in range(30)})
    with pytest.raises(CrdtError, match="at most 20"):
        decode_entries(data, max_keys=20)


def test_attack_indefinite_length_containers_decode_or_refuse_cleanly() -> None:
    raw = b"\xbf" + cbor2.dumps("count/a") + b"\x9f\xbf\x64gw-1\x02\xff\xa0\xff" + b"\xff"
    decoded = decode_entries(raw)
    assert decoded.entries["count/a"].value() == 2


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_attack_mutated_and_random_bytes_never_raise_anything_else(
    noise: bytes, data: st.DataObject
) -> None:
    site = SiteState()
    site.merge("config/a", LWWRegister(ts(5), {"x": [1, 2.5]}))
    site.merge("ack/p", ORSet({"gw-1": 3}, {"y": frozenset({("gw-1", 3)})}))
    site.merge("count/c", PNCounter({"gw-2": 4}))
    valid = bytearray(site.encode())
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(valid) - 1))
        valid[i] = data.draw(st.integers(0, 255))
    for raw in (bytes(valid), noise, bytes(valid[: len(valid) // 2])):
        try:
            decoded = decode_entries(raw)
        except CrdtError:
            continue
        for key, entry in decoded.entries.items():  # whatever got through is a valid state
            assert isinstance(entry, kind_for(key))
            assert type(entry).from_item(records.loads(entry.to_cbor())) == entry


@pytest.mark.parametrize(
    "data",
    [cbor2.dumps({"config/a": b"short"}), cbor2.dumps({"nope/a": bytes(8)}), b"\xff", b""],
)
def test_attack_malformed_digest(data: bytes) -> None:
    with pytest.raises(CrdtError):
        decode_digest(data)

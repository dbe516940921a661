"""agent/wire/oscore.py: what :class:`PersistentContext` overrides of aiocoap's protection for
speed gives the same bytes as aiocoap's own, for every message shape (the inner plaintext is
what is encrypted and authenticated: a byte out of place is a message the peer refuses, or
worse, an option moved between the protected and the unprotected part); a request the
endpoint's short way decrypted and handed on to aiocoap (``hand_on``) is accepted once, only
while its sequence number is new, and a forged body under its OSCORE option is not taken."""

from __future__ import annotations

from typing import Any

import pytest
from aiocoap import Message, oscore
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import BlockOption
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.wire.credentials import ENDPOINT_KID, Credential
from agent.wire.oscore import HANDED_ON, PersistentContext, Sequence

# No timing in tests: neither hypothesis's deadline nor its too-slow check may fail a test on a
# loaded machine.
RELAXED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

CRED = Credential.generate("pump-01", "device", b"\x01")
ID_CONTEXT = b"\x11" * 8


def _endpoint() -> PersistentContext:
    """The endpoint's context for :data:`CRED`, its replay window running from 0."""
    return PersistentContext(
        CRED,
        Sequence(0, lambda: None),
        sender_id=ENDPOINT_KID,
        recipient_id=CRED.sender_id,
        id_context=ID_CONTEXT,
        replay={"index": 0, "bitfield": 0},
    )


def _pair() -> tuple[PersistentContext, PersistentContext]:
    device = PersistentContext(
        CRED,
        Sequence(0, lambda: None),
        sender_id=CRED.sender_id,
        recipient_id=CRED.recipient_id,
        id_context=ID_CONTEXT,
    )
    device.recipient_replay_window.initialize_empty()
    return device, _endpoint()


def _block(num: int, more: bool, szx: int) -> Any:
    return BlockOption.BlockwiseTuple(num, more, szx)


options = st.fixed_dictionaries(
    {},
    optional={
        "uri_host": st.sampled_from(["127.0.0.1", "example.org", "[::1]"]),
        "uri_port": st.integers(0, 65535),
        "proxy_scheme": st.just("coap"),
        "uri_path": st.lists(st.text(max_size=6), max_size=3).map(tuple),
        "uri_query": st.lists(st.text(max_size=6), max_size=2).map(tuple),
        "content_format": st.sampled_from([0, 60, 112, 65000]),
        "accept": st.sampled_from([60, 112]),
        "observe": st.integers(0, 2**24 - 1),
        "block1": st.builds(_block, st.integers(0, 1000), st.booleans(), st.integers(0, 6)),
        "block2": st.builds(_block, st.integers(0, 1000), st.booleans(), st.integers(0, 6)),
        "size1": st.integers(0, 1 << 20),
        "echo": st.binary(min_size=1, max_size=8),
        "etags": st.lists(st.binary(min_size=1, max_size=8), max_size=2).map(tuple),
        "max_age": st.integers(0, 2**32 - 1),
    },
)
requests = st.sampled_from([Code.GET, Code.POST, Code.PUT, Code.DELETE, Code.FETCH])
outer_requests = st.sampled_from([Code.POST, Code.FETCH])  # what a protected request's code is
responses = st.sampled_from([Code.CHANGED, Code.CONTENT, Code.CONTINUE, Code.UNAUTHORIZED])


def _message(code: Code, opts: dict[str, Any], payload: bytes) -> Message:
    msg = Message(code=code, payload=payload, **opts)
    msg.direction = Direction.OUTGOING
    return msg


def _over_the_wire(msg: Message) -> Message:
    msg.mtype, msg.mid, msg.token = Type.CON, 1, b"\x07"
    received = Message.decode(msg.encode())
    received.direction = Direction.INCOMING
    return received


def _request_id(code: Code) -> Any:
    return oscore.RequestIdentifiers(b"\x01", b"\x05", can_reuse_nonce=True, request_code=code)


@RELAXED
@given(requests, options, st.binary(max_size=64))
@example(Code.POST, {"uri_host": "127.0.0.1", "uri_path": ("ingest", "pump-01")}, b"\x80")
def test_a_request_splits_as_aiocoap_splits_it(code: Code, opts: dict[str, Any], body: bytes):
    device, _ = _pair()
    msg = _message(code, opts, body)
    outer, plaintext = device._split_message(msg, None)
    want_outer, want_plaintext = oscore.CanProtect._split_message(device, msg, None)
    assert plaintext == want_plaintext
    assert (outer.code, outer.opt.encode()) == (want_outer.code, want_outer.opt.encode())
    assert msg.opt.encode() == _message(code, opts, body).opt.encode()  # left as it was


@RELAXED
@given(responses, outer_requests, options, st.binary(max_size=64))
def test_a_response_splits_as_aiocoap_splits_it(
    code: Code, request_code: Code, opts: dict[str, Any], body: bytes
):
    _, endpoint = _pair()
    msg = _message(code, opts, body)
    rid = _request_id(request_code)
    outer, plaintext = endpoint._split_message(msg, rid)
    want_outer, want_plaintext = oscore.CanProtect._split_message(endpoint, msg, rid)
    assert plaintext == want_plaintext
    assert (outer.code, outer.opt.encode()) == (want_outer.code, want_outer.opt.encode())


def _result(f: Any, *args: Any) -> Any:
    """``f(*args)``, or the type of what it raised (refused alike: an ID too long for the
    algorithm's nonce, a nonce longer than the Common IV, a Proxy-Uri aiocoap cannot split)."""
    try:
        return f(*args)
    except Exception as err:
        return type(err)


@RELAXED
@given(st.binary(max_size=5), st.binary(max_size=7), st.sampled_from(sorted(oscore.algorithms)))
@example(b"\x00", b"", "AES-CCM-16-64-128")
@example(b"\xff" * 5, b"\x01" * 7, "AES-CCM-16-64-128")
def test_a_nonce_is_the_one_aiocoap_makes(piv: bytes, sender: bytes, alg_name: str):
    device, _ = _pair()
    alg = oscore.algorithms[alg_name]
    base = oscore.BaseSecurityContext._construct_nonce
    want = _result(lambda *a: base(device, *a), piv, sender, alg)
    assert _result(device._construct_nonce, piv, sender, alg) == want


def test_a_proxy_uri_request_is_split_by_aiocoap():
    device, _ = _pair()
    msg = _message(Code.GET, {"proxy_uri": "coap://example.org/a/b?c"}, b"")
    base = oscore.CanProtect._split_message
    ours = _result(device._split_message, msg, None)
    want = _result(lambda *a: base(device, *a), msg, None)
    if isinstance(want, tuple):
        ours = (ours[0].code, ours[0].opt.encode(), ours[1])
        want = (want[0].code, want[0].opt.encode(), want[1])
    assert ours == want


def test_a_protected_block_and_its_answer_come_out_as_they_went_in():
    device, endpoint = _pair()
    opts = {
        "uri_host": "127.0.0.1",
        "uri_path": ("ingest", "pump-01"),
        "content_format": 112,
        "block1": _block(3, True, 6),
    }
    request = _message(Code.POST, opts, bytes(range(256)) * 4)
    protected, _ = device.protect(request)
    inner, rid = endpoint.unprotect(_over_the_wire(protected))
    assert inner.code == Code.POST
    assert inner.opt.uri_path == ("ingest", "pump-01")
    assert inner.opt.uri_host is None  # outer only
    assert inner.opt.block1 == _block(3, True, 6)
    assert inner.payload == request.payload
    answer, _ = endpoint.protect(_message(Code.CONTINUE, {"block1": _block(3, True, 6)}, b""), rid)
    back, _ = device.unprotect(_over_the_wire(answer), rid)
    assert back.code == Code.CONTINUE and back.opt.block1 == _block(3, True, 6)


# -- the endpoint's short way hands a decrypted request on (PersistentContext.hand_on) -------------


def _handed_on_block(num: int = 0) -> tuple[PersistentContext, bytes, Message, Any]:
    """An endpoint context that decrypted a device's Block1 block (``wire``: its datagram) the
    way cloud/fastpath.py does: window put back as it was, the inner request handed on."""
    device, endpoint = _pair()
    opts = {"uri_path": ("ingest", "pump-01"), "block1": _block(num, True, 6)}
    protected, _ = device.protect(_message(Code.POST, opts, bytes(1024)))
    protected.mtype, protected.mid, protected.token = Type.CON, 1, b"\x07"
    wire = protected.encode()
    window = endpoint.recipient_replay_window
    before = window.state()
    inner, rid = endpoint.unprotect(_decoded(wire))
    window.put_back(before)
    endpoint.hand_on(_decoded(wire), inner, rid)
    return endpoint, wire, inner, rid


def _decoded(wire: bytes) -> Message:
    msg = Message.decode(wire)
    msg.direction = Direction.INCOMING
    return msg


def test_aiocoaps_unprotect_of_a_handed_on_request_takes_it_and_strikes_out_its_number():
    endpoint, wire, inner, rid = _handed_on_block()
    seqno = int.from_bytes(rid.partial_iv, "big")
    assert endpoint.recipient_replay_window.is_valid(seqno)  # put back: not yet used
    accepted = endpoint.accepted
    got, got_id = endpoint.unprotect(_decoded(wire))
    assert got is inner and got_id is rid  # not decrypted again
    assert not endpoint.recipient_replay_window.is_valid(seqno)
    assert endpoint.accepted == accepted + 1


def test_a_handed_on_request_replayed_is_refused():
    endpoint, wire, _, _ = _handed_on_block()
    endpoint.unprotect(_decoded(wire))
    with pytest.raises(oscore.ReplayError):
        endpoint.unprotect(_decoded(wire))  # an attacker's copy, under any message ID


def test_a_handed_on_request_whose_number_was_used_meanwhile_is_refused():
    endpoint, wire, _, rid = _handed_on_block()
    endpoint.recipient_replay_window.strike_out(int.from_bytes(rid.partial_iv, "big"))
    with pytest.raises(oscore.ReplayError):
        endpoint.unprotect(_decoded(wire))


def test_a_handed_on_request_whose_number_fell_out_of_the_window_is_refused():
    """Later requests moved the window past the handed-on one's number before aiocoap got to it:
    refused as a replay, as aiocoap refuses it."""
    endpoint, wire, _, rid = _handed_on_block()
    window = endpoint.recipient_replay_window
    window.strike_out(int.from_bytes(rid.partial_iv, "big") + 64)
    with pytest.raises(oscore.ReplayError):
        endpoint.unprotect(_decoded(wire))


def test_a_forged_body_under_a_handed_on_oscore_option_is_decrypted_and_refused():
    endpoint, wire, _, _ = _handed_on_block()
    forged = bytearray(wire)
    forged[-3] ^= 0x01  # the same OSCORE option (sequence number), another ciphertext
    with pytest.raises(oscore.ProtectionInvalid):
        endpoint.unprotect(_decoded(bytes(forged)))
    got, _ = endpoint.unprotect(_decoded(wire))  # the genuine one: decrypted as usual
    assert got.opt.block1 == _block(0, True, 6)


def test_handed_on_requests_are_kept_a_few_at_a_time():
    device, endpoint = _pair()
    window = endpoint.recipient_replay_window
    wires, inners = [], []
    for num in range(HANDED_ON + 1):
        opts = {"uri_path": ("ingest", "pump-01"), "block1": _block(num, True, 6)}
        protected, _ = device.protect(_message(Code.POST, opts, bytes(16)))
        protected.mtype, protected.mid, protected.token = Type.CON, num, b"\x07"
        wires.append(protected.encode())
        before = window.state()
        inner, rid = endpoint.unprotect(_decoded(wires[-1]))
        window.put_back(before)
        endpoint.hand_on(_decoded(wires[-1]), inner, rid)
        inners.append(inner)
    first, _ = endpoint.unprotect(_decoded(wires[0]))  # the oldest went: decrypted again
    assert first is not inners[0] and first.opt.block1 == _block(0, True, 6)
    for wire, inner in zip(wires[1:], inners[1:], strict=True):
        assert endpoint.unprotect(_decoded(wire))[0] is inner


def _short_way(endpoint: PersistentContext, wire: bytes) -> None:
    """What cloud/fastpath.py does with a Block1 block: a sequence number the window refuses goes
    to aiocoap untouched; else it is decrypted, the window and the count are put back and the
    result is handed on (a forged datagram fails to decrypt: nothing is handed on)."""
    outer = _decoded(wire)
    option = bytes(outer.opt.oscore)
    window = endpoint.recipient_replay_window
    if not window.is_valid(int.from_bytes(option[1 : 1 + (option[0] & 0x07)], "big")):
        return
    before, accepted = window.state(), endpoint.accepted
    try:
        inner, rid = endpoint.unprotect(outer)
    except Exception:
        inner = None
    window.put_back(before)
    endpoint.accepted = accepted
    if inner is not None:
        endpoint.hand_on(_decoded(wire), inner, rid)


def _outcome(endpoint: PersistentContext, wire: bytes) -> Any:
    try:
        inner, rid = endpoint.unprotect(_decoded(wire))
    except Exception as err:
        return type(err).__name__
    return inner.code, inner.opt.encode(), inner.payload, rid.partial_iv, rid.kid


steps = st.lists(
    st.tuples(st.sampled_from(["new", "short", "deliver"]), st.booleans(), st.integers(0, 63)),
    min_size=1,
    max_size=40,
)


@RELAXED
@given(steps)
def test_handing_on_changes_no_outcome_of_any_sequence_of_blocks_replays_and_forgeries(
    plan: list[tuple[str, bool, int]],
):
    """One endpoint context with the short way's hand-on, one without, fed the same datagrams
    (new blocks, copies of earlier ones in any order, forged bodies): every unprotect gives the
    same request, identifier or error, and the replay windows and accepted counts stay equal."""
    device, handing = _pair()
    plain = _endpoint()  # the same state, never hands on
    wires: list[bytes] = []
    for what, forge, n in plan:
        if what == "new" or not wires:
            opts = {"uri_path": ("ingest", "pump-01"), "block1": _block(len(wires), True, 6)}
            protected, _ = device.protect(_message(Code.POST, opts, bytes([n]) * 64))
            protected.mtype, protected.mid, protected.token = Type.CON, len(wires), b"\x07"
            wires.append(protected.encode())
            continue
        wire = wires[n % len(wires)]
        if forge:  # another ciphertext under the same OSCORE option
            forged = bytearray(wire)
            forged[-1 - n % 8] ^= 1 + n % 255
            wire = bytes(forged)
        if what == "short":
            _short_way(handing, wire)
            continue
        assert _outcome(handing, wire) == _outcome(plain, wire)
        assert handing.recipient_replay_window.state() == plain.recipient_replay_window.state()
        assert handing.accepted == plain.accepted

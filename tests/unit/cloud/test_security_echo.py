"""The endpoint's Echo round trip for a new ID Context (cloud/security.py, agent/wire/oscore.py
``EchoKey``), with the device's real OSCORE context protecting and the endpoint's unprotecting:
forged candidates cannot keep a device from coming back (its Echo is a MAC, not state of the
candidate they evicted), and what was accepted once is never accepted again (replay), also by a
candidate derived anew after the device moved on to another ID Context, nor long after (an Echo
is good for one to two periods)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from aiocoap import CON, Code, Message, oscore
from aiocoap.message import Direction

from agent.wire.credentials import Credential
from agent.wire.oscore import ECHO_PERIOD, ClientContext, EchoKey
from cloud.security import MAX_CANDIDATES, Principals

NAME = "pump-01"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0 * ECHO_PERIOD  # the start of a period

    def __call__(self) -> float:
        return self.now


class Endpoint:
    """Principals as the endpoint holds them, and a device's own context (its state file)."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.cred = Credential.generate(NAME, "device", b"\x0a\x0b\x0c\x0d")
        self.principals = Principals(None, echo=EchoKey(self.clock))
        self.principals.load([(self.cred, False)])
        self.tmp_path = tmp_path
        self.device = self.reflash()

    def reflash(self) -> ClientContext:
        """A device without OSCORE state: a new random ID Context."""
        path = self.tmp_path / "oscore.json"
        path.unlink(missing_ok=True)
        self.device = ClientContext(self.cred, path)
        return self.device

    def request(self, echo: bytes | None = None) -> bytes:
        """The device's next request, as bytes on the wire."""
        inner = Message(code=Code.POST, uri_path=["ingest", NAME], payload=b"\x80")
        if echo is not None:
            inner.opt.echo = echo
        outer, _ = self.device.context.protect(inner)
        outer.mtype, outer.mid, outer.token = CON, 1, b""
        return bytes(outer.encode())

    def receive(self, datagram: bytes) -> Any:
        """What aiocoap does with a request: look up the context, unprotect (raises)."""
        outer = Message.decode(datagram)
        outer.direction = Direction.INCOMING
        ctx = self.principals.get_oscore_context_for(oscore.verify_start(outer))
        assert ctx is not None
        ctx.unprotect(outer)
        return ctx

    def challenge(self, datagram: bytes) -> bytes:
        """The Echo of the 4.01 the endpoint answers ``datagram`` with."""
        with pytest.raises(oscore.ReplayErrorWithEcho) as refused:
            self.receive(datagram)
        return bytes(refused.value.echo)

    def forge(self, count: int) -> None:
        """``count`` forged requests with the device's key id and random ID Contexts."""
        for _ in range(count):
            header = {oscore.COSE_KID: self.cred.sender_id, oscore.COSE_KID_CONTEXT: os.urandom(8)}
            assert self.principals.get_oscore_context_for(header) is not None

    @property
    def state(self) -> Any:
        return self.principals._states[NAME]  # what the endpoint holds is the point


@pytest.mark.parametrize("later", [0.0, ECHO_PERIOD - 1, ECHO_PERIOD])
def test_the_device_comes_back_with_its_echo_after_forged_ones_evicted_its_candidate(
    tmp_path: Path, later: float
) -> None:
    """Attack: candidate eviction. The repetition is accepted in the period the Echo was made
    in and the next one, and its context is the principal's context at once."""
    ep = Endpoint(tmp_path)
    first = ep.request()
    echo = ep.challenge(first)
    ep.forge(100 * MAX_CANDIDATES)
    assert ep.device.context.id_context not in ep.state.candidates  # evicted
    ep.clock.now += later
    again = ep.request(echo)
    ctx = ep.receive(again)
    assert ep.state.current is ctx and ctx.id_context == ep.device.context.id_context
    ep.forge(100 * MAX_CANDIDATES)  # the verified context is no candidate: nothing evicts it
    assert ep.receive(ep.request()) is ctx
    with pytest.raises(oscore.ReplayError):  # replay: the window starts at the repetition
        ep.receive(again)
    with pytest.raises(oscore.ReplayError):
        ep.receive(first)


def test_an_echo_two_periods_old_is_not_fresh(tmp_path: Path) -> None:
    ep = Endpoint(tmp_path)
    echo = ep.challenge(ep.request())
    ep.clock.now += 2 * ECHO_PERIOD
    newer = ep.challenge(ep.request(echo))  # refused with a new Echo, not accepted
    assert newer != echo
    ep.forge(10)
    assert ep.receive(ep.request(newer)) is ep.state.current


def test_a_replaced_contexts_repetition_is_not_accepted_again(tmp_path: Path) -> None:
    """Replay across a reflash: the device set up context C (its repetition with the Echo was
    accepted), then C2 after a reflash. The captured repetition of C, replayed within the Echo's
    lifetime, meets a candidate derived anew for C (C was dropped when C2 was adopted): it is
    refused with a new Echo, because adopting C2 voided every Echo handed out before."""
    ep = Endpoint(tmp_path)
    old = ep.request(ep.challenge(ep.request()))
    ep.receive(old)
    ep.reflash()
    ep.receive(ep.request(ep.challenge(ep.request())))
    current = ep.state.current
    assert current.id_context == ep.device.context.id_context
    with pytest.raises(oscore.ReplayErrorWithEcho):
        ep.receive(old)
    assert ep.state.current is current


def test_forged_id_contexts_keep_memory_bounded(tmp_path: Path) -> None:
    """Memory under the flood: MAX_CANDIDATES candidates for the key id however many ID
    Contexts are forged, no state at all for key ids nobody has."""
    ep = Endpoint(tmp_path)
    ep.forge(10_000)
    assert len(ep.state.candidates) <= MAX_CANDIDATES
    for _ in range(1000):
        kid = os.urandom(4)
        header = {oscore.COSE_KID: kid, oscore.COSE_KID_CONTEXT: os.urandom(8)}
        assert ep.principals.get_oscore_context_for(header) is None or kid == ep.cred.sender_id
    assert list(ep.principals._states) == [NAME]


def test_echo_values_are_bound_to_the_context_and_the_epoch() -> None:
    clock = Clock()
    key = EchoKey(clock)
    binding = EchoKey.binding(b"\x01", b"ctx-1", 1)
    echo = key.value(binding)
    assert key.fresh(binding, echo)
    for other in (
        EchoKey.binding(b"\x02", b"ctx-1", 1),
        EchoKey.binding(b"\x01", b"ctx-2", 1),
        EchoKey.binding(b"\x01", b"ctx-1", 2),
        EchoKey.binding(b"\x01\x00", b"ctx-1", 1),
    ):
        assert not key.fresh(other, echo)
    assert not EchoKey(clock).fresh(binding, echo)  # another process (a restart): another key
    clock.now += ECHO_PERIOD
    assert key.fresh(binding, echo)
    clock.now += ECHO_PERIOD
    assert not key.fresh(binding, echo)

"""The pty harness: real pyserial on the slave path, a model behind the master, fault knobs.

The model here is a minimal instrument written for these tests (it reverses each request), so the
harness's own behaviour shows on its own; the Modbus and line sensor tests use it with the real
simulators.
"""

from __future__ import annotations

import itertools
import random
import time

import pytest

from agent.errors import DeviceNotFound
from drivers.bus import open_serial
from drivers.clock import RealClock
from drivers.sim.faults import Faults
from drivers.sim.serialport import PtyPort, SerialModel

# Read timeouts: answers come within milliseconds, but the suite shares two cores with other work,
# so reads that expect an answer wait up to TIMEOUT; reads that expect silence wait SHORT.
TIMEOUT = 1.0
SHORT = 0.2


class Reverser:
    """Answers each request with its bytes reversed; optionally streams a numbered line."""

    part = "reverser"

    def __init__(self) -> None:
        self.faults = Faults()
        self.stream_period: float | None = None
        self.seen: list[bytes] = []
        self.ticks = 0
        self.padding = b""

    def on_bytes(self, data: bytes) -> bytes:
        self.seen.append(data)
        return data[::-1]

    def on_tick(self) -> bytes:
        self.ticks += 1
        return b"tick %d%s\n" % (self.ticks, self.padding)


class Scripted(random.Random):
    """A Faults rng whose random() walks a fixed cycle, so intermittent faults are exact."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self._cycle = itertools.cycle(values)

    def random(self) -> float:
        return next(self._cycle)


@pytest.fixture
def rig():
    model = Reverser()
    pty = PtyPort(model, RealClock())
    port = open_serial(pty.path, baudrate=9600, timeout=TIMEOUT)
    yield model, pty, port
    port.close()
    pty.close()


def ask(port, data: bytes, timeout: float = TIMEOUT) -> bytes:
    port.timeout = timeout
    port.reset_input_buffer()
    port.write(data)
    return port.read(len(data))


def test_model_satisfies_protocol() -> None:
    assert isinstance(Reverser(), SerialModel)


def test_request_and_answer_through_pyserial(rig) -> None:
    model, pty, port = rig
    assert pty.path.startswith("/dev/")
    assert ask(port, b"hello") == b"olleh"
    assert ask(port, bytes(range(256))) == bytes(range(256))[::-1]  # raw: no tty translation
    assert model.seen[0] == b"hello"
    assert pty.traffic[0].request == b"hello"
    assert pty.traffic[0].response == b"olleh"


def test_disconnect_gives_no_answer_until_cleared(rig) -> None:
    model, pty, port = rig
    model.faults.disconnect = True
    assert ask(port, b"abc", SHORT) == b""
    assert model.seen == []  # lost on the wire: the model never saw it
    assert pty.traffic[-1].note == "disconnect"
    model.faults.clear()
    assert ask(port, b"abc") == b"cba"


def test_nack_is_a_probability_of_no_answer(rig) -> None:
    model, pty, port = rig
    model.faults.nack = 1.0
    assert ask(port, b"abc", SHORT) == b""
    assert pty.traffic[-1].note == "nack"
    model.faults.nack = 0.5
    model.faults.rng = Scripted([0.1, 0.9])  # first unlucky, then lucky
    assert ask(port, b"abc", SHORT) == b""
    assert ask(port, b"abc") == b"cba"
    model.faults.clear()
    assert ask(port, b"xyz") == b"zyx"


def test_bit_flip_changes_exactly_one_bit(rig) -> None:
    model, _, port = rig
    model.faults.bit_flip = 1.0
    got = ask(port, b"\x00" * 16)
    assert len(got) == 16
    assert sum(bin(b).count("1") for b in got) == 1
    model.faults.clear()
    assert ask(port, b"\x00" * 16) == b"\x00" * 16


def test_slow_answer_comes_late_and_busy_input_is_lost(rig) -> None:
    model, pty, port = rig
    model.faults.slow = 3 * SHORT
    assert ask(port, b"first", SHORT) == b""  # nothing within the read timeout
    port.write(b"second")  # arrives while the instrument is busy answering "first"
    assert pty.wait_idle(5.0)
    assert port.read(5) == b"tsrif"  # the late answer
    port.timeout = SHORT
    assert port.read(6) == b""  # "second" was dropped, as a busy instrument misses it
    assert any(e.note == "busy" and e.request == b"second" for e in pty.traffic)
    model.faults.clear()
    assert ask(port, b"third") == b"driht"


def test_streaming_sends_unasked_lines(rig) -> None:
    model, pty, port = rig
    model.stream_period = 0.01
    first = port.readline()
    second = port.readline()
    assert first.startswith(b"tick ") and second.startswith(b"tick ")
    assert int(second.split()[1]) > int(first.split()[1])
    model.stream_period = None
    assert pty.wait_idle(5.0)
    port.reset_input_buffer()
    ticks = model.ticks
    assert ask(port, b"ab") == b"ba"  # request/answer still works between ticks
    assert model.ticks == ticks


def test_unread_output_is_dropped_not_blocking(rig) -> None:
    """Nobody reads: once the pty buffer is full, output is dropped and the thread goes on."""
    model, pty, port = rig
    model.padding = b" " * 8000
    model.stream_period = 0.001
    deadline = time.monotonic() + 10.0
    while not any(e.note == "overrun" for e in pty.traffic) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(e.note == "overrun" for e in pty.traffic)
    model.stream_period = None
    assert pty.wait_idle(5.0)
    port.timeout = SHORT
    while port.read(65536):  # the kernel's buffers still hold what was queued before the drop
        pass
    assert ask(port, b"still here") == b"ereh llits"


def test_send_reaches_the_driver_side(rig) -> None:
    _, pty, port = rig
    pty.send(b"unsolicited\n")
    assert port.readline() == b"unsolicited\n"


def test_close_stops_the_port_and_is_idempotent() -> None:
    model = Reverser()
    pty = PtyPort(model, RealClock())
    path = pty.path
    pty.close()
    pty.close()
    assert not pty._thread.is_alive()
    with pytest.raises(DeviceNotFound, match=path):
        open_serial(path, timeout=TIMEOUT)


def test_context_manager_closes() -> None:
    with PtyPort(Reverser(), RealClock()) as pty:
        port = open_serial(pty.path, timeout=TIMEOUT)
        assert ask(port, b"ok") == b"ko"
        port.close()
    assert not pty._thread.is_alive()


def test_a_failing_model_loses_the_event_not_the_port(rig) -> None:
    model, pty, port = rig
    original = model.on_bytes

    def broken(data: bytes) -> bytes:
        if data == b"boom":
            raise RuntimeError("model bug")
        return original(data)

    model.on_bytes = broken
    assert ask(port, b"boom", SHORT) == b""
    assert ask(port, b"fine") == b"enif"
    assert pty._thread.is_alive()

"""A pseudo-terminal that puts a simulated serial instrument behind a real tty path.

:class:`PtyPort` opens a pty pair, puts both ends in raw mode and runs a daemon thread on the
master end. The slave end's path (``/dev/pts/N``) is what a driver opens with
``drivers.bus.open_serial``, exactly as it would open ``/dev/ttyUSB0``: the driver code under test
is the production code, down to pyserial and termios.

The thread hands request bytes to a *model* and writes back what it answers. A model is any object
with:

- ``faults``: a :class:`drivers.sim.faults.Faults`;
- ``on_bytes(data: bytes) -> bytes``: request bytes in, answer bytes out (``b""``: no answer);
- optionally ``frame_gap`` (seconds): bytes are handed over only once the line has been quiet that
  long, so a model that frames by silence (Modbus RTU) gets whole frames; without it, bytes are
  handed over as they arrive;
- optionally ``stream_period`` (seconds, or None) and ``on_tick() -> bytes``: a streaming
  instrument; while ``stream_period`` is not None the thread writes ``on_tick()`` every period.

Fault knobs applied here, for every model (the model applies ``bad_crc`` and ``stuck`` itself,
since only it knows its checksum and its values):

- ``disconnect``: nothing answers; requests are lost before the model sees them; no streaming;
- ``nack``: probability that a request (or a streamed line) gets no answer at all;
- ``slow``: extra seconds (real time) before an answer or a streamed line goes out; bytes that
  arrive while the instrument is busy are dropped, as a busy instrument misses them;
- ``bit_flip``: probability that one bit of an outgoing answer or line is flipped.

Time: the pty is real I/O, so the thread schedules on real time (``time.monotonic``); the
``clock`` given to the port timestamps the :attr:`PtyPort.traffic` log.

Output that nobody reads is dropped once the pty buffer is full (the master end is non-blocking),
like bytes sent down a cable with no listener: the thread never blocks on a write.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from drivers.clock import Clock

from .faults import Faults

logger = logging.getLogger(__name__)

#: Exchanges kept in :attr:`PtyPort.traffic`.
TRAFFIC_LOG = 512
#: Bytes read from the master end at once.
READ_CHUNK = 4096
#: How long :meth:`PtyPort.close` waits for the thread to finish, seconds.
JOIN_TIMEOUT = 2.0
#: Longest the thread sleeps before looking at the model again (a stream may start any time).
IDLE_POLL = 0.05


@runtime_checkable
class SerialModel(Protocol):
    """A simulated instrument behind a :class:`PtyPort` (see the module docstring)."""

    faults: Faults

    def on_bytes(self, data: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Exchange:
    """One event on the wire, as the instrument saw it.

    ``request`` is what the driver sent (``b""`` for a streamed line), ``response`` what went back
    (after faults; ``b""`` for none), ``note`` why nothing or something unusual happened:
    ``""``, ``"disconnect"``, ``"nack"``, ``"busy"`` (``request`` arrived while answering
    slowly and was dropped), ``"overrun"`` (``response`` holds output that was dropped because
    nobody reads and the pty buffer is full).
    """

    t: float
    request: bytes
    response: bytes
    note: str = ""


class PtyPort:
    """A simulated serial instrument reachable at :attr:`path`.

    Public API: ``PtyPort(model, clock, name=None)``; :attr:`path` (the tty to open);
    :attr:`model`; :attr:`traffic` (a deque of :class:`Exchange`, newest last);
    :meth:`send` (unsolicited bytes to the driver's side); :meth:`wait_idle`; :meth:`close`
    (also as a context manager).
    """

    def __init__(self, model: SerialModel, clock: Clock, *, name: str | None = None) -> None:
        self.model = model
        self.clock = clock
        self.traffic: deque[Exchange] = deque(maxlen=TRAFFIC_LOG)
        self._master, self._slave = os.openpty()
        try:
            tty.setraw(self._master)
            tty.setraw(self._slave)
            os.set_blocking(self._master, False)
            self.path = os.ttyname(self._slave)
            self._wake_r, self._wake_w = os.pipe()
        except OSError:
            os.close(self._master)
            os.close(self._slave)
            raise
        self.name = name or getattr(model, "part", type(model).__name__)
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._write_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"pty-{self.name}", daemon=True)
        self._thread.start()
        logger.debug("pty open name=%s path=%s", self.name, self.path)

    def __repr__(self) -> str:
        return f"PtyPort({self.name!r}, path={self.path!r})"

    def __enter__(self) -> PtyPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Write ``data`` to the driver's side now, as if the instrument sent it unasked."""
        self._write(data, request=b"", note="")

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until no answer or streamed line is being prepared (a slow one included).

        After a model's ``stream_period`` is set to None, no line is started once this returned.
        False on timeout.
        """
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Stop the thread and close the pty. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(JOIN_TIMEOUT)
        for fd in (self._slave, self._master, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        logger.debug("pty closed name=%s path=%s", self.name, self.path)

    # ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._master, selectors.EVENT_READ, "rx")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        pending = bytearray()
        last_rx = 0.0
        next_tick: float | None = None
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                period = getattr(self.model, "stream_period", None)
                if period is None:
                    next_tick = None
                elif next_tick is None:
                    next_tick = now + period
                gap = getattr(self.model, "frame_gap", None) or 0.0
                deadlines = []
                if pending:
                    deadlines.append(last_rx + gap)
                if next_tick is not None:
                    deadlines.append(next_tick)
                timeout = max(0.0, min([*deadlines, now + IDLE_POLL]) - now)
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        return
                    data = self._read_available()
                    if data:
                        pending += data
                        last_rx = time.monotonic()
                now = time.monotonic()
                if pending and now - last_rx >= gap:
                    request = bytes(pending)
                    pending.clear()
                    self._guarded(self._answer, request)
                if next_tick is not None and period is not None and now >= next_tick:
                    self._guarded(self._tick)
                    next_tick = max(next_tick + period, time.monotonic())
        except Exception:
            logger.exception("pty thread failed name=%s path=%s", self.name, self.path)
        finally:
            sel.close()

    def _guarded(self, fn: Callable[..., None], *args: bytes) -> None:
        """Run one event; a model that raises loses that event, not the port."""
        try:
            fn(*args)
        except OSError:
            raise
        except Exception:
            logger.exception("pty model failed name=%s path=%s", self.name, self.path)

    def _read_available(self) -> bytes:
        try:
            return os.read(self._master, READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError as err:
            if err.errno != errno.EIO:
                raise
            # EIO: no slave end is open. We keep one open, so this is transient; do not spin.
            self._stop.wait(0.01)
            return b""

    def _answer(self, request: bytes) -> None:
        faults = self.model.faults
        if faults.disconnect:
            self._log(request, b"", "disconnect")
            return
        if faults.nack and faults.rng.random() < faults.nack:
            self._log(request, b"", "nack")
            return
        self._idle.clear()
        try:
            response = self.model.on_bytes(request)
            if not response:
                self._log(request, b"", "")
                return
            self._delay(faults.slow)
            self._write(faults.corrupt(response), request=request, note="")
        finally:
            self._idle.set()

    def _tick(self) -> None:
        self._idle.clear()  # before looking at the period, so wait_idle() after a stop is exact
        try:
            if getattr(self.model, "stream_period", None) is None:
                return
            faults = self.model.faults
            if faults.disconnect:
                return
            if faults.nack and faults.rng.random() < faults.nack:
                self._log(b"", b"", "nack")
                return
            line = self.model.on_tick()  # type: ignore[attr-defined]
            if line:
                self._delay(faults.slow)
                self._write(faults.corrupt(line), request=b"", note="")
        finally:
            self._idle.set()

    def _delay(self, seconds: float) -> None:
        """Be busy for ``seconds``; whatever arrives meanwhile is lost."""
        if seconds <= 0:
            return
        self._stop.wait(seconds)
        while dropped := self._read_available():
            self._log(dropped, b"", "busy")

    def _write(self, data: bytes, *, request: bytes, note: str) -> None:
        # Logged first, so whoever has read the answer finds it in the traffic log.
        self._log(request, data, note)
        view = memoryview(data)
        with self._write_lock:
            while view:
                try:
                    n = os.write(self._master, view)
                except BlockingIOError:
                    break
                except OSError as err:
                    if err.errno != errno.EIO:
                        raise
                    break
                view = view[n:]
        if view:
            self._log(b"", bytes(view), "overrun")

    def _log(self, request: bytes, response: bytes, note: str) -> None:
        self.traffic.append(Exchange(self.clock.monotonic(), request, response, note))
        if note:
            logger.debug(
                "pty event name=%s note=%s request=%s", self.name, note, request.hex(" ")[:60]
            )

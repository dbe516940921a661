"""The steps the gateway's devices quantize their channels to, learned from their compact batches,
so the forwarder re-encodes their readings as compactly as they did (docs/gateway.md "What it
does": ``resolutions.json``).

Bounded: a device may name any sensor and channel in its batches, so a compromised one could
grow the table, and the file written at each pass, without end. Each device keeps the steps of
its :data:`MAX_CHANNELS` channels seen most recently; all devices together at most
:data:`MAX_STEPS`, the device seen least recently losing its least recent steps first. An
evicted step costs bytes, never data: that channel's readings go up exactly (values decoded
from a device's grid, sent as they are) until the device's next compact batch naming it teaches
the step again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.errors import AgentError
from agent.files import read_json, write_atomic
from agent.wire import codec
from agent.wire.compact import check_resolution

log = logging.getLogger("agent.gateway")

RESOLUTIONS_FILE = "resolutions.json"
#: Channels (sensor, channel) whose steps a device keeps: those it named most recently
MAX_CHANNELS = 256
#: Steps of all devices together (about 40 bytes each in the file)
MAX_STEPS = 32_768

Steps = dict[tuple[str, str], float]  # (sensor, channel) -> step, least recently seen first


class Resolutions:
    """The step each device quantizes each channel to (module docstring), learned from its
    compact batches (:meth:`CompactDecoding.resolutions`): re-encoding values decoded from a
    device's grid is lossless. A channel never seen in a compact batch, or evicted, is sent
    exactly. Kept in a file so a restarted gateway need not learn again; losing it costs bytes,
    never data."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / RESOLUTIONS_FILE
        self.steps: dict[str, Steps] = {}  # the device seen least recently first
        self._count = 0  # steps of all devices
        self.dirty = False
        self.evicted = 0  # steps dropped for the bounds since the start
        try:
            raw = read_json(self.path)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            for device, rows in raw.items():
                steps = {(str(s), str(c)): v for s, c, v in rows}
                for (s, c), v in steps.items():  # a step the encoder refuses fails every pass
                    check_resolution(v, s, c)
                self._learn(str(device), steps.items())  # a file of another bound: within this
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as err:  # CodecError too: relearned from batches
            log.warning(
                "event=gateway_resolutions_unreadable path=%s error=%r", self.path, str(err)
            )
            self.steps, self._count = {}, 0
        self.dirty = False

    def observe(self, device: str, cf: int, payload: bytes) -> None:
        """A batch the gateway's server decoded (CloudServer.batch_observer)."""
        encoding = codec.encoding_for(cf)
        read = getattr(encoding, "resolutions", None)
        if read is None:
            return  # SenML: no resolutions in it
        try:
            found = read(payload)
        except AgentError:
            return
        self._learn(device, found.items())

    def _learn(self, device: str, found: Iterable[tuple[tuple[str, str], float]]) -> None:
        """``found`` becomes the device's most recent steps; then the bounds. It runs for every
        batch a device sends: its cost is that batch's channels and the steps evicted, not the
        size of the table (``_count`` keeps the total)."""
        known = self.steps.pop(device, {})
        self.steps[device] = known  # the device seen most recently last
        self._count -= len(known)
        for key, step in found:
            if known.pop(key, None) != step:
                self.dirty = True
            known[key] = step  # the channel seen most recently last
        evicted = 0
        while len(known) > MAX_CHANNELS:
            del known[next(iter(known))]
            evicted += 1
        self._count += len(known)
        while self._count > MAX_STEPS:  # the devices seen least recently give up theirs first
            name = next(iter(self.steps))
            table = self.steps[name]
            del table[next(iter(table))]
            self._count -= 1
            evicted += 1
            if not table:
                del self.steps[name]
        if evicted:
            self.evicted += evicted
            self.dirty = True
            log.debug("event=gateway_resolutions_evicted device=%s steps=%d", device, evicted)

    def of(self, device: str) -> Callable[[str, str], float | None]:
        steps = self.steps.get(device, {})
        return lambda sensor, channel: steps.get((sensor, channel))

    async def save(self) -> None:
        """Write the file if a step changed (in the order of use: a restart keeps it)."""
        if not self.dirty:
            return
        self.dirty = False
        doc = {d: [[s, c, v] for (s, c), v in t.items()] for d, t in self.steps.items()}
        data = (json.dumps(doc) + "\n").encode()
        await asyncio.to_thread(write_atomic, self.path, data)

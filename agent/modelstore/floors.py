"""Rollback protection for models: per model name, the lowest rollback index a version this
device takes may have.

A model's signed manifest entry may carry ``rollback_index`` (``edge-agent-cloud models publish
--rollback-index N``; the federated coordinator copies its base version's entry, so the versions
it publishes keep the index). Once a version of index N of a model has been swapped in here
(assigned and active), no version of that model below N is taken again: a signed but bad
version cannot be assigned back by whoever can write the desired state. The floors are kept in
``floors.json`` in the cache directory (``{name: {"index", "version"}}``, written atomically,
one raise at a time) and again in ``floors.copy.json``, written after it; a floor is the higher
of the two files' (a raise cut between the two writes is in the first). A damaged or missing
file is said (damaged) and the other holds the floors: corruption at rest of one file does not
lower a floor; both damaged read as none. The models the config starts with raise nothing.

To allow an older version again on purpose, publish it again under a new version with
``--rollback-index`` at least the floor.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import ModelError
from agent.files import read_json, write_atomic
from agent.modelstore.signing import MAX_ROLLBACK_INDEX

log = logging.getLogger(__name__)

FLOORS_FILE = "floors.json"
FLOORS_COPY = "floors.copy.json"  # the same floors again (module docstring)
MAX_FLOORS_BYTES = 1 << 16


def rollback_index(entry: Mapping[str, Any], label: str) -> int:
    """The signed entry's ``rollback_index`` (0 when absent); ModelError when it is not an
    integer 0..2**31-1."""
    value = entry.get("rollback_index", 0)
    if type(value) is not int or not 0 <= value <= MAX_ROLLBACK_INDEX:
        raise ModelError(f"{label}: rollback_index is not an integer 0..{MAX_ROLLBACK_INDEX}")
    return value


class Floors:
    """The floors of one cache directory."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FLOORS_FILE
        self.copy = Path(directory) / FLOORS_COPY
        # raise_to reads, adds and writes the file: two at once (two roles swapped together,
        # each in a worker thread) would each write what they read, one floor lost
        self._raising = threading.Lock()

    def read(self) -> dict[str, tuple[int, str]]:
        """Each name's floor: the higher of the two files'."""
        out = self._read(self.path)
        for name, floor in self._read(self.copy).items():
            if floor[0] > out.get(name, (-1, ""))[0]:
                out[name] = floor
        return out

    @staticmethod
    def _read(path: Path) -> dict[str, tuple[int, str]]:
        try:
            doc = read_json(path, limit=MAX_FLOORS_BYTES)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("event=floors_unreadable path=%s error=%r", path, str(err))
            return {}
        if not isinstance(doc, dict):
            log.warning("event=floors_unreadable path=%s error='not a map'", path)
            return {}
        out: dict[str, tuple[int, str]] = {}
        for name, item in doc.items():
            index = item.get("index") if isinstance(item, dict) else None
            version = item.get("version") if isinstance(item, dict) else None
            if type(index) is int and 0 <= index <= MAX_ROLLBACK_INDEX:
                out[str(name)] = (index, str(version))
            else:
                log.warning("event=floors_unreadable path=%s name=%r", path, str(name)[:64])
        return out

    def check(self, name: str, version: str, entry: Mapping[str, Any]) -> None:
        """ModelError when ``name`` ``version`` (its signed ``entry``) is below the floor."""
        label = f"model {name} {version}"
        index = rollback_index(entry, label)
        floor, by = self.read().get(name, (0, ""))
        if index < floor:
            raise ModelError(
                f"{label}: rollback index {index} is below this device's floor {floor} for "
                f"{name} (set by version {by}, active here); refused (publish it again under a "
                f"new version with --rollback-index {floor} or more to allow it)"
            )

    def raise_to(self, name: str, version: str, entry: Mapping[str, Any]) -> None:
        """``name`` ``version`` is active: its index becomes the floor when it is higher."""
        index = rollback_index(entry, f"model {name} {version}")
        with self._raising:
            floors = self.read()
            if index <= floors.get(name, (0, ""))[0]:
                return
            floors[name] = (index, version)
            doc = {n: {"index": i, "version": v} for n, (i, v) in sorted(floors.items())}
            data = (json.dumps(doc) + "\n").encode()
            write_atomic(self.path, data)
            write_atomic(self.copy, data)
        log.info("event=model_floor_raised name=%s index=%d version=%s", name, index, version)

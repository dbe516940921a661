"""Files the agent and the gateway read at rest, damaged: nested deeper than a parser's stack,
larger than any state file, not UTF-8, valid JSON of another shape. Each is refused in one line or
recovered from (moved aside, started afresh, learned again); none raises out of its reader, where
it would stop the agent at every start (a crash loop under systemd).

The JSON state files are read with :func:`agent.files.read_json` (one size limit, RecursionError
made ValueError); the test of the package order below keeps it the only way in."""

from __future__ import annotations

import ast
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.detect.features import Calibration
from agent.errors import ConfigError
from agent.files import loads_json, read_json, toml_document
from agent.gateway.hlc import HybridClock
from agent.gateway.relay import CURSOR_FILE, RecordForwarder
from agent.gateway.resolutions import RESOLUTIONS_FILE, Resolutions
from agent.learn.ledger import LEDGER_FILE, PrivacyLedger
from agent.ota import compat
from agent.sync.routing import Router
from agent.sync.transport import Endpoints
from agent.wire.batch import WireRecord
from agent.wire.credentials import Credential, CredentialError
from agent.wire.records import TelemetryBody
from cloud.storage import SQLiteStorage
from drivers.clock import VirtualClock

from .gateway.helpers import SetClock
from .service.test_commands import runner
from .sync.test_routing import DEVICE
from .sync.test_routing import settings as routing_settings

ROOT = Path(__file__).resolve().parents[2]
DEEP = "[" * 5000 + "]" * 5000  # 10 kB; the standard library's parsers recurse per level


# -- the shared readers --------------------------------------------------------------------------
def test_read_json_refuses_deep_large_and_undecodable_files_as_value_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    for data, said in (
        (DEEP.encode(), "nested too deep"),
        (b'{"a": "' + b"x" * 20_000 + b'"}', "more than 20000 bytes"),
        (b'{"a": "\xff"}', "utf-8"),
        (b'{"a": ', "Expecting value"),
    ):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=said):
            read_json(path, limit=20_000)
    path.write_bytes(b'{"a": [1, 2]}')
    assert read_json(path, limit=13) == {"a": [1, 2]}
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "none.json")
    with pytest.raises(ValueError, match="nested too deep"):
        loads_json(DEEP)


def test_read_json_allocates_for_the_file_not_for_the_limit(tmp_path: Path) -> None:
    """A state file of a few bytes costs a few bytes to read (read(limit + 1) allocated the 16 MiB
    limit at every read); a file that reports no size (procfs) is still read."""
    import tracemalloc

    small = tmp_path / "small.json"
    small.write_text('{"n": 1}')
    tracemalloc.start()
    try:
        assert read_json(small) == {"n": 1}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    with pytest.raises(ValueError, match="more than 10 bytes"):  # procfs has no size: read on
        read_json(Path("/proc/self/status"), limit=10)


def test_a_config_nested_too_deep_is_one_config_error() -> None:
    """Was a RecursionError traceback and exit 1 (systemd restarts it) instead of exit 78."""
    with pytest.raises(ConfigError, match=r"agent.toml: not valid TOML: nested too deep"):
        toml_document("note = " + "[" * 600 + "]" * 600, "agent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        toml_document("[agent", "agent.toml")
    assert toml_document("a = [[1]]", "agent.toml") == {"a": [[1]]}


#: Modules that parse JSON or TOML text themselves: bootcheck runs with the standard library
#: alone (it handles RecursionError itself), statedoc and cloud's commandcli parse command-line
#: values (they handle it too), the CLI peeks at a config's data_dir (any error: None),
#: configref reads the packaged example.
PARSES_ITSELF = {
    "agent/files.py",
    "agent/ota/bootcheck.py",
    "agent/wire/statedoc.py",
    "agent/service/cli.py",
    "agent/service/configref.py",
    "cloud/commandcli.py",
}


def test_state_files_are_parsed_only_through_the_shared_readers() -> None:
    found = []
    for path in sorted([*(ROOT / "agent").rglob("*.py"), *(ROOT / "cloud").rglob("*.py")]):
        rel = str(path.relative_to(ROOT))
        if rel in PARSES_ITSELF:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr)
                in {("json", "loads"), ("json", "load")}
                | {("tomllib", "loads"), ("tomllib", "load")}
            ):
                found.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "parse with agent.files read_json/loads_json/toml_document:\n" + "\n".join(
        found
    )


# -- each reader, a file nested too deep ---------------------------------------------------------
def _ledger(tmp: Path) -> Any:
    (tmp / LEDGER_FILE).write_text(DEEP)
    ledger = PrivacyLedger(tmp / LEDGER_FILE, budget=1e6, delta=1e-5)
    return ledger.spent() == math.inf  # unreadable: it spends everything, charges nothing


def _commands(tmp: Path) -> Any:
    (tmp / "commands.json").write_text(DEEP)
    return runner(tmp).done == {}


def _endpoint_store(tmp: Path) -> Any:
    (tmp / "endpoint-store.json").write_text(DEEP)
    return (
        Endpoints(("coap://a",), VirtualClock(), store_path=tmp / "endpoint-store.json").home
        is None
    )


def _routing(tmp: Path) -> Any:
    path = tmp / "agent" / "routing.json"
    path.parent.mkdir(parents=True)
    path.write_text(DEEP)
    Router(routing_settings(tmp), device_id=DEVICE, store=None, transport=None, endpoint="coap://x")
    return (path.parent / "routing.json.corrupt").read_text() == DEEP


def _hlc(tmp: Path) -> Any:
    (tmp / "peer.hlc").write_text(DEEP)
    return HybridClock("gw-1", SetClock(1_700_000_000.0), tmp / "peer.hlc").now().node == "gw-1"


def _formats(tmp: Path) -> Any:
    (tmp / compat.FORMATS_FILE).write_text(DEEP)
    return compat.recorded(tmp) == ({}, None)


def _credential(tmp: Path) -> Any:
    path = tmp / "credential.json"
    path.write_text("[" * 2000 + "]" * 2000)  # within a credential's size limit
    os.chmod(path, 0o600)
    with pytest.raises(CredentialError, match=r"credential\.json: not JSON: .*nested too deep"):
        Credential.read(path)
    return True


def _resolutions(tmp: Path) -> Any:
    (tmp / RESOLUTIONS_FILE).write_text(DEEP)
    return Resolutions(tmp).steps == {}


def _routing_overflow(tmp: Path) -> Any:
    """1e999 is an OverflowError, not a ValueError, in int(): it stopped the Router's start."""
    path = tmp / "agent" / "routing.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "pending": [{"seq": 1e999}]}')
    Router(routing_settings(tmp), device_id=DEVICE, store=None, transport=None, endpoint="coap://x")
    return (path.parent / "routing.json.corrupt").exists()


def _clean_stop(tmp: Path) -> Any:
    """The endpoint's replay windows of its last clean stop (cloud/security.py)."""
    from cloud.security import CLEAN_STOP_FILE, take_clean_stop

    for text in (DEEP, '{"principals": {"d": {"id_context": "00", "replay": '
                 '{"index": 1e300, "bitfield": -5}}}}'):  # fmt: skip
        (tmp / CLEAN_STOP_FILE).write_text(text)
        assert take_clean_stop(tmp) == {}  # every principal goes through Echo
    return True


@pytest.mark.parametrize(
    "reader",
    [
        _ledger,
        _commands,
        _endpoint_store,
        _routing,
        _routing_overflow,
        _hlc,
        _formats,
        _credential,
        _resolutions,
        _clean_stop,
    ],
)
def test_a_state_file_nested_too_deep_is_refused_or_recovered(
    tmp_path: Path, reader: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert reader(tmp_path)


# -- the gateway's forwarding state ---------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        b"[]",
        b'{"d": 5}',
        b'{"d": [["s", "c"]]}',
        b'{"d": [["s", "c", "x"]]}',
        b'{"d": [["s", "c", 0]]}',  # steps the encoder refuses: every pass failed on them
        b'{"d": [["s", "c", -0.5]]}',
        b'{"d": [["s", "c", 1e999]]}',
        b'{"d": [["s", "c", 0.1], ["s", "v", NaN]]}',
        b"\xff",
    ],
)
def test_a_resolutions_file_of_another_shape_is_learned_again(
    tmp_path: Path, text: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Was an AttributeError out of the gateway's start for ``[]``, and a step of 0 or NaN failed
    every forwarding pass: losing the file costs bytes (the forwarder sends a channel exactly
    until a batch shows its step), never data."""
    (tmp_path / RESOLUTIONS_FILE).write_bytes(text)
    with caplog.at_level(logging.WARNING):
        assert Resolutions(tmp_path).steps == {}
    assert "event=gateway_resolutions_unreadable" in caplog.text


def _telemetry(seq: int) -> WireRecord:
    body = TelemetryBody("motor", 1_700_000_000.0 + seq, {"current_a": 1.0}).to_cbor()
    return WireRecord(seq, "telemetry", 1_700_000_000.0 + seq, body)


@pytest.mark.parametrize("cursor", ["1e999", "-3", '"7"', "true", "5000", None, "2"])
async def test_a_forward_cursor_past_the_store_or_unreadable_forwards_everything_again(
    tmp_path: Path, cursor: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A cursor beyond the newest stored record (a store replaced while the cursor file stayed,
    or a damaged number) held back every record until arrivals passed it; an unreadable one was
    an OverflowError out of the gateway's start (``1e999``). Now forwarding starts from the
    beginning (the cloud stores each record once)."""
    storage = SQLiteStorage.in_dir(tmp_path / "store")
    storage.ingest("pump-a", [_telemetry(i) for i in range(1, 4)], 1_700_000_100.0, register=True)

    async def db(fn: Any) -> Any:
        return fn(storage)

    if cursor is not None:
        (tmp_path / CURSOR_FILE).write_text(f'{{"arrival": {cursor}}}')
    none: Any = None
    with caplog.at_level(logging.WARNING):
        forwarder = RecordForwarder(db, none, lambda: "coap://x", tmp_path, name="gw-1")
        seen: list[int] = []

        async def relay(parts: Any, kept: Any, held: Any) -> int:
            seen.extend(r.seq for _, recs, _ in parts for r in recs)
            return sum(len(recs) for _, recs, _ in parts)

        forwarder._relay = relay  # type: ignore[method-assign]
        assert await forwarder.forward_once() == (1 if cursor == "2" else 3)
    assert seen == ([3] if cursor == "2" else [1, 2, 3])  # a cursor in range is kept
    assert read_json(tmp_path / CURSOR_FILE) == {"arrival": 3, "features": 0}
    if cursor == "2":
        assert "event=forward_cursor" not in caplog.text
    elif cursor == "5000":
        assert "event=forward_cursor_reset cursor=5000 newest=3" in caplog.text
    elif cursor is not None:
        assert "event=forward_cursor_unreadable" in caplog.text
    storage.close()


# -- the detector's saved calibration -------------------------------------------------------------
def test_a_calibration_that_divides_by_zero_is_not_restored() -> None:
    from agent.detect.detector import Detector
    from agent.detect.inference import load_manifest

    manifest = load_manifest(ROOT / "models")
    entry = dict(manifest.entry("skab-ae").raw)
    zero = np.zeros(1, dtype=np.float32)

    class Zeros:
        name, runtime = "zeros", "numpy"

        def predict(self, x: np.ndarray) -> np.ndarray:
            return np.zeros((len(x), int(np.prod(x.shape[1:]))), dtype=np.float32) + zero

    det = Detector.from_entry(Zeros(), entry)
    n = len(det.spec.channels)
    ones = np.ones(n)
    good = Calibration(ones, ones, ones, ones, ones, samples=400)
    for field in ("std", "smooth_std", "scale"):
        bad = Calibration.from_dict(good.to_dict() | {field: [0.0] * n})
        with pytest.raises(ValueError, match="not positive"):
            Detector.from_entry(Zeros(), entry).restore(bad)
    det.restore(good)

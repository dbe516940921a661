"""Text in state documents (agent/wire/statedoc.py): a NUL character anywhere in a reported or a
desired document (a key or a value, at any depth) is refused as the decoder refuses any other bad
value (StateError: the endpoint answers 4.00), since PostgreSQL's text cannot hold one (the
reported PUT failed 5.03 on every retry; SQLite kept it and a later migrate failed on it). The
other control characters are kept in values: a reason or an error message may hold a line break,
and every view escapes them. Keys are names and take none."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest

from agent.wire import records, statedoc
from agent.wire.statedoc import (
    StateError,
    check_desired,
    parse_assignment,
    parse_desired_changes,
    parse_reported,
)

pytestmark = pytest.mark.timeout(30)
VERSION = 1_700_000_000_000
OUTCOME = {"version": "1.2.3", "result": "rolled_back", "at": 1_700_000_000.0}


def reported(doc: dict[str, Any]) -> bytes:
    return records.dumps({key: [VERSION, value] for key, value in doc.items()})


NUL_REPORTS = {
    "link_state_nul": ("link/state", "up\x00"),  # cloud/linkhistory.py keeps it as text
    "update_reason_nul": ("agent/update", {**OUTCOME, "reason": "boom\x00"}),  # releasestore
    "nested_map_key_nul": ("sensor/motor/health", {"chan\x00nel": "ok"}),
    "deep_list_text_nul": ("diag/trace", [["a", ["b", "\x00"]]]),
    "model_error_nul": ("model/anomaly", {"status": "failed", "desired": 3, "error": "e\x00"}),
    "desired_errors_key_nul": ("desired/errors", {"sensor/a\x00/enabled": {"version": 1}}),
}


@pytest.mark.parametrize("attack", sorted(NUL_REPORTS))
def test_attack_nul_in_a_reported_text_refuses_the_put_naming_the_key(attack: str) -> None:
    key, value = NUL_REPORTS[attack]
    body = reported({"queue/depth": 3, key: value})
    with pytest.raises(StateError, match=rf"reported state: {key}: .*NUL character") as err:
        parse_reported(body)
    assert "\x00" not in str(err.value)  # shown escaped: the message goes to logs and peers
    assert len(str(err.value)) < 200


def test_attack_nul_in_a_reported_key_is_refused_as_an_invalid_key() -> None:
    with pytest.raises(StateError, match="is not a valid key"):
        parse_reported(cbor2.dumps({"link/state\x00": [VERSION, "up"]}))


@pytest.mark.parametrize(
    "text",
    [
        "line one\nline two",
        "col\tcol\r\n",
        "\x1b[31mred\x1b[0m \x07 \x7f",  # kept as sent: the views escape it (agent/logsetup.py)
        "\u202eevil\u202c",
    ],
)
def test_other_control_characters_in_reported_values_are_kept(text: str) -> None:
    doc = {"link/state": text, "agent/update": {**OUTCOME, "reason": text}}
    parsed = parse_reported(reported(doc))
    assert parsed["link/state"].value == text
    assert parsed["agent/update"].value["reason"] == text


COMMAND = "command/logs"


@pytest.mark.parametrize(
    "value",
    [
        {"id": 1, "args": {"since": "x\x00"}},
        {"id": 1, "args": {"si\x00nce": 1}},
    ],
    ids=["arg_value", "arg_name"],
)
def test_attack_nul_in_a_desired_value_is_refused_on_every_path(value: dict[str, Any]) -> None:
    with pytest.raises(StateError, match=rf"desired state: {COMMAND}: .*NUL character"):
        check_desired(COMMAND, value)
    with pytest.raises(StateError, match="NUL character"):  # a PUT over CoAP (4.00)
        parse_desired_changes(cbor2.dumps({COMMAND: value}))
    with pytest.raises(StateError, match="NUL character"):  # the command line (JSON)
        parse_assignment(f"{COMMAND}={json.dumps(value)}")


def test_a_desired_text_without_nul_is_taken_with_its_control_characters() -> None:
    value = {"id": 1, "args": {"since": "a\tb\nc"}}
    assert parse_desired_changes(cbor2.dumps({COMMAND: value})) == {COMMAND: value}


@pytest.mark.parametrize(
    "key", ["sensor/motor/enabled\n", "command/selftest\n", "model/anomaly\n", "learn/ae\n"]
)
def test_attack_a_desired_key_with_a_trailing_line_feed_is_unknown(key: str) -> None:
    value = True if key.endswith("enabled\n") else None
    with pytest.raises(StateError, match="unknown key"):
        check_desired(key, value)


def test_nul_text_walks_keys_and_values_without_recursion() -> None:
    deep: Any = "x\x00"
    for _ in range(10_000):
        deep = [deep]
    assert statedoc.nul_text(deep) == "x\x00"
    assert (
        statedoc.nul_text({"a": [1, 2.0, b"\x00", None, {"b": "c"}]}) is None
    )  # bytes are no text
    assert statedoc.nul_text({"k\x00": 1}) == "k\x00"

"""tools/flash on a live machine that holds both roles: the venv they share is rebuilt with a new
bundle, so every service running from it is stopped first and the other role's started again
after (the flashed role's own restart is provision's usual one)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parents[3] / "tools"
sys.path.insert(0, str(TOOLS))

from flash_lib.provision import _stop_venv_users  # noqa: E402


class LiveMachine:
    """The ``run`` of a live target: ``systemctl is-active`` answers for the services in
    ``active``; every command is recorded."""

    def __init__(self, *active: str) -> None:
        self.active = set(active)
        self.calls: list[list[str]] = []

    def run(self, argv: list[str]) -> dict[str, Any]:
        self.calls.append(argv)
        if argv[:2] == ["systemctl", "is-active"]:
            return {"rc": 0 if argv[-1] in self.active else 3, "output": ""}
        if argv[:2] == ["systemctl", "stop"]:
            self.active -= set(argv[2:])
        return {"rc": 0, "output": ""}


def test_flashing_the_device_stops_a_running_gateway_and_names_it_to_start_again() -> None:
    machine = LiveMachine("edge-agent.service", "edge-agent-gateway.service")
    again = _stop_venv_users(machine, "edge-agent.service")  # type: ignore[arg-type]
    assert again == ["edge-agent-gateway.service"]
    assert machine.active == set()  # nothing runs from the venv while it is rebuilt
    assert ["systemctl", "stop", "edge-agent.service", "edge-agent-gateway.service"] in (
        machine.calls
    )


def test_a_role_that_was_not_running_is_not_started() -> None:
    machine = LiveMachine("edge-agent-gateway.service")
    assert _stop_venv_users(machine, "edge-agent-gateway.service") == []  # type: ignore[arg-type]
    assert machine.calls[-1] == ["systemctl", "stop", "edge-agent-gateway.service"]
    assert machine.active == set()

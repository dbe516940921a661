"""tools/flash on a live machine that holds both roles: the venv they share is rebuilt with a new
bundle, so every service running from it is stopped first and the other role's started again
after, also when a later step of the flash fails (the flashed role's own restart is provision's
usual one)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

TOOLS = Path(__file__).resolve().parents[3] / "tools"
sys.path.insert(0, str(TOOLS))

from flash_lib import provision as provision_mod  # noqa: E402
from flash_lib.errors import FlashError  # noqa: E402
from flash_lib.provision import INSTALLER, Plan, Settings, _stop_venv_users, provision  # noqa: E402
from flash_lib.targets import DirFS  # noqa: E402


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


class FailingStep(LiveMachine):
    """A live target where one command (``fails``) fails after the services were stopped."""

    label = "live"
    live = True
    needs_local_root = False

    def __init__(self, fails: list[str], *active: str) -> None:
        super().__init__(*active)
        self.fails = fails

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def free_bytes(self) -> None:
        return None

    def on_target(self, path: str) -> str:
        return path

    def run(self, argv: list[str]) -> dict[str, Any]:
        if argv == self.fails:
            self.calls.append(argv)
            return {"rc": 1, "output": "failed"}
        if argv[:2] == ["systemctl", "start"]:
            self.active |= set(argv[2:])
        return super().run(argv)


@pytest.mark.parametrize(
    ("fails", "says"),
    [
        ([INSTALLER], "building the venv failed"),  # pip: no space left on the device
        (["systemctl", "restart", "edge-agent-gateway.service"], "starting edge-agent-gateway"),
    ],
)
def test_a_failed_flash_starts_the_other_role_again(
    monkeypatch: Any, tmp_path: Path, fails: list[str], says: str
) -> None:
    """Flashing the gateway stops the running agent for the venv rebuild; a later step fails
    (the venv build; the gateway's own start, e.g. exit 78 without --devices): the agent,
    which ran, is started again, not left stopped for good."""
    machine = FailingStep(fails, "edge-agent.service")
    machine.fs = DirFS(tmp_path)  # type: ignore[attr-defined]
    plan = Plan(changes=[], account_changes=[], boot=None, build_venv=True, notes=[])
    monkeypatch.setattr(provision_mod, "make_plan", lambda target, s, say: plan)
    settings = Settings(device_id="gw-1", endpoint="coap://cloud:5683", security="none")
    settings = replace(settings, role="gateway")
    with pytest.raises(FlashError, match=says):
        provision(machine, settings, say=lambda line: None)  # type: ignore[arg-type]
    assert machine.calls[-1] == ["systemctl", "start", "edge-agent.service"]
    assert "edge-agent.service" in machine.active

"""The command line of agent releases in the storage (cloud/releasecli.py, cloud/groupcli.py):
publish and list on SQLite's --data and on --storage postgresql://, groups, ``releases assign``
to devices and groups (desired ``agent/version`` through the storage's desired-state write), and
the release history ``devices show`` prints. Real storages, the real command line; hostile input
gets one line and an exit code, never a traceback."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from agent.wire.statedoc import Entry
from cloud import cli as cloud_cli
from cloud import rollout
from cloud.cli import main as cloud_main
from cloud.storage import Storage, open_storage

from ..ota.test_release import make_bundle

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0


class Cli:
    """``edge-agent-cloud`` on one storage: ``run(...)`` -> (exit code, stdout, stderr)."""

    def __init__(self, data: Path, spec: str | None, capsys: pytest.CaptureFixture) -> None:
        self.data, self.spec, self.capsys = data, spec, capsys

    def run(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        where = ["--data", str(self.data)] + (["--storage", self.spec] if self.spec else [])
        try:
            code = cloud_main([*argv, *where])
        except SystemExit as stop:  # argparse's usage errors (exit 64, agent/exits.py)
            code = int(stop.code or 0)
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self.run(*argv)
        assert code == 0, err
        return json.loads(out)

    def storage(self) -> Storage:
        return open_storage(self.spec or str(self.data))


@pytest.fixture(params=["sqlite", "postgresql"])
def cli(request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture) -> Cli:
    spec = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    c = Cli(tmp_path / "cloud", spec, capsys)
    assert c.run("releases", "keygen")[0] == 0
    for device in ("pump-01", "pump-02", "pump-03"):
        assert c.run("devices", "add", device)[0] == 0
    bundle = make_bundle(tmp_path / "bundle")
    assert c.run("releases", "publish", str(bundle), "--version", "1.1")[0] == 0
    return c


def desired_release(cli: Cli, device: str) -> Any:
    storage = cli.storage()
    try:
        entry = storage.desired(device).entries.get("agent/version")
    finally:
        storage.close()
    return None if entry is None else entry.value


def test_publish_list_and_assign_to_devices_and_groups(cli: Cli) -> None:
    (item,) = cli.json("releases", "list", "--json")
    sha = item["sha256"]
    assert item["version"] == "1.1" and len(sha) == 64
    if cli.spec is not None:  # PostgreSQL: in the storage, not in --data
        assert not (cli.data / "releases" / "1.1").exists()
    out = cli.json("releases", "assign", "1.1", "--device", "pump-01")
    assert out["sha256"] == sha and set(out["revs"]) == {"pump-01"}
    assert desired_release(cli, "pump-01") == {"version": "1.1", "sha256": sha}
    # a group: every member gets it, and a member added later too
    assert cli.json("groups", "add", "line-1", "pump-02")["added"] == ["pump-02"]
    out = cli.json("releases", "assign", "1.1", "--group", "line-1")
    assert out["group"] == "line-1" and set(out["revs"]) == {"pump-02"}
    assert desired_release(cli, "pump-03") is None
    out = cli.json("groups", "add", "line-1", "pump-03", "pump-02")
    assert out["added"] == ["pump-03"] and out["release"] == {"version": "1.1", "sha256": sha}
    assert desired_release(cli, "pump-03") == {"version": "1.1", "sha256": sha}
    (group,) = cli.json("groups", "list", "line-1", "--json")
    assert group == {
        "name": "line-1",
        "members": ["pump-02", "pump-03"],
        "release": {"version": "1.1", "sha256": sha},
    }
    code, out, _ = cli.run("groups", "list")
    assert code == 0 and "line-1" in out and "pump-03" in out and sha[:16] in out
    assert cli.json("groups", "remove", "line-1", "pump-03")["removed"] == ["pump-03"]
    assert desired_release(cli, "pump-03") == {"version": "1.1", "sha256": sha}  # stays


def test_devices_show_prints_the_release_history_newest_first(cli: Cli) -> None:
    cli.json("groups", "add", "line-1", "pump-01")
    cli.json("releases", "assign", "1.1", "--group", "line-1")
    storage = cli.storage()
    try:  # what the endpoint stores when the device reports (the same storage call)
        for version, value in (
            (1, {"result": "staged", "version": "1.1", "bytes": 10, "at": T0 + 10}),
            (2, {"result": "pending", "version": "1.1"}),
            (3, {"result": "rolled_back", "version": "1.1", "reason": "no READY", "at": T0 + 90}),
            (4, {"result": "rolled_back", "version": "1.1", "reason": "no READY", "at": T0 + 90}),
        ):
            storage.put_reported("pump-01", {"agent/update": Entry(version, value)}, T0 + version)
    finally:
        storage.close()
    page = cli.json("devices", "show", "pump-01", "--json")["releases"]
    assert page["groups"] == ["line-1"]
    assert page["last_update"]["result"] == "rolled_back"
    assert [(r["version"], r["result"]) for r in page["history"]] == [
        ("1.1", "rolled_back"),
        ("1.1", "pending"),
        ("1.1", "staged"),
        ("1.1", "assigned"),
    ]
    assert page["history"][0]["reason"] == "no READY"
    code, out, _ = cli.run("devices", "show", "pump-01")
    assert code == 0
    lines = out.splitlines()
    start = lines.index("releases")
    assert "rolled_back" in lines[start + 1] and "no READY" in lines[start + 1]
    assert "2023-11-14T22:14:50" in lines[start + 1]  # the device's time of the outcome
    assert "assigned" in lines[start + 4] and "group line-1" in lines[start + 4]
    assert "groups       line-1" in out
    code, out, _ = cli.run("devices", "show", "pump-02")
    assert code == 0 and "(no history)" in out


def report(cli: Cli, device: str, version: int, value: dict[str, Any]) -> None:
    """What the endpoint stores when the device reports ``agent/update``."""
    storage = cli.storage()
    try:
        storage.put_reported(device, {"agent/update": Entry(version, value)}, T0 + version)
    finally:
        storage.close()


def test_a_staged_roll_out_extends_its_set_and_stops_at_a_rollback(cli: Cli) -> None:
    fleet = [f"fan-{i:02d}" for i in range(20)]
    for device in fleet:
        assert cli.run("devices", "add", device)[0] == 0
    cli.json("groups", "add", "fans", *fleet)
    first = cli.json("releases", "assign", "1.1", "--group", "fans", "--percent", "10")
    assert len(first["revs"]) == 2 and first["percent"] == 10
    wave = set(first["revs"])
    assert sum(desired_release(cli, d) is not None for d in fleet) == 2
    (group,) = cli.json("groups", "list", "fans", "--json")
    assert group["release"] is None  # the group takes the release only at 100 %
    status = cli.json("releases", "status", "1.1", "--group", "fans", "--json")
    assert status["counts"] == {"assigned": 2, "not assigned": 18}
    report(cli, sorted(wave)[0], 1, {"result": "updated", "version": "1.1", "at": T0})
    second = cli.json("releases", "assign", "1.1", "--group", "fans", "--percent", "25")
    assert len(second["revs"]) == 5 and wave <= set(second["revs"])  # extends, never swaps
    again = cli.json("releases", "assign", "1.1", "--group", "fans", "--percent", "25")
    assert set(again["revs"]) == set(second["revs"])  # the same step again: the same devices
    # one of the wave rolls it back: the next step is refused with the device and the reason
    bad = sorted(wave)[1]
    failed = {"result": "rolled_back", "version": "1.1", "reason": "no READY", "at": T0 + 5}
    report(cli, bad, 2, failed)
    hostile = {"result": "refused", "version": "1.1", "reason": "\x1b]0;pwned\x07", "at": T0}
    report(cli, "pump-01", 3, hostile)  # not a member: its words still never reach a terminal
    storage = cli.storage()
    try:  # a reported agent/version is the device's word too
        storage.put_reported("pump-01", {"agent/version": Entry(1, "9\x1b[2J")}, T0)
    finally:
        storage.close()
    code, out, _ = cli.run("devices", "show", "pump-01")
    assert code == 0 and "\\x1b]0;pwned\\x07" in out and "\x1b" not in out
    assert "version      9\\x1b[2J" in out
    code, _, err = cli.run("releases", "assign", "1.1", "--group", "fans", "--percent", "50")
    assert code == 65 and f"{bad} rolled_back (no READY)" in err and "--force" in err
    code, _, err = cli.run("releases", "assign", "1.1", "--group", "fans")
    assert code == 65  # nor all at once
    assert sum(desired_release(cli, d) is not None for d in fleet) == 5
    code, out, _ = cli.run("releases", "status", "1.1", "--group", "fans")
    assert code == 0 and "release 1.1 in group fans: 20 device(s)" in out
    assert f"  {bad}: no READY" in out
    status = cli.json("releases", "status", "1.1", "--json")  # every device with a row
    assert status["counts"] == {"updated": 1, "assigned": 3, "refused": 1, "rolled_back": 1}
    code, out, _ = cli.run("releases", "status", "1.1")
    assert code == 0 and "pump-01: \\x1b]0;pwned\\x07" in out and "\x1b" not in out
    # the operator goes on anyway: everyone, and the group keeps the release
    done = cli.json("releases", "assign", "1.1", "--group", "fans", "--force")
    assert len(done["revs"]) == 20 and done["percent"] == 100
    assert all(desired_release(cli, d) is not None for d in fleet)
    (group,) = cli.json("groups", "list", "fans", "--json")
    assert group["release"]["version"] == "1.1"


def test_a_roll_out_through_a_running_endpoint_still_stops_at_a_rollback(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--server``: the desired write is the endpoint's PUT (here: the same storage write, as a
    running endpoint on it makes); a step that changes nothing for a device notes no assignment,
    so a device that rolled the release back keeps stopping the roll-out after a forced step."""

    async def put(server: str, device: str, changes: dict[str, Any], cred: Any) -> int:
        storage = cli.storage()
        try:
            storage.put_desired(device, changes, T0, None, 1024)
        finally:
            storage.close()
        return 0

    monkeypatch.setattr(cloud_cli, "_put_desired", put)
    cli.json("groups", "add", "line-1", "pump-01", "pump-02", "pump-03")
    (first,) = cli.json("releases", "assign", "1.1", "--group", "line-1", "--percent", "30")["revs"]
    failed = {"result": "rolled_back", "version": "1.1", "reason": "no READY", "at": T0}
    report(cli, first, 1, failed)
    step = ("releases", "assign", "1.1", "--group", "line-1", "--server", "coap://[::1]")
    assert cli.run(*step, "--percent", "60")[0] == 65
    assert len(cli.json(*step, "--percent", "60", "--force")["revs"]) == 2
    status = cli.json("releases", "status", "1.1", "--group", "line-1", "--json")
    assert status["counts"] == {"assigned": 1, "rolled_back": 1, "not assigned": 1}
    assert status["reasons"] == {first: "no READY"}
    code, _, err = cli.run(*step)
    assert code == 65 and f"{first} rolled_back (no READY)" in err


def test_staged_members_are_stable_monotone_and_differ_by_version() -> None:
    members = [f"d{i:03d}" for i in range(200)]
    sets = [set(rollout.staged(members, "2.0", p)) for p in (1, 5, 10, 50, 99, 100)]
    assert [len(s) for s in sets] == [2, 10, 20, 100, 198, 200]
    assert all(a <= b for a, b in itertools.pairwise(sets))
    assert rollout.staged(members, "2.0", 10) == rollout.staged(list(members), "2.0", 10)
    assert set(rollout.staged(members, "2.1", 10)) != sets[2]
    assert rollout.staged(["only"], "2.0", 0.5) == ["only"]  # at least one
    assert rollout.staged([], "2.0", 50) == []


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (("releases", "assign", "9.9", "--device", "pump-01"), 66, "not published"),
        (("releases", "assign", "../1.1", "--device", "pump-01"), 64, "release version"),
        (("releases", "assign", "1.1", "--device", "nobody"), 66, "not registered"),
        (("releases", "assign", "1.1", "--device", "bad id!"), 64, "not a valid device id"),
        (("releases", "assign", "1.1", "--group", "nope"), 66, "no group 'nope'"),
        (("releases", "assign", "1.1", "--group", "x" * 65), 64, "group"),
        (("releases", "assign", "1.1"), 64, "--device"),
        (("releases", "assign", "1.1", "--device", "pump-01", "--percent", "5"), 64, "--group"),
        (("releases", "assign", "1.1", "--group", "line-1", "--percent", "0"), 64, "--percent"),
        (("releases", "assign", "1.1", "--group", "line-1", "--percent", "nan"), 64, "--percent"),
        (("releases", "assign", "1.1", "--group", "line-1", "--percent", "101"), 64, "--percent"),
        (("releases", "status", "1.1", "--group", "nope"), 66, "no group 'nope'"),
        (("releases", "status", "../1.1"), 64, "release version"),
        (("groups", "add", "line-1", "nobody"), 66, "not registered"),
        (("groups", "add", "../line", "pump-01"), 64, "group"),
        (("groups", "remove", "nope", "pump-01"), 66, "no group 'nope'"),
        (("groups", "list", "nope"), 66, "no group 'nope'"),
    ],
)
def test_hostile_and_wrong_input_is_refused_with_one_line(
    cli: Cli, argv: tuple[str, ...], code: int, says: str
) -> None:
    got, _, err = cli.run(*argv)
    assert (got, says in err) == (code, True), err
    assert desired_release(cli, "pump-01") is None  # nothing assigned
    storage = cli.storage()
    try:
        assert storage.groups() == []
    finally:
        storage.close()


def test_a_bundle_that_is_not_a_release_is_refused(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "bundle.json").write_text("[1, 2")
    code, _, err = cli.run("releases", "publish", str(junk), "--version", "2.0")
    assert code == 65 and "not a wheel bundle" in err
    code, _, err = cli.run("releases", "publish", str(tmp_path / "bundle"), "--version", "a/b")
    assert code == 64 and "release version" in err
    assert [r["version"] for r in cli.json("releases", "list", "--json")] == ["1.1"]

"""The A/B switch and the boot counter (agent/ota/bootcheck.py) on a real directory: a power cut
after each step of a switch, a rollback, an adoption, leaves ``current`` on a complete release,
and the next start resolves it; a pending release that does not confirm is rolled back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ota import bootcheck as bc

pytestmark = pytest.mark.timeout(30)

BOOTCHECK = Path(bc.__file__)


def make_release(root: Path, version: str) -> None:
    rel = root / bc.RELEASES / version
    (rel / "bin").mkdir(parents=True)
    (rel / "bin" / "edge-agent").write_text(version)
    bc.mark_complete(root, version)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "opt"
    r.mkdir()
    make_release(r, "1.0")
    bc.set_link(r, bc.CURRENT, "releases/1.0")
    bc.set_link(r, bc.VENV, bc.CURRENT)
    make_release(r, "2.0")
    return r


def write_ready(data: Path, version: str) -> None:
    marker = bc.ready_marker(data, version)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(version + "\n")


def running(root: Path) -> str:
    return (root / bc.VENV / "bin" / "edge-agent").read_text()


def test_switch_confirm(root: Path) -> None:
    bc.switch(root, "2.0")
    assert running(root) == "2.0"
    assert bc.link_version(root, bc.PREVIOUS) == "1.0"
    assert bc.start(root) == "2.0"
    assert bc.confirm(root, "2.0")
    doc = bc.load(root)
    assert doc["pending"] is None
    assert doc["outcome"]["result"] == "updated"
    assert doc["outcome"]["previous"] == "1.0"
    bc.start(root)  # a confirmed release is not counted any more
    assert bc.load(root)["attempts"] == 0


def test_boot_counter_rolls_back_after_max_attempts(root: Path) -> None:
    bc.switch(root, "2.0", max_attempts=2)
    assert bc.start(root) == "2.0"
    assert bc.start(root) == "2.0"
    assert bc.load(root)["attempts"] == 2
    assert bc.start(root) == "1.0"  # the third start: two failed ones before it
    assert running(root) == "1.0"
    outcome = bc.load(root)["outcome"]
    assert outcome["result"] == "rolled_back"
    assert outcome["version"] == "2.0"
    assert outcome["restored"] == "1.0"
    assert "did not reach READY in 2 starts" in outcome["reason"]


def test_health_window_rolls_back_a_release_that_runs_but_never_confirms(
    root: Path, tmp_path: Path
) -> None:
    """Started once (READY=1 sent, say) and then never confirmed: the boot counter never sees
    another start, the health timer's periods do. Window 180 s, period 60 s: the third period
    rolls back; periods before the first start and after a rollback count nothing."""
    data = tmp_path / "data"
    bc.switch(root, "2.0", health_window=180)
    assert bc.health(root, data, 60) == "2.0"  # switched, not started yet: not counted
    assert bc.load(root)["pending_s"] == 0
    bc.start(root, data)
    assert bc.health(root, data, 60) == "2.0"
    assert bc.health(root, data, 60) == "2.0"
    assert bc.load(root)["pending_s"] == 120
    assert bc.health(root, data, 60) == "1.0"
    assert running(root) == "1.0"
    outcome = bc.load(root)["outcome"]
    assert outcome["result"] == "rolled_back" and outcome["version"] == "2.0"
    assert outcome["reason"].startswith("not READY within the health window (180 s")
    assert bc.health(root, data, 60) == "1.0"  # nothing pending any more
    assert bc.load(root)["outcome"] == outcome


def test_health_confirms_a_release_that_wrote_its_ready_marker(root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    bc.switch(root, "2.0", health_window=60)
    bc.start(root, data)
    write_ready(data, "2.0")
    assert bc.health(root, data, 600) == "2.0"  # the window is over, but READY was reached
    assert bc.load(root)["outcome"]["result"] == "updated"


def test_health_ignores_a_forged_window(root: Path, tmp_path: Path) -> None:
    """update.json is root's; a value of the wrong type falls back to the default window."""
    bc.switch(root, "2.0")
    bc.start(root)
    doc = bc.load(root)
    doc.update(health_window="0", pending_s=True)
    bc.save(root, doc)
    assert bc.health(root, None, 60) == "2.0"
    assert bc.load(root)["pending_s"] == 60


def test_health_window_waits_while_the_service_is_stopped(root: Path, tmp_path: Path) -> None:
    """An operator stops the service for a while: those periods are not the release's to prove
    itself in; running or not known (no systemd) counts."""
    bc.switch(root, "2.0", health_window=180)
    bc.start(root, tmp_path)
    assert bc.health(root, tmp_path, 60, running=True) == "2.0"
    for _ in range(2):
        assert bc.health(root, tmp_path, 60, running=False) == "2.0"
    assert (bc.load(root)["pending_s"], bc.load(root)["paused_s"]) == (60, 120)
    assert bc.health(root, tmp_path, 60, running=None) == "2.0"
    assert bc.health(root, tmp_path, 60, running=True) == "1.0"


def test_a_release_that_stops_by_itself_is_still_rolled_back(root: Path, tmp_path: Path) -> None:
    """READY=1 and then exit 0 before confirming: systemd does not restart it (Restart=on-
    failure) and the unit stays inactive. The pause lasts one window at most; then the periods
    count again and the release is rolled back after twice the window."""
    bc.switch(root, "2.0", health_window=180)
    bc.start(root, tmp_path)
    results = [bc.health(root, tmp_path, 60, running=False) for _ in range(6)]
    assert results == ["2.0"] * 5 + ["1.0"]
    assert bc.load(root)["outcome"]["result"] == "rolled_back"
    # the next pending release starts with a fresh pause allowance
    bc.switch(root, "2.0", health_window=180)
    assert bc.load(root)["paused_s"] == 0


def fake_systemctl(bin_dir: Path, state: str) -> Path:
    """A ``systemctl`` that answers ``is-active`` with ``state`` and logs every call."""
    bin_dir.mkdir(exist_ok=True)
    log = bin_dir / "calls"
    script = bin_dir / "systemctl"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n'
        f'if [ "$1" = is-active ]; then echo {state}; [ {state} = active ]; fi\n'
    )
    script.chmod(0o755)
    return log


@pytest.mark.parametrize(
    ("state", "counted"), [("active", 60), ("inactive", 0), ("failed", 60), ("bogus", 60)]
)
def test_health_command_line_asks_systemd_whether_the_service_runs(
    root: Path, tmp_path: Path, state: str, counted: int
) -> None:
    bc.switch(root, "2.0", health_window=600)
    bc.start(root)
    calls = fake_systemctl(tmp_path / "bin", state)
    cmd = [sys.executable, "-I", str(BOOTCHECK), "health", "--root", str(root)]
    cmd += ["--interval", "60", "--restart-unit", "edge-agent.service"]
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert bc.load(root)["pending_s"] == counted
    assert calls.read_text().splitlines() == ["is-active edge-agent.service"]  # no restart
    assert ("event=release_health_paused" in proc.stderr) == (counted == 0)


def test_health_command_line_restarts_nothing_without_a_rollback(root: Path) -> None:
    """The unit's command line as a process with the system's python (no systemctl is called
    unless a rollback happened; a missing systemctl is logged, never raised)."""
    bc.switch(root, "2.0", health_window=60)
    bc.start(root)
    cmd = [sys.executable, "-I", str(BOOTCHECK), "health", "--root", str(root), "--interval"]
    proc = subprocess.run([*cmd, "60"], capture_output=True, text=True, timeout=20, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "event=release_rolled_back version=2.0 restored=1.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ready_marker_confirms_at_next_start(root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    bc.switch(root, "2.0", max_attempts=1)
    bc.start(root, data)
    write_ready(data, "2.0")
    assert bc.start(root, data) == "2.0"  # READY reached: not rolled back though attempts == max
    assert bc.load(root)["outcome"]["result"] == "updated"


def test_failed_unit_rolls_back_at_once(root: Path) -> None:
    bc.switch(root, "2.0")
    bc.start(root)
    assert bc.failed(root) == "1.0"
    assert bc.load(root)["outcome"]["reason"] == "the service failed while the release was pending"


def test_switch_refuses_an_incomplete_release(root: Path) -> None:
    (root / bc.RELEASES / "3.0" / "bin").mkdir(parents=True)  # an install cut short
    with pytest.raises(bc.BootError, match="not installed completely"):
        bc.switch(root, "3.0")
    assert running(root) == "1.0"


class Cut(Exception):
    """The power cut, raised in place of the Nth durable step."""


def steps_with_cut(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Let ``n`` durable steps (state writes and link renames) happen, then cut."""
    count = {"n": 0}
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if count["n"] >= n:
            raise Cut(f"cut before step {n + 1} ({dst})")
        count["n"] += 1
        real_replace(src, dst)

    monkeypatch.setattr(bc.os, "replace", replace)


@pytest.mark.parametrize("cut_after", range(5))
def test_power_cut_during_switch(
    root: Path, monkeypatch: pytest.MonkeyPatch, cut_after: int
) -> None:
    # the switch's durable steps: state "switching", previous, current, state "switched"
    with monkeypatch.context() as m:
        steps_with_cut(m, cut_after)
        try:
            bc.switch(root, "2.0")
        except Cut:
            pass
    # whatever the cut left, current is a complete release and the agent can start
    assert bc.is_complete(root, bc.link_version(root, bc.CURRENT) or "")
    version = bc.start(root)
    assert running(root) == version
    doc = bc.load(root)
    if cut_after <= 2:  # current had not moved: the switch is forgotten, 1.0 runs
        assert version == "1.0"
        if cut_after >= 1:
            assert doc["outcome"]["result"] == "aborted"
    else:  # current moved: 2.0 runs, pending, counted
        assert version == "2.0"
        assert doc["pending"] == "2.0" and doc["attempts"] == 1


@pytest.mark.parametrize("cut_after", range(3))
def test_power_cut_during_rollback(
    root: Path, monkeypatch: pytest.MonkeyPatch, cut_after: int
) -> None:
    bc.switch(root, "2.0", max_attempts=1)
    bc.start(root)
    with monkeypatch.context() as m:
        steps_with_cut(m, cut_after)
        try:
            bc.rollback(root, "test")
        except Cut:
            pass
    assert bc.is_complete(root, bc.link_version(root, bc.CURRENT) or "")
    assert bc.start(root) == "1.0"  # the next start finishes the rollback
    assert running(root) == "1.0"
    assert bc.load(root)["outcome"]["result"] == "rolled_back"


@pytest.mark.parametrize("cut_after", range(3))
def test_power_cut_during_adoption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_after: int
) -> None:
    """The first install's plain venv becomes a release; a cut leaves a runnable ``venv``."""
    root = tmp_path / "opt"
    (root / bc.VENV / "bin").mkdir(parents=True)
    (root / bc.VENV / "bin" / "edge-agent").write_text("initial")
    with monkeypatch.context() as m:
        steps_with_cut(m, cut_after)
        try:
            bc.adopt(root, "initial")
        except Cut:
            pass
    bc.start(root)
    assert running(root) == "initial"
    assert (root / bc.VENV).is_symlink()


def test_script_runs_with_the_system_python_alone(root: Path, tmp_path: Path) -> None:
    """ExecStartPre runs the file with ``python3 -I``: no venv, no agent package."""
    bc.switch(root, "2.0", max_attempts=1)
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    for expected in ("2.0", "1.0"):
        subprocess.run(
            [python, "-I", str(BOOTCHECK), "start", "--root", str(root)],
            check=True,
            cwd=tmp_path,
            timeout=20,
        )
        assert running(root) == expected
    status = subprocess.run(
        [python, "-I", str(BOOTCHECK), "status", "--root", str(root)],
        check=True,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert json.loads(status.stdout)["outcome"]["result"] == "rolled_back"


def _edit_state(root: Path, **fields: object) -> None:
    doc = bc.load(root)
    doc.update(fields)
    (root / bc.STATE_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize("attempts", ["x", 1e999, -4, True, [1]])
def test_a_damaged_attempt_count_still_counts_and_rolls_back(root: Path, attempts: object) -> None:
    """Was a ValueError or OverflowError at every start ("x", 1e999): the start was never counted
    and a release that never reached READY was never rolled back by the counter."""
    bc.switch(root, "2.0", max_attempts=2)
    _edit_state(root, attempts=attempts)
    assert bc.start(root) == "2.0"
    assert bc.load(root)["attempts"] == 1  # counted again from 0
    bc.start(root)
    assert bc.start(root) == "1.0"
    assert bc.load(root)["outcome"]["result"] == "rolled_back"


@pytest.mark.parametrize("outcome", ["x", [1], None])
def test_an_interrupted_rollback_with_a_damaged_outcome_is_finished(
    root: Path, outcome: object
) -> None:
    """Was an AttributeError in start and in failed (OnFailure could not roll back)."""
    bc.switch(root, "2.0")
    _edit_state(root, step="rolling_back", outcome=outcome)
    assert bc.start(root) == "1.0"
    assert bc.load(root)["outcome"]["reason"] == "interrupted rollback"


@pytest.mark.parametrize("pending", ["../../etc", ["2.0"], 2.0, ""])
def test_a_pending_version_that_is_not_a_release_name_is_not_pending(
    root: Path, pending: object
) -> None:
    bc.switch(root, "2.0")
    bc.confirm(root, "2.0")
    _edit_state(root, pending=pending, step="switched", attempts=9, **{"from": "../../x"})
    assert bc.start(root) == "2.0" and bc.failed(root) == "2.0"
    assert running(root) == "2.0"


@pytest.mark.parametrize(
    "text", [b"[" * 5000 + b"]" * 5000, b'{"pending": "2.0", "att', b"\xff", b"[]"]
)
def test_an_unreadable_state_file_is_said_and_written_anew(
    root: Path, text: bytes, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bc, "_SAID", set())  # said once per process: this test's own
    bc.switch(root, "2.0")
    (root / bc.STATE_FILE).write_bytes(text)
    assert bc.start(root) == "2.0"  # nothing pending is known: the current release runs
    assert "event=update_state_unreadable" in capsys.readouterr().err
    bc.rollback(root, "by the operator")
    assert bc.load(root)["outcome"]["result"] == "rolled_back"  # written anew
    assert running(root) == "1.0"


def test_an_unreadable_state_file_is_said_once_per_process(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent reads update.json at every report of its state: one line, not one a tick."""
    monkeypatch.setattr(bc, "_SAID", set())
    (root / bc.STATE_FILE).write_bytes(b"{torn")
    for _ in range(5):
        bc.load(root)
    assert capsys.readouterr().err.count("event=update_state_unreadable") == 1


# -- READY markers count for their own switch only -------------------------------------------


def confirmed_once_then_back(root: Path, data: Path) -> None:
    """2.0 ran and reached READY (its marker written by the agent), then 1.0 was switched back
    to and confirmed: ``DATA/ota/ready-2.0`` of that earlier switch is still on disk."""
    from agent.ota.updater import mark_ready

    bc.switch(root, "2.0", data_dir=data)
    bc.start(root, data)
    assert mark_ready(root, data, "2.0")
    bc.switch(root, "1.0", data_dir=data)
    bc.start(root, data)
    assert mark_ready(root, data, "1.0")


@pytest.mark.parametrize("check", ["start", "failed", "health"])
def test_attack_stale_ready_marker_never_confirms_a_new_switch(
    root: Path, tmp_path: Path, check: str
) -> None:
    """Was: switching again to a release that once reached READY confirmed it at its first
    ExecStartPre, before it ran, so the boot counter, OnFailure and the health window never
    rolled it back. Here the stale marker is put back after the switch (a copy restored from
    a backup, or a switch by an earlier release's helper, which did not remove it): it names
    the earlier switch and confirms nothing."""
    data = tmp_path / "data"
    confirmed_once_then_back(root, data)
    stale = bc.ready_marker(data, "2.0").read_bytes()
    bc.switch(root, "2.0", max_attempts=1, health_window=60, data_dir=data)
    assert not bc.ready_marker(data, "2.0").exists()  # the switch removed it
    bc.ready_marker(data, "2.0").write_bytes(stale)
    if check == "start":
        assert bc.start(root, data) == "2.0"
        assert bc.load(root)["pending"] == "2.0" and bc.load(root)["attempts"] == 1
        assert bc.start(root, data) == "1.0"  # the counter runs: rolled back
    elif check == "failed":
        bc.start(root, data)
        assert bc.failed(root, data) == "1.0"
    else:
        bc.start(root, data)
        assert bc.health(root, data, 60) == "1.0"
    assert bc.load(root)["outcome"]["result"] == "rolled_back"
    assert running(root) == "1.0"


def test_the_switch_removes_the_marker_of_an_earlier_release_agent(
    root: Path, tmp_path: Path
) -> None:
    """An earlier release's agent writes only the version into its marker (no switch id), so
    such a marker cannot be told from a fresh one: the switch removes it first."""
    data = tmp_path / "data"
    write_ready(data, "2.0")  # left from an earlier switch to 2.0
    bc.switch(root, "2.0", max_attempts=1, data_dir=data)
    assert bc.start(root, data) == "2.0"
    assert bc.load(root)["pending"] == "2.0"
    write_ready(data, "2.0")  # now that agent reaches READY in this switch: it counts
    assert bc.start(root, data) == "2.0"
    assert bc.load(root)["outcome"]["result"] == "updated"


def test_a_marker_of_this_switch_confirms(root: Path, tmp_path: Path) -> None:
    from agent.ota.updater import mark_ready

    data = tmp_path / "data"
    bc.switch(root, "2.0", data_dir=data)
    bc.start(root, data)
    doc = bc.load(root)
    bc.ready_marker(data, "2.0").parent.mkdir(parents=True, exist_ok=True)
    # the agent cannot write the release root (its sandbox): only the marker is written
    bc.ready_marker(data, "2.0").write_text(bc.marker_text("2.0", bc.switch_id(doc)))
    assert bc.failed(root, data) == "2.0"  # READY in this switch: confirmed, not rolled back
    assert bc.load(root)["outcome"]["result"] == "updated"
    assert mark_ready(root, data, "2.0") is False  # nothing pending any more
    assert bc.ready_marker(data, "2.0").read_text() == "2.0\n"


def test_attack_a_marker_that_is_a_link_confirms_nothing(root: Path, tmp_path: Path) -> None:
    """The data directory is the unprivileged agent's; root reads the marker without following
    a link (to a FIFO or /dev/zero, say)."""
    data = tmp_path / "data"
    (data / bc.READY_DIR).mkdir(parents=True)
    os.mkfifo(tmp_path / "fifo")
    bc.switch(root, "2.0", max_attempts=1, data_dir=data)
    bc.ready_marker(data, "2.0").symlink_to(tmp_path / "fifo")
    assert bc.start(root, data) == "2.0"
    assert bc.start(root, data) == "1.0"


@pytest.mark.parametrize("cut_after", range(5))
def test_power_cut_during_a_switch_back_never_confirms_by_a_stale_marker(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_after: int
) -> None:
    data = tmp_path / "data"
    confirmed_once_then_back(root, data)
    write_ready(data, "2.0")  # a marker of an earlier release's agent, without a switch id
    with monkeypatch.context() as m:
        steps_with_cut(m, cut_after)
        try:
            bc.switch(root, "2.0", data_dir=data)
        except Cut:
            pass
    version = bc.start(root, data)
    doc = bc.load(root)
    if version == "2.0":  # current moved: counted, not confirmed
        assert doc["pending"] == "2.0" and doc["attempts"] == 1
        assert bc.failed(root, data) == "1.0"
    else:  # current had not moved: 1.0 runs on, and 2.0 was not confirmed
        assert doc["pending"] is None
        assert (doc["outcome"]["version"], doc["outcome"]["result"]) != ("2.0", "updated")


def test_releases_switched_away_from_do_not_pile_up(root: Path, tmp_path: Path) -> None:
    """Each update installs a whole release (a venv and its bundle: ~200 MB with numpy and
    LiteRT); one that neither ``current`` nor ``previous`` names any more is removed, with its
    READY marker, so the release root holds two releases however many updates the device took."""
    data = tmp_path / "data"
    for n in range(2, 12):
        version = f"{n}.0"
        if n > 2:
            make_release(root, version)
        bc.switch(root, version, data_dir=data)
        write_ready(data, version)
        assert bc.start(root, data) == version
        assert bc.load(root)["outcome"]["result"] == "updated"
    assert sorted(p.name for p in (root / bc.RELEASES).iterdir()) == ["10.0", "11.0"]
    assert sorted(p.name for p in (data / bc.READY_DIR).iterdir()) == ["ready-10.0", "ready-11.0"]
    assert bc.link_version(root, bc.PREVIOUS) == "10.0"
    assert bc.rollback(root, "test") == "10.0"  # previous still there to go back to
    assert running(root) == "10.0"


def test_a_rolled_back_release_is_removed_by_the_next_switch(root: Path) -> None:
    bc.switch(root, "2.0")
    assert bc.failed(root) == "1.0"  # 2.0 rolled back: current and previous both name 1.0
    make_release(root, "3.0")
    bc.switch(root, "3.0")
    assert sorted(p.name for p in (root / bc.RELEASES).iterdir()) == ["1.0", "3.0"]

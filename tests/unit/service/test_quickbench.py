"""``edge-agent bench --quick`` (agent/service/quickbench.py) in this process, with its counts
shortened: the real Store on real files, the shipped models in the real interpreter, the real
codec on the pump rig's channels; where it ran and on which filesystem; the document it saves and
``edge-agent plan`` citing it. No timing assertions: only that each figure was measured.
(tests/e2e/test_quickbench.py runs the same from an installed wheel.)"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.service import cli, quickbench
from agent.service.quickbench import QuickSettings, filesystem_type, format_report, run_quick

pytestmark = pytest.mark.timeout(120)

PROFILE = """
[workload]
daily_inferences = 86400
latency_requirement_ms = 100
low_confidence_share = 0.05
channels_per_record = 8

[prices]
cloud_per_inference = 0.00001
per_mb = 0.5

[link]
rtt_ms = 40
encoding = "low"
"""


@pytest.fixture
def short(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts a tenth of the device's: the same code, in about a second."""
    for name, value in {
        "FSYNC_MAX": 20,
        "STORE_ROUNDS": 2,
        "STORE_BATCH1_MAX": 10,
        "STORE_BATCH100_MAX": 3,
        "INVOKES": 50,
        "DETECT_ALERTS": 3,
        "CODEC_SECONDS": 60,
    }.items():
        monkeypatch.setattr(quickbench, name, value)


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
50 27 0:40 / /qb-root/data rw,relatime - tmpfs tmpfs rw
51 27 0:41 / /qb-root/my\\040disk rw,relatime - vfat /dev/sda1 rw
52 27 0:42 / /qb-root/data rw,relatime - ramfs none rw
"""


def test_filesystem_type_is_the_mounts_that_holds_the_path() -> None:
    assert filesystem_type(Path("/qb-root/data/x/y"), MOUNTINFO) == "ramfs"  # mounted last
    assert filesystem_type(Path("/qb-root/datax"), MOUNTINFO) == "ext4"  # not under /qb-root/data
    assert filesystem_type(Path("/qb-root/my disk/f"), MOUNTINFO) == "vfat"  # \040 is a space
    assert filesystem_type(Path("/etc"), "garbage\n\n") == "unknown"
    assert filesystem_type(Path("/dev/shm")) == "tmpfs"
    assert filesystem_type(Path("/proc/self")) == "proc"


def test_quick_bench_saves_what_plan_then_cites(
    tmp_path: Path, short: None, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert cli.main(["bench", "--quick", "--json", "--data-dir", str(data)]) == cli.EX_OK
    printed = json.loads(capsys.readouterr().out)
    saved = data / "bench" / "quick.json"
    assert printed.pop("saved") == str(saved)
    doc = json.loads(saved.read_text())
    assert doc == printed
    assert saved.stat().st_mode & 0o777 == 0o644
    # where it ran: a directory of its own in the data directory, gone afterwards
    run_dir = Path(doc["dir"])
    assert run_dir.parent == data.resolve() and run_dir.name.startswith("bench-quick-")
    assert not run_dir.exists()
    assert sorted(p.name for p in data.iterdir()) == ["bench"]
    assert doc["fs_type"] == filesystem_type(data) and doc["fs_type"] != "unknown"
    assert doc["no_fsync"] is (doc["fs_type"] in ("tmpfs", "ramfs"))
    assert doc["bench"] == "quick" and doc["format"] == 1 and doc["finished"].endswith("+00:00")

    s = doc["summary"]
    assert 1 <= s["fsync"]["count"] <= 20 and s["fsync"]["per_s"] > 0
    st = s["store"]
    assert st["durability"] == "full"  # no --config: the default
    assert st["puts_batch1"] <= 2 * 10
    for key in ("puts_per_s_batch1", "puts_per_s_batch100", "baseline_sqlite_puts_per_s_batch1"):
        assert st[key] > 0, key
    inf = s["inference"]
    assert (inf["model"], inf["count"]) == ("skab-ae", 50)
    assert inf["latency_p99_us"] >= inf["latency_p50_us"] > 0
    assert inf["baseline_invoke_p50_us"] > 0
    assert s["detect"]["alerts"] == 3 and s["detect"]["latency_p99_ms"] > 0
    codec = s["codec"]
    assert codec["seconds"] == 60 and codec["readings"] > codec["records"] > 0
    per = codec["bytes_per_reading"]
    assert set(per) == {"high", "medium", "low", "compact"}
    # sizes, not speeds: every compact level is smaller than SenML-CBOR, and all than JSON
    assert max(per["medium"], per["low"], per["compact"]) < per["high"]
    assert per["high"] < codec["baseline_json_bytes_per_reading"]

    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    argv = ["plan", "--profile", str(profile), "--data-dir", str(data)]
    assert cli.main([*argv, "--json"]) == cli.EX_OK
    plan = json.loads(capsys.readouterr().out)
    here = f"measured on this device {doc['finished']}: bench --quick"
    edge = plan["inputs"]["edge_latency_p99_ms"]
    assert edge == {
        "value": s["detect"]["latency_p99_ms"],
        "source": f"{here} detect.latency_p99_ms",
    }
    assert plan["inputs"]["bytes_per_record"] == {
        "value": per["low"] * 8,
        "source": f"{here} codec.bytes_per_reading.low x 8",
    }
    assert plan["inputs"]["store_puts_per_s_batch1"]["value"] == st["puts_per_s_batch1"]
    assert plan["inputs"]["cloud_inference_ms"]["source"].startswith("bundled: build machine")
    assert cli.main(argv) == cli.EX_OK
    text = capsys.readouterr().out
    assert f"measured on this device: {saved}" in text and f"({here} detect.latency_p99_ms)" in text


@pytest.fixture
def shm() -> Iterator[Path]:
    if filesystem_type(Path("/dev/shm")) != "tmpfs":
        pytest.fail("/dev/shm is not tmpfs here: this test needs a tmpfs directory")
    d = Path(tempfile.mkdtemp(prefix="edge-agent-test-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_quick_bench_on_tmpfs_says_durable_involves_no_fsync(shm: Path, short: None) -> None:
    doc = run_quick(QuickSettings(where=shm, single_cpu=False))
    assert (doc["fs_type"], doc["no_fsync"], doc["cpu"]) == ("tmpfs", True, "any CPU")
    text = format_report(doc)
    assert "tmpfs: durable here involves no fsync" in text
    assert f"ran in {doc['dir']} (tmpfs; removed afterwards)" in text
    assert list(shm.iterdir()) == []


def test_quick_bench_pins_as_the_agent_does_and_gives_the_cpus_back(
    tmp_path: Path, short: None
) -> None:
    before = os.sched_getaffinity(0)
    doc = run_quick(QuickSettings(where=tmp_path))
    assert os.sched_getaffinity(0) == before
    if len(before) > 1:
        assert doc["cpu"] == f"pinned to CPU {max(before)}"


def test_bench_without_quick_or_with_an_unusable_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench"]) == cli.EX_USAGE
    assert "give --quick" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = cli.main(["bench", "--quick", "--data-dir", str(blocker)])
    err = capsys.readouterr().err.strip()
    assert code != cli.EX_OK and "\n" not in err
    assert err.startswith(f"edge-agent bench: bench results directory {blocker}/bench: ")
    assert "--data-dir DIR" in err


def test_save_as_root_gives_the_files_the_data_dirs_owner(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if os.geteuid() == 0:
        os.chown(data, 4242, 4343)  # the agent's user owns its data directory
    path = quickbench.save({"summary": {}}, data)
    want = (4242, 4343) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    for p in (path.parent, path):
        assert (p.stat().st_uid, p.stat().st_gid) == want, p


# -- hostile: the agent's user owns the data directory and may be compromised ------------------
# `tools/flash ... --bench` runs `edge-agent bench --quick --data-dir /var/lib/edge-agent` as
# root. The agent's moves are made directly by this process (as root in CI, for uid 4242): what
# matters is that the bench, as root, does not follow them.
AGENT = (4242, 4343) if os.geteuid() == 0 else (os.geteuid(), os.getegid())


def _meta(p: Path) -> tuple[int, int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def test_save_refuses_a_bench_symlink_the_agent_planted(tmp_path: Path) -> None:
    """Attack: DATA/bench a symlink to /opt/edge-agent, whose ota-bootcheck.py root runs at
    boot (was: root chowned /opt/edge-agent to the agent's user and wrote quick.json there)."""
    opt = tmp_path / "opt-edge-agent"
    opt.mkdir(mode=0o755)
    boot = opt / "ota-bootcheck.py"
    boot.write_text("print('boot')\n")
    boot.chmod(0o755)
    before = (_meta(opt), _meta(boot), boot.read_text())
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, *AGENT)
    (data / "bench").symlink_to(opt)
    with pytest.raises(AgentError, match=f"^bench: {data}/bench is a symlink: not followed; "):
        quickbench.save({"summary": {}}, data)
    assert (_meta(opt), _meta(boot), boot.read_text()) == before
    assert sorted(p.name for p in opt.iterdir()) == ["ota-bootcheck.py"]


def test_save_refuses_a_bench_entry_that_is_not_a_directory_of_the_owner_or_root(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, *AGENT)
    os.mkfifo(data / "bench")  # its open must not block
    with pytest.raises(AgentError, match=f"^bench: {data}/bench is not a directory; "):
        quickbench.save({"summary": {}}, data)
    if os.geteuid() == 0:  # a directory of a third user (root can make one; the agent cannot)
        (data / "bench").unlink()
        (data / "bench").mkdir()
        os.chown(data / "bench", 4545, 4545)
        with pytest.raises(AgentError, match="belongs to uid 4545, not to root or the data"):
            quickbench.save({"summary": {}}, data)
        assert list((data / "bench").iterdir()) == []


def test_save_as_root_into_a_bench_directory_root_made(tmp_path: Path) -> None:
    """`edge-agent bench` as root makes DATA/bench (its writable check) before the run: the
    directory and the file end up the data directory's owner's, mode 0755 and 0644."""
    data = tmp_path / "data"
    (data / "bench").mkdir(parents=True)
    os.chown(data, *AGENT)
    path = quickbench.save({"summary": {"a": 1}}, data)
    assert json.loads(path.read_text()) == {"summary": {"a": 1}}
    assert _meta(path.parent) == (*AGENT, 0o755) and _meta(path) == (*AGENT, 0o644)
    assert sorted(p.name for p in path.parent.iterdir()) == ["quick.json"]


def test_run_as_root_stays_out_of_a_directory_another_user_can_change(
    tmp_path: Path, short: None
) -> None:
    """As root, in the agent's data directory, the run's directory (whose files SQLite opens by
    name) is made in the nearest directory above it that only root can change, on the same
    filesystem: the agent's user cannot swap it for a link. As that user: in the directory."""
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, *AGENT)
    doc = run_quick(QuickSettings(where=data, single_cpu=False))
    run_dir = Path(doc["dir"])
    if os.geteuid() == 0:
        assert run_dir.parent == tmp_path.resolve()
        assert quickbench.only_root_changes(run_dir.parent)
        assert not quickbench.only_root_changes(data.resolve())
    else:
        assert run_dir.parent == data
    assert not run_dir.exists() and list(data.iterdir()) == []
    assert doc["fs_type"] == filesystem_type(data) and doc["summary"]["store"]["puts_batch1"] > 0


def test_the_command_refuses_a_planted_bench_link_before_measuring_and_writes_nothing_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edge-agent bench --quick` checks DATA/bench before the run, by descriptor (was: its
    writable check made and removed a probe file at the link's target, as root, then ran the
    whole bench before the save refused)."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, *AGENT)
    (data / "bench").symlink_to(target)
    made: list[str] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_CREAT:
            made.append(os.path.join(str(kwargs.get("dir_fd", "")), str(path)))
        return real_open(path, flags, *args, **kwargs)

    def measured(*_a: object, **_k: object) -> dict[str, object]:
        raise AssertionError("the bench ran before the results directory was checked")

    monkeypatch.setattr(quickbench, "run_quick", measured)
    monkeypatch.setattr(os, "open", spy)
    code = cli.main(["bench", "--quick", "--data-dir", str(data)])
    assert code != cli.EX_OK
    assert "is a symlink: not followed" in capsys.readouterr().err
    assert list(target.iterdir()) == [] and made == []

"""The log ring on disk (agent/service/logring.py): lines survive a restart and a SIGKILL of the
process, the files stay within the ring's bytes, torn and hostile files are read as far as they
are whole, and a disk that fails stops only the writing (the ring goes on in memory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.service.logring import (
    LINE_MAX,
    PERSIST_RETRY,
    SEGMENTS,
    LogRing,
    LogSettings,
    parse_segment,
)

pytestmark = pytest.mark.timeout(60)


def test_lines_come_back_after_a_restart_in_order(tmp_path: Path) -> None:
    ring = LogRing(LogSettings(ring_lines=100, ring_bytes=8192), tmp_path / "logs")
    for i in range(10):
        ring.add(1000.0 + i, f"event=x n={i}")
    ring.close()
    again = LogRing(LogSettings(ring_lines=100, ring_bytes=8192), tmp_path / "logs")
    assert again.since(None) == [(1000.0 + i, f"event=x n={i}") for i in range(10)]
    assert again.since(1005.0) == [(1000.0 + i, f"event=x n={i}") for i in range(5, 10)]
    again.add(2000.0, "event=after")  # appended after what was read back
    again.close()
    third = LogRing(LogSettings(ring_lines=100, ring_bytes=8192), tmp_path / "logs")
    assert third.since(1999.0) == [(2000.0, "event=after")]
    assert len(third) == 11
    third.close()


def test_the_files_stay_within_the_ring_and_keep_the_newest(tmp_path: Path) -> None:
    settings = LogSettings(ring_lines=1_000_000, ring_bytes=8192)
    ring = LogRing(settings, tmp_path)
    for i in range(5000):
        ring.add(float(i), f"event=line n={i:05d} " + "x" * 40)
    on_disk = sum((tmp_path / name).stat().st_size for name in SEGMENTS)
    # two segments of at most half the ring each (a segment's limit is at least one long line)
    assert on_disk <= 2 * max(LINE_MAX + 64, settings.ring_bytes // 2)
    ring.close()
    back = LogRing(settings, tmp_path)
    lines = back.since(None)
    assert lines[-1] == (4999.0, "event=line n=04999 " + "x" * 40)
    times = [t for t, _ in lines]
    assert times == sorted(times) and times == list(range(int(times[0]), 5000))  # no gap
    back.close()


def test_lines_stamped_1970_before_ntp_are_the_newest_after_a_restart(tmp_path: Path) -> None:
    """A Raspberry Pi without a real-time clock reboots: the agent's lines are stamped 1970 until
    NTP sets the clock, and it is restarted (a crash) before that. Before: the segments were
    ordered by the time of their last line, so the older (full) segment counted as the newer
    one, the next line rotated into the real newer one and truncated it: the lines before the
    crash (and the last ones before the reboot) were lost, and the ring's order was wrong."""
    settings = LogSettings(ring_lines=1000, ring_bytes=8192)  # segments of 4 KiB
    now = 1_796_600_000.0
    ring = LogRing(settings, tmp_path)
    for i in range(60):  # fills the first segment and part of the second
        ring.add(now + i, f"event=before_reboot n={i:02d} " + "x" * 40)
    ring.close()
    booted = LogRing(settings, tmp_path)  # the clock reads 1970
    for i in range(5):
        booted.add(10.0 + i, f"event=crash n={i}")
    booted.close()
    again = LogRing(settings, tmp_path)  # restarted, the clock still at 1970
    assert [line for _, line in again.since(None)][-5:] == [f"event=crash n={i}" for i in range(5)]
    again.add(20.0, "event=after_restart " + "y" * 1500)  # more than the older segment has left
    again.close()
    lines = [line for _, line in LogRing(settings, tmp_path).since(None)]
    assert [x for x in lines if x.startswith("event=crash")] == [
        f"event=crash n={i}" for i in range(5)
    ]
    assert lines[-1].startswith("event=after_restart")
    assert "event=before_reboot n=59 " + "x" * 40 in lines


def test_torn_and_hostile_segments_are_read_as_far_as_they_are_whole(tmp_path: Path) -> None:
    (tmp_path / SEGMENTS[0]).write_bytes(
        b"10.0\tevent=a\n"
        b"nan\tevent=nan\n"
        b"inf\tevent=inf\n"
        b"no tab here\n"
        b"11.0\t" + b"y" * (LINE_MAX + 1) + b"\n"
        b"\xff\xfe\tevent=bad-bytes\n"
        b"12.0\tevent=b \xff\n"
        b"13.0\tevent=torn"  # no newline: cut by a power failure
    )
    assert parse_segment((tmp_path / SEGMENTS[0]).read_bytes()) == [
        (10.0, "event=a"),
        (12.0, "event=b \ufffd"),
    ]
    # a segment far larger than this ring keeps: only its tail is read, from a whole line on
    big = b"".join(b"%d.0\tevent=big n=%d\n" % (100 + i, i) for i in range(200_000))
    (tmp_path / SEGMENTS[1]).write_bytes(big)
    ring = LogRing(LogSettings(ring_lines=1000, ring_bytes=4096), tmp_path)
    lines = ring.since(None)
    assert lines[0] == (10.0, "event=a")  # the older segment first
    assert lines[-1] == (200_099.0, "event=big n=199999")
    assert all(text.startswith("event=") for _, text in lines)
    ring.close()


def test_a_line_torn_by_a_power_cut_does_not_swallow_the_next_start_s_first_line(
    tmp_path: Path,
) -> None:
    """The torn tail is skipped when read back, and the segment is appended to after it: the
    first line of the next run must not be glued to it (one garbled line, its own lost)."""
    (tmp_path / SEGMENTS[0]).write_bytes(b"#gen 1\n10.0\tevent=a\n11.0\tevent=tor")
    ring = LogRing(LogSettings(ring_lines=100, ring_bytes=8192), tmp_path)
    assert ring.since(None) == [(10.0, "event=a")]
    ring.add(20.0, "event=started")
    ring.close()
    back = LogRing(LogSettings(ring_lines=100, ring_bytes=8192), tmp_path)
    assert back.since(None) == [(10.0, "event=a"), (20.0, "event=started")]
    back.close()


def test_a_failing_disk_stops_only_the_writing_and_it_is_tried_again(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the directory should be")
    ring = LogRing(LogSettings(ring_lines=10_000, ring_bytes=1 << 20), blocker)
    assert ring.persist_error is not None
    ring.add(1.0, "event=kept-in-memory")
    assert ring.since(None) == [(1.0, "event=kept-in-memory")]
    blocker.unlink()  # the disk is fine again
    for i in range(PERSIST_RETRY):
        ring.add(2.0 + i, f"event=n{i}")
    assert ring.persist_error is None
    ring.close()
    back = LogRing(LogSettings(ring_lines=10_000, ring_bytes=1 << 20), blocker)
    assert back.since(None)[-1] == (2.0 + PERSIST_RETRY - 1, f"event=n{PERSIST_RETRY - 1}")
    back.close()


def test_lines_logged_before_a_sigkill_are_there_after_it(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import logging, os, signal, sys
        from pathlib import Path
        from agent.service.logring import LogRing
        ring = LogRing(directory=Path({str(tmp_path)!r}))
        logging.getLogger().addHandler(ring)
        logging.getLogger().setLevel(logging.INFO)
        for i in range(50):
            logging.getLogger("agent.test").info("event=before_kill n=%d", i)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=30,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    ring = LogRing(directory=tmp_path)
    lines = [text for _, text in ring.since(None)]
    assert len(lines) == 50
    assert lines[-1].endswith("level=INFO logger=agent.test event=before_kill n=49")
    ring.close()

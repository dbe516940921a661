"""Bench of flash wear: what the agent writes to its storage per day on the reference rig.

An SD card or eMMC wears out by the bytes written to it, and a small synced write costs a whole
page (a commit rewrites whole 4 KiB pages of SQLite's WAL and syncs it). One run starts the
agent as the footprint bench does (``edge-agent run`` on the simulated reference rig, eight
sensors, the detector, an OSCORE uplink to a local endpoint) at real time (``--time-scale 1``,
so commits come at the rig's own pace), twice in a row: with the default ``[store]
commit_window`` (readings gather for 1 s before one commit) and with ``commit_window = 0`` (each
reading committed as it comes, as the agent did before). For each, over ``--seconds`` after
READY=1:

- ``bytes_per_day``: the agent process's ``write_bytes`` (/proc/PID/io: bytes it caused to be
  sent to the block device, the WAL, checkpoints, the side files and metrics), per second of rig
  time, times 86,400. Not counted: the filesystem's own journal (written by the kernel's jbd2
  thread) and the wear-levelling inside the card, both of which grow with the number of syncs;
- ``write_calls_per_s``: its write system calls (``syscw``) per second;
- the records the endpoint stored (the uplink ran in both).

The ratio ``bytes_per_day`` windowed / each-reading is the change's figure; the absolute figures
depend on the filesystem (ext4 here; the run names it) and the rig's rates.
"""

from __future__ import annotations

import argparse
import time

from benches import Result, workdir
from benches.footprint import _stored, exited_early, rig_agent
from cloud.storage import DB_NAME

MEASURES = (
    "bytes the agent writes to its storage per day on the reference rig at real time, with the "
    "1 s commit window and with each reading committed alone"
)
BASELINE = "the same agent with [store] commit_window = 0 (each reading its own commit), same run"

DAY = 86_400.0


def _io(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/io", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = int(value)
    return out


def _measure(wd_path, name: str, seconds: float, extra: str) -> dict[str, float]:
    path = wd_path / name
    path.mkdir()
    with rig_agent(path, 1.0, extra) as agent:
        proc = agent.proc
        time.sleep(min(5.0, seconds / 4))  # past the start's own writes (schema, calibration)
        if proc.poll() is not None:
            raise exited_early(proc)
        before, t0 = _io(proc.pid), time.perf_counter()
        time.sleep(seconds)
        if proc.poll() is not None:
            raise exited_early(proc)
        after, elapsed = _io(proc.pid), time.perf_counter() - t0
    written = after["write_bytes"] - before["write_bytes"]
    return {
        "bytes_per_day": written / elapsed * DAY,
        "write_calls_per_s": (after["syscw"] - before["syscw"]) / elapsed,
        "seconds": elapsed,
        "records_stored": _stored(agent.cloud_dir / DB_NAME),
    }


def run(args: argparse.Namespace) -> Result:
    parser = argparse.ArgumentParser(prog="bench wear")
    parser.add_argument("--dir", help=argparse.SUPPRESS)  # bench.py's, passed on: workdir()
    parser.add_argument("--seconds", type=float, default=20.0 if args.quick else 60.0)
    opts = parser.parse_args(args.extra)
    result = Result()
    with workdir(args, "wear") as wd:
        windowed = _measure(wd.path, "window", opts.seconds, "")
        each = _measure(wd.path, "each", opts.seconds, "\n[store]\ncommit_window = 0\n")
    ratio = windowed["bytes_per_day"] / each["bytes_per_day"] if each["bytes_per_day"] else 0.0
    for label, m in (("commit_window 1 s (default)", windowed), ("each reading alone", each)):
        result.add(
            f"bytes written per day, {label}",
            f"{m['bytes_per_day'] / 1e9:.2f} GB",
            f"{m['write_calls_per_s']:.1f} write calls/s over {m['seconds']:.0f} s; "
            f"{m['records_stored']} records stored by the endpoint",
        )
    result.add("ratio windowed / each reading alone", f"{ratio:.3f}", "lower wears less")
    if wd.no_fsync:
        result.notes.append("the figures are a RAM filesystem's: nothing reaches a device")
    result.summary = {
        "bytes_per_day": round(windowed["bytes_per_day"]),
        "bytes_per_day_each_reading": round(each["bytes_per_day"]),
        "ratio_to_each_reading": round(ratio, 3),
        "write_calls_per_s": round(windowed["write_calls_per_s"], 2),
        "write_calls_per_s_each_reading": round(each["write_calls_per_s"], 2),
        "records_stored": windowed["records_stored"],
        "records_stored_each_reading": each["records_stored"],
        "seconds": opts.seconds,
    }
    return wd.stamp(result)

"""``python -m tools.powercut MOUNTPOINT BACKING``: mount the power-cut filesystem by hand.

Signals to this process (its pid is printed at start):

- ``kill -USR1 PID``: cut the power (every process with a file open under the mount must be
  killed first, or pass their pids with ``--kill``), then mount again;
- ``kill -USR2 PID``: print the counters;
- Ctrl-C or ``kill PID``: a clean unmount (everything becomes durable).

A control file does the same for those who cannot send signals: write ``cut``, ``stats`` or
``close`` into ``--control FILE`` (polled twice a second).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from .client import PowerCutFS, Stats

POLL_SECONDS = 0.5
WORDS = {signal.SIGUSR1: "cut", signal.SIGUSR2: "stats"}


def _show(what: str, stats: Stats) -> None:
    items = " ".join(f"{k}={v}" for k, v in vars(stats).items())
    print(f"powercut: {what} {items}", flush=True)


def _read_control(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        word = path.read_text().strip()
    except FileNotFoundError:
        return None
    path.unlink()
    return word or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.powercut", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("backing", type=Path)
    parser.add_argument("--kill", type=int, nargs="*", default=[], help="pids to SIGKILL at a cut")
    parser.add_argument("--control", type=Path, help="a file to write cut/stats/close into")
    parser.add_argument("--no-host-fsync", action="store_true", help="skip fsyncs of the backing")
    parser.add_argument("--torn", type=float, default=0.0, help="fraction of dirty pages torn in")
    args = parser.parse_args(argv)

    wanted = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    fs = PowerCutFS(args.backing, args.mountpoint, host_fsync=not args.no_host_fsync)
    fs.mount()
    print(
        f"powercut: {args.backing} mounted at {args.mountpoint}; pid {os.getpid()}: "
        f"kill -USR1 cuts the power, -USR2 prints counters, Ctrl-C unmounts",
        flush=True,
    )
    try:
        while True:
            got = signal.sigtimedwait(wanted, POLL_SECONDS)
            if got is None:
                word = _read_control(args.control)
            else:
                word = WORDS.get(got.si_signo, "close")  # SIGINT, SIGTERM
            if word == "cut":
                torn = (time.time_ns(), args.torn) if args.torn > 0 else None
                _show("cut", fs.cut(kill=args.kill, torn=torn))
            elif word == "stats":
                _show("stats", fs.stats())
            elif word == "close":
                break
            elif word is not None:
                print(f"powercut: unknown control word {word!r}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            stats = fs.close()
            if stats is not None:
                _show("unmounted", stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

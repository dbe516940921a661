"""A power cut during the root helper's install (agent/ota/updater.py apply_staged), on the
power-cut filesystem, with the data directory and the release root on it together (the usual
device: the helper removes the agent's release file once its own copy is made).

Attack: a power cut that loses unsynced writes, in the minutes of an install (unpack, venv, pip).
The next boot starts the helper again (``staged.json`` survives: it is removed last); it must go
on from root's copy, never refuse the release.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import time
from pathlib import Path
from typing import Any

import pytest

from agent.ota import bootcheck, updater
from agent.ota.release import ReleaseManifest
from tests.unit.ota.test_root_helper import KEY, next_boot_installs, signed_release, stage
from tools.powercut import PowerCutFS

pytestmark = pytest.mark.timeout(120)


def helper_until_install(conn: Any, root: str, data: str) -> None:
    """The real root helper; its install says so on the pipe, half builds the release and
    works on (until the cut kills it)."""

    def install(root: Path, manifest: ReleaseManifest, file: Path, **kwargs: object) -> None:
        rel = root / bootcheck.RELEASES / manifest.version / "bundle"
        rel.mkdir(parents=True)
        (rel / "half.whl").write_bytes(b"x" * 10_000)
        os.write(conn.fileno(), b"installing\n")
        time.sleep(600)

    updater.install = install  # type: ignore[assignment]
    updater.apply_staged(Path(root), Path(data), KEY.public_key())


def test_power_cut_during_the_install_then_the_next_boot_installs_from_roots_copy(
    powercut: PowerCutFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: root's copy was never fsynced, the agent's file was removed durably after it, and
    the next run refused the release (the agent's file missing). Now the copy is durable before
    the agent's file goes, and the next run installs from it."""
    m, file = signed_release(tmp_path)
    root, data = powercut.mountpoint / "opt", powercut.mountpoint / "data"
    root.mkdir()
    stage(data, m, file)
    powercut.sync()  # staged by the agent, durably
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=helper_until_install, args=(writer, str(root), str(data)))
    child.start()
    writer.close()
    assert select.select([reader.fileno()], [], [], 60)[0], "the helper never reached install"
    assert os.read(reader.fileno(), 100) == b"installing\n"
    powercut.cut(kill=[child.pid])
    child.join(30)
    reader.close()
    root, data = powercut.mountpoint / "opt", powercut.mountpoint / "data"
    next_boot_installs(root, data, file, monkeypatch)

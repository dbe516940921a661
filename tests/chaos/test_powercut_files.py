"""Power cuts on the agent's small files and its model cache, on the power-cut filesystem.

- Every state file the agent keeps (desired/reported state, the detector's calibration, the
  router's pending validations, OSCORE sequence reservations, credentials) is written with
  :func:`agent.files.write_atomic`. A worker rewrites such a file as fast as it can and reports
  each write that returned; at a cut at a random moment, the file must parse and hold at least
  the last reported write.
- The model cache: a worker assigns version after version of a signed model through the real
  download, install and swap path, reporting each one applied; at a cut, the cache must open,
  hold the last applied version with a file that verifies, and list nothing broken (an install
  interrupted by the cut leaves the previous model in place).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import select
import time
from pathlib import Path
from typing import Any

import pytest

from tools.powercut import PowerCutFS

pytestmark = pytest.mark.timeout(240)
CUTS = int(os.environ.get("EDGE_CHAOS_FILE_CUTS", "6"))
FIRST_REPORT_WITHIN = 60.0  # seconds a worker may take to report its first write
ROOT = Path(__file__).resolve().parents[2]


def _report(conn: Any, text: str) -> None:
    os.write(conn.fileno(), (text + "\n").encode())


def state_writer(conn: Any, path: str) -> None:
    from agent.files import write_atomic

    n = 0
    while True:
        n += 1
        write_atomic(Path(path), json.dumps({"n": n, "pad": "x" * 3000}).encode())
        _report(conn, f"wrote {n}")


def model_assigner(conn: Any, tmp: str, dev: str) -> None:
    from agent.modelstore.assignment import Assignment, ModelManager
    from agent.modelstore.cache import ModelCache
    from agent.modelstore.settings import ModelsSettings
    from tests.e2e.test_modelcache import FLOAT_AE, Rig, _commissioned, _detector

    async def main() -> None:
        rig = Rig(Path(tmp))
        for v in range(1, 200):
            rig.publish(FLOAT_AE, "skab-ae", f"3.0.{v}", entry="skab-ae")
        server = await rig.start()
        settings = ModelsSettings(cache_dir=Path(dev), public_key=rig.pub)
        from tests.e2e.test_modelcache import _fetcher

        cache = ModelCache.open(settings, fetcher=_fetcher(server.uri))
        det = _detector()
        _commissioned(det)
        manager = ModelManager(cache, lambda: det)
        for v in range(1, 200):
            state = await manager.assign(Assignment("anomaly", "skab-ae", f"3.0.{v}"))
            if state.status == "active":
                _report(conn, f"applied 3.0.{v}")

    asyncio.run(main())


def _run_until_cut(fs: PowerCutFS, target: Any, args: tuple[Any, ...], rng: random.Random) -> str:
    """Start a worker, let it run a random while, cut; returns the last line it reported."""
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(writer, *args))
    proc.start()
    writer.close()
    buf = b""
    # The random while counts from the worker's first report (its start-up, imports and setup
    # take seconds on a loaded host), so that every cut lands while it works.
    pause = rng.uniform(0.2, 3.0)
    deadline = time.monotonic() + FIRST_REPORT_WITHIN
    fd = reader.fileno()
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 65536)
            if not data:
                break
            if not buf:
                deadline = time.monotonic() + pause
            buf += data
    fs.cut(kill=[proc.pid])
    proc.join(30)
    while select.select([fd], [], [], 0)[0]:
        data = os.read(fd, 65536)
        if not data:
            break
        buf += data
    reader.close()
    lines = [line for line in buf.decode().split("\n") if line]
    return lines[-1] if lines else ""


def test_power_cut_state_files_are_whole_and_hold_every_returned_write(
    powercut: PowerCutFS,
) -> None:
    rng = random.Random(5)
    path = powercut.mountpoint / "state.json"
    for _ in range(CUTS):
        last = _run_until_cut(powercut, state_writer, (str(path),), rng)
        assert last.startswith("wrote "), last
        doc = json.loads(path.read_bytes())  # whole: never a torn or empty file
        assert doc["n"] >= int(last.split()[1])
        leftovers = [p.name for p in powercut.mountpoint.iterdir() if p.name != "state.json"]
        assert all(name.startswith(".") for name in leftovers), leftovers


def test_power_cut_model_install_leaves_the_last_applied_model_verified(
    powercut: PowerCutFS, tmp_path: Path
) -> None:
    from agent.detect.inference import read_model_file
    from agent.modelstore.cache import ModelCache
    from agent.modelstore.settings import ModelsSettings

    rng = random.Random(9)
    dev = powercut.mountpoint / "dev"
    applied = 0
    for i in range(max(2, CUTS // 2)):
        work = tmp_path / f"cloud-{i}"
        work.mkdir()
        last = _run_until_cut(powercut, model_assigner, (str(work), str(dev)), rng)
        settings = ModelsSettings(cache_dir=dev, public_key=work / "fleet.pub")
        cache = ModelCache.open(settings)  # opens (a torn index is rebuilt from the files)
        rows = cache.listing(verify=True)
        assert not [r for r in rows if str(r["signature"]).startswith("BAD")], rows
        if last.startswith("applied "):
            applied += 1
            version = last.split()[1]
            hit = cache.lookup("skab-ae", version)
            assert hit is not None, (version, cache.cached())
            read_model_file(hit.path, hit.entry)  # size and SHA-256 as signed
        asyncio.run(cache.close())
    assert applied > 0  # the cuts did land while models were being assigned

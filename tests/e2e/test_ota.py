"""Signed agent releases end to end, with real processes (docs/ota.md).

A real endpoint on loopback serves releases published with ``edge-agent-cloud releases
publish``; real agents (``edge-agent run --simulate pump``, installed from a release) sync with
it; edge-agent.service is run from its unit files the way systemd runs it, and the root helper
is edge-agent-update.service's command (tools/otarig.py says how, and how test releases are
built and installed quickly by the real commands).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from otarig import (
    DEVICE,
    READY_WINDOW,
    SYSTEMD,
    Service,
    World,
    build_wheels,
    clean_env,
    deps_site,
    lost,
    make_bundle,
    unit_command,
    until,
)

from agent.ota import bootcheck as bc
from agent.ota.release import ReleaseError
from agent.ota.updater import STAGED_FILE, apply_staged
from cloud.cli import main as cloud_main
from cloud.releases import RELEASE_FILE
from cloud.server import CloudServer

pytestmark = pytest.mark.timeout(420)

BAD_WINDOW = 6.0  # TimeoutStartSec for the release that never sends READY=1


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_wheels(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def deps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deps_site(tmp_path_factory.mktemp("deps"))


@pytest.fixture
async def world(tmp_path: Path, wheels: dict[str, Path], deps: Path) -> AsyncIterator[World]:
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    try:
        yield World(tmp_path, server, wheels, deps)
    finally:
        await server.stop()


async def running_service(world: World) -> Service:
    await world.install_initial("1.0")
    credential = world.etc / "credential.json"
    (await world.server.register(DEVICE)).write(credential)
    service = Service(world, world.config(credential))
    assert (await service.run_until_ready())[-1] == "1.0:ready"
    return service


async def reported(world: World, key: str) -> Any:
    entry = (await world.server.reported(DEVICE)).get(key)
    return None if entry is None else entry.value


# -- the tests --------------------------------------------------------------------------------


async def test_update_through_desired_state_loses_no_reading(world: World) -> None:
    service = await running_service(world)
    try:
        sha = world.publish("1.1", "agent")
        await until(lambda: world.server.seqs(DEVICE), 60, "no records from 1.0")
        await until(lambda: reported(world, "agent/version"), 60, "agent/version not reported")
        assert await reported(world, "agent/version") == "1.0"
        await world.server.set_desired(DEVICE, {"agent/version": {"version": "1.1", "sha256": sha}})

        async def staged() -> bool:
            return (world.data / "ota" / STAGED_FILE).is_file()

        await until(staged, 120, "the agent did not stage 1.1")
        # the root helper (edge-agent-update.service) installs and switches, the agent runs on
        helper = unit_command(SYSTEMD / "edge-agent-update.service", "ExecStart", world)
        helper = [*helper[: helper.index("--restart-unit")], "--site", str(world.deps)]
        proc = await asyncio.create_subprocess_exec(
            *helper, stderr=asyncio.subprocess.PIPE, env=clean_env(), cwd=world.tmp
        )
        _, err = await asyncio.wait_for(proc.communicate(), 300)
        assert proc.returncode == 0, err.decode()
        assert bc.link_version(world.root, bc.CURRENT) == "1.1"
        assert bc.link_version(world.root, bc.PREVIOUS) == "1.0"
        switched = bc.load(world.root)  # the agent's [update] limits reached the root helper
        assert (switched["max_attempts"], switched["health_window"]) == (2, 120)
        assert service.proc is not None and service.proc.returncode is None  # 1.0 still runs
        # the restart the helper asks systemd for
        assert await service.stop() == 0
        assert (await service.run_until_ready())[-1] == "1.1:ready"

        async def confirmed() -> Any:
            return (bc.load(world.root).get("outcome") or {}).get("result") == "updated"

        await until(confirmed, 120, "1.1 never confirmed")

        async def reported_updated() -> bool:
            update = await reported(world, "agent/update")
            return (update or {}).get("result") == "updated"

        await until(reported_updated, 120, "agent/update not reported")
        assert await reported(world, "agent/version") == "1.1"
        assert await service.stop() == 0
        old, new = service.committed(0), service.committed(-1)
        committed, stored = await service.drain(world.server)
    finally:
        if service.proc is not None and service.proc.returncode is None:
            service.proc.kill()
    assert old and new and max(old) < min(new)  # the queue carried across: numbering goes on
    assert lost(committed, stored) == 0


@pytest.mark.parametrize(
    ("wheel", "window", "starts"),
    [("crash", READY_WINDOW, "exited"), ("hang", BAD_WINDOW, "timeout")],
)
async def test_a_release_that_never_reaches_ready_is_rolled_back(
    world: World, wheel: str, window: float, starts: str
) -> None:
    service = await running_service(world)
    try:
        await world.stage("1.2", world.publish("1.2", wheel))
        assert (
            await asyncio.to_thread(
                apply_staged, world.root, world.data, world.key, site=[world.deps]
            )
            == "1.2"
        )
        assert await service.stop() == 0
        outcomes = await service.run_until_ready(bad_window=window)
        # three failed starts of 1.2 (the boot counter's limit), then 1.0 again
        assert outcomes == [f"1.2:{starts}"] * bc.MAX_ATTEMPTS + ["1.0:ready"], outcomes
        assert bc.link_version(world.root, bc.CURRENT) == "1.0"
        outcome = bc.load(world.root)["outcome"]
        assert outcome["result"] == "rolled_back" and outcome["version"] == "1.2"
        assert outcome["reason"] == f"did not reach READY in {bc.MAX_ATTEMPTS} starts"

        async def reported_rollback() -> bool:
            update = await reported(world, "agent/update")
            return (update or {}).get("result") == "rolled_back"

        await until(reported_rollback, 120, "the rollback was not reported")
        assert await reported(world, "agent/version") == "1.0"
    finally:
        if service.proc is not None and service.proc.returncode is None:
            service.proc.kill()
            await service.proc.wait()


async def test_a_release_that_runs_but_never_syncs_is_rolled_back_by_the_health_window(
    world: World,
) -> None:
    """READY=1 at start, then no sync exchange: the boot counter sees one good start; the
    health timer's periods (its unit's command line, run as the timer would) roll it back."""
    service = await running_service(world)
    try:
        await world.stage("1.2", world.publish("1.2", "silent"), health_window=120)
        applied = await asyncio.to_thread(
            apply_staged, world.root, world.data, world.key, site=[world.deps]
        )
        assert applied == "1.2"
        assert await service.stop() == 0
        assert await service.run_until_ready() == ["1.2:ready"]
        health = unit_command(SYSTEMD / "edge-agent-health.service", "ExecStart", world)
        health = health[: health.index("--restart-unit")]  # no systemctl here: the rig restarts
        for period in (1, 2):
            proc = await asyncio.create_subprocess_exec(*health, env=clean_env(), cwd=world.tmp)
            assert await proc.wait() == 0
            current = bc.link_version(world.root, bc.CURRENT)
            assert current == ("1.2" if period == 1 else "1.0"), period
        outcome = bc.load(world.root)["outcome"]
        assert outcome["result"] == "rolled_back" and outcome["version"] == "1.2"
        assert outcome["reason"].startswith("not READY within the health window (120 s")
        assert service.proc is not None
        service.proc.kill()  # the restart the health unit asks systemd for
        await service.proc.wait()
        assert await service.run_until_ready() == ["1.0:ready"]

        async def reported_rollback() -> bool:
            update = await reported(world, "agent/update")
            return (update or {}).get("result") == "rolled_back"

        await until(reported_rollback, 120, "the rollback was not reported")
    finally:
        if service.proc is not None and service.proc.returncode is None:
            service.proc.kill()
            await service.proc.wait()


KILLER = """
import asyncio, os, signal, sys
from pathlib import Path
from agent.modelstore.signing import load_public_key
from agent.ota.updater import ReleaseFetcher, stage
from agent.sync.transport import CoapTransport
from drivers.clock import RealClock

class Killed(ReleaseFetcher):
    async def download(self, manifest, part, on_block=None):
        def kill(num, have):
            if num == 20:
                os.kill(os.getpid(), signal.SIGKILL)
        return await super().download(manifest, part, on_block=kill)

async def main():
    f = Killed(CoapTransport(RealClock(), lanes=2), sys.argv[1], ack_timeout=0.2)
    await stage(f, version=sys.argv[2], sha256=None, key=load_public_key(sys.argv[3]),
                data_dir=Path(sys.argv[4]))

asyncio.run(main())
"""


async def test_a_download_killed_midway_resumes_and_nothing_switches(world: World) -> None:
    await world.install_initial("1.0")
    world.publish("1.1", "agent")
    uri = f"coap://127.0.0.1:{world.server.port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLER, uri, "1.1", str(world.pub), str(world.data), env=clean_env()
    )
    assert await proc.wait() == -signal.SIGKILL
    part = world.data / "ota" / "1.1.part"
    assert part.stat().st_size >= 20 * 1024
    assert not (world.data / "ota" / STAGED_FILE).exists()
    assert bc.link_version(world.root, bc.CURRENT) == "1.0"  # nothing changed
    staged = await world.stage("1.1")
    assert staged.stats.resumed_from >= 20 * 1024
    assert (
        await asyncio.to_thread(apply_staged, world.root, world.data, world.key, site=[world.deps])
        == "1.1"
    )
    assert bc.load(world.root)["pending"] == "1.1"


async def test_tampered_and_wrongly_signed_releases_are_refused_before_install(
    world: World, tmp_path: Path
) -> None:
    await world.install_initial("1.0")
    sha = world.publish("1.1", "agent")
    # the endpoint's stored file altered after signing: the download does not match
    stored = world.cloud / "releases" / "1.1" / RELEASE_FILE
    data = bytearray(stored.read_bytes())
    data[2000] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="is not the signed file"):
        await world.stage("1.1", sha)
    # a release signed with another key (a forged endpoint, or the model key)
    other = tmp_path / "other"
    assert cloud_main(["releases", "keygen", "--out", str(other / "k")]) == 0
    bundle = make_bundle(tmp_path / "b2", world.wheels["agent"], world.wheels["pip"])
    args = ["releases", "publish", str(bundle), "--data", str(world.cloud), "--version", "1.2"]
    assert cloud_main([*args, "--key", str(other / "k")]) == 0
    with pytest.raises(ReleaseError, match="does not verify with the release public key"):
        await world.stage("1.2")
    # the operator's SHA-256 names another file
    world.publish("1.3", "agent")
    with pytest.raises(ReleaseError, match="desired agent/version says"):
        await world.stage("1.3", "ab" * 32)
    # staged correctly, then altered in the data directory before the root helper ran
    world.publish("1.4", "agent")
    staged = await world.stage("1.4")
    data = bytearray(staged.file.read_bytes())
    data[100:104] = b"\0\0\0\0"
    staged.file.write_bytes(bytes(data))
    assert (
        await asyncio.to_thread(apply_staged, world.root, world.data, world.key, site=[world.deps])
        is None
    )
    outcome = bc.load(world.root)["outcome"]
    assert outcome["result"] == "refused" and "is not the signed file" in outcome["reason"]
    assert sorted(p.name for p in (world.root / bc.RELEASES).iterdir()) == ["1.0"]
    assert bc.link_version(world.root, bc.CURRENT) == "1.0"
    assert not list((world.data / "ota").glob("*.release"))
    # a release that cannot read the queue as it is (here: a newer schema than it knows),
    # asked with its own Python after the install: refused before the switch
    header = bytearray(b"SQLite format 3\0" + bytes(84))
    header[60:64] = (99).to_bytes(4, "big")
    (world.data / "queue.db").write_bytes(bytes(header) + bytes(412))
    world.publish("1.5", "agent")
    await world.stage("1.5")
    applied = await asyncio.to_thread(
        apply_staged, world.root, world.data, world.key, site=[world.deps]
    )
    assert applied is None
    outcome = bc.load(world.root)["outcome"]
    assert outcome["result"] == "refused"
    assert "queue schema version 99, this release reads 1" in outcome["reason"]
    assert bc.link_version(world.root, bc.CURRENT) == "1.0"

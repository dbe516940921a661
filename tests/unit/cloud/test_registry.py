"""The model registry on a shared storage (cloud/models.py): a version published through one
endpoint host (or the command line) is served by every host on that storage, each from the cache
in its own --data, filled on demand and checked against the signed manifest. Real endpoints on
loopback, a real PostgreSQL database (tests/pg.py) or a SQLite storage in another directory, and
the device's real model cache and fetcher, which verify what they download."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import SyncError
from agent.modelstore.cache import ModelCache
from agent.modelstore.fetch import BLOCK_WINDOW, ModelFetcher
from agent.modelstore.settings import ModelsSettings
from agent.modelstore.signing import SignedManifest, write_keypair
from agent.sync.transport import CoapTransport
from cloud.cli import main as cloud_main
from cloud.modelfiles import MANIFEST_FILE, MODEL_FILE
from cloud.server import CloudServer
from drivers.clock import RealClock

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[3]
FLOAT_AE = ROOT / "models" / "cloud" / "skab-ae.float32.tflite"
FAST = {"ack_timeout": 0.2, "block_deadline": 4.0, "manifest_deadline": 8.0}


@pytest.fixture(params=["postgresql", "sqlite"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The shared storage: PostgreSQL, or SQLite in a directory that is no host's --data."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_dsn"))
    return f"sqlite:{tmp_path / 'shared'}"


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "keys" / "signing.key")


@pytest.fixture
async def hosts(tmp_path: Path, storage: str) -> AsyncIterator[list[CloudServer]]:
    servers = [
        await CloudServer.start(tmp_path / name, "127.0.0.1", 0, allow_plain=True, storage=storage)
        for name in ("host-a", "host-b")
    ]
    yield servers
    for server in servers:
        await server.stop()


def publish(data: Path, storage: str, key: Path, version: str) -> int:
    return cloud_main(
        [
            *("models", "publish", str(FLOAT_AE), "--data", str(data), "--storage", storage),
            *("--name", "skab-ae", "--version", version, "--entry", "skab-ae", "--key", str(key)),
        ]
    )


async def download(tmp: Path, uri: str, pub: Path, version: str) -> Any:
    settings = ModelsSettings(cache_dir=tmp, public_key=pub)
    fetcher = ModelFetcher(CoapTransport(RealClock(), lanes=BLOCK_WINDOW), uri, **FAST)
    cache = ModelCache.open(settings, fetcher=fetcher)
    try:
        return await cache.get("skab-ae", version)
    finally:
        await cache.close()


async def test_a_version_published_through_one_host_is_served_by_the_other(
    tmp_path: Path, storage: str, key: tuple[Path, Path], hosts: list[CloudServer], capsys: Any
) -> None:
    _, b = hosts
    private, public = key
    assert publish(tmp_path / "host-a", storage, private, "3.0.0") == 0
    assert publish(tmp_path / "host-b", storage, private, "3.0.0") == 65  # immutable
    assert "already published" in capsys.readouterr().err
    # listed from any host's --data: the storage answers
    assert (
        cloud_main(
            ["models", "list", "--json", "--data", str(tmp_path / "b"), "--storage", storage]
        )
        == 0
    )
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["name"], listed["version"]) == ("skab-ae", "3.0.0")
    # nothing is cached before a device asks; host B fills its cache from the storage
    cached = tmp_path / "host-b" / "models" / "skab-ae" / "3.0.0"
    assert not cached.exists()
    got = await download(tmp_path / "dev", b.uri, public, "3.0.0")
    assert got.source == "download" and got.manifest.sha256 == listed["sha256"]
    assert (cached / MODEL_FILE).read_bytes() == FLOAT_AE.read_bytes()
    assert not (tmp_path / "host-a" / "models" / "skab-ae").exists()


async def test_a_stale_cached_copy_is_replaced_and_a_corrupt_stored_file_is_refused(
    tmp_path: Path, storage: str, key: tuple[Path, Path]
) -> None:
    private, public = key
    data = tmp_path / "host"
    assert publish(data, storage, private, "3.0.0") == 0
    assert publish(data, storage, private, "3.0.1") == 0
    # the host's cache holds another storage's 3.0.0 (an older deployment's directory)
    stale = data / "models" / "skab-ae" / "3.0.0"
    stale.mkdir(parents=True)
    (stale / MODEL_FILE).write_bytes(b"TFL3" * 100)
    other = SignedManifest.sign("skab-ae", "3.0.0", b"TFL3" * 100, {"kind": "x"}, _raw(private))
    (stale / MANIFEST_FILE).write_bytes(other.to_cbor())
    # attack: the stored bytes of 3.0.1 are corrupted at rest
    if storage.startswith("postgresql"):
        import psycopg

        with psycopg.connect(storage, autocommit=True) as conn:
            conn.execute("UPDATE models SET data = data || '\\x00'::bytea WHERE version = '3.0.1'")
    else:
        path = Path(storage.removeprefix("sqlite:")) / "models" / "skab-ae" / "3.0.1" / MODEL_FILE
        path.write_bytes(path.read_bytes() + b"\x00")
    server = await CloudServer.start(data, "127.0.0.1", 0, allow_plain=True, storage=storage)
    try:
        got = await download(tmp_path / "dev", server.uri, public, "3.0.0")
        assert (stale / MODEL_FILE).read_bytes() == FLOAT_AE.read_bytes() == got.path.read_bytes()
        with pytest.raises(SyncError) as refused:
            await download(tmp_path / "dev2", server.uri, public, "3.0.1")
        assert "5.03 the stored model does not match its manifest" in str(refused.value)
        assert not (data / "models" / "skab-ae" / "3.0.1").exists()  # never cached
    finally:
        await server.stop()


def _raw(path: Path) -> Any:
    from agent.modelstore.signing import load_private_key

    return load_private_key(path)

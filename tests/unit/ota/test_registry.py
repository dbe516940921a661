"""The endpoint's release registry (cloud/releases.py, cloud/releasecli.py): publish, list,
immutable versions, and the CoAP resources' answers to what is not there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.ota.release import ReleaseError
from cloud.cli import main as cloud_main
from cloud.models import ModelRequestError
from cloud.releases import ReleaseRegistry

from .test_release import make_bundle

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "cloud"
    assert cloud_main(["releases", "keygen", "--data", str(d)]) == 0
    bundle = make_bundle(tmp_path / "bundle")
    assert cloud_main(["releases", "publish", str(bundle), "--data", str(d), "--version", "1"]) == 0
    return d


def test_list_and_immutability(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert cloud_main(["releases", "list", "--data", str(data), "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    stored = data / "releases" / "1" / "release.tar"
    assert item["version"] == "1" and item["size"] == stored.stat().st_size
    assert item["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    again = ["releases", "publish", str(tmp_path / "bundle"), "--data", str(data)]
    assert cloud_main([*again, "--version", "1"]) == 0  # the same bytes again: nothing changes
    assert "already published, the same file" in capsys.readouterr().out
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    (tmp_path / "bundle" / "bundle.json").write_text(json.dumps({**meta, "python": "3.12"}))
    assert cloud_main([*again, "--version", "1"]) != 0  # other bytes under that version
    assert "already published with other bytes" in capsys.readouterr().err
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == item["sha256"]  # the first stays
    assert cloud_main(["releases", "keygen", "--data", str(data)]) != 0  # never overwritten


def test_a_bundle_that_does_not_match_its_listing_is_not_published(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "pip-26.3-py3-none-any.whl").write_bytes(b"other")
    with pytest.raises(ReleaseError, match="does not match its SHA-256"):
        ReleaseRegistry(tmp_path / "r").publish(bundle, "1", Ed25519PrivateKey.generate())
    assert not any((tmp_path / "r").glob("1"))


@pytest.mark.parametrize(
    "path",
    [("releases", "2", "file"), ("releases", "..", "manifest"), ("releases", "1", "other")],
)
async def test_what_is_not_there_is_404(data: Path, path: tuple[str, ...]) -> None:
    registry = ReleaseRegistry(data / "releases")
    with pytest.raises(ModelRequestError) as err:
        await registry.render(Message(code=Code.GET, uri_path=path), path)
    assert err.value.code == Code.NOT_FOUND


async def test_blocks_carry_size_and_etag(data: Path) -> None:
    registry = ReleaseRegistry(data / "releases")
    path = ("releases", "1", "file")
    resp = await registry.render(Message(code=Code.GET, uri_path=path), path)
    stored = (data / "releases" / "1" / "release.tar").read_bytes()
    assert resp.payload == stored[:1024]
    assert resp.opt.size2 == len(stored)
    assert resp.opt.etag == hashlib.sha256(stored).digest()[:8]


async def test_the_cache_is_filled_from_the_storage_checked_and_a_stale_copy_replaced(
    data: Path, tmp_path: Path
) -> None:
    """An endpoint whose --data is not the store (a PostgreSQL fleet's host): the first GET of
    the file fills DATA/releases from the storage; a cached copy under another manifest (a
    stale one) is replaced; a stored file that does not match its manifest is refused with 5.03
    and not cached (cloud/releases.py)."""
    from cloud.models import Direct
    from cloud.releasefiles import ReleaseFiles

    store = ReleaseFiles(data / "releases")  # stands for the storage
    cache_dir = tmp_path / "host" / "releases"
    stale = ReleaseFiles(cache_dir)
    (tmp_path / "stale.tar").write_bytes(b"stale")
    stale.put_release("1", b"an older manifest", tmp_path / "stale.tar", 0.0)
    registry = ReleaseRegistry(cache_dir, Direct(store))
    path = ("releases", "1", "file")
    resp = await registry.render(Message(code=Code.GET, uri_path=path), path)
    stored = (data / "releases" / "1" / "release.tar").read_bytes()
    assert resp.payload == stored[:1024] and resp.opt.size2 == len(stored)
    assert (cache_dir / "1" / "release.tar").read_bytes() == stored
    assert (cache_dir / "1" / "manifest.cbor").read_bytes() == (
        data / "releases" / "1" / "manifest.cbor"
    ).read_bytes()
    assert [p.name for p in cache_dir.iterdir()] == ["1"]  # nothing left beside it
    # corrupted at rest in the storage: another host refuses it and caches nothing
    altered = bytearray(stored)
    altered[600] ^= 0xFF
    (data / "releases" / "1" / "release.tar").write_bytes(bytes(altered))
    other = ReleaseRegistry(tmp_path / "other" / "releases", Direct(store))
    with pytest.raises(ModelRequestError) as err:
        await other.render(Message(code=Code.GET, uri_path=path), path)
    assert err.value.code == Code.SERVICE_UNAVAILABLE
    assert list((tmp_path / "other" / "releases").iterdir()) == []

"""Rollback protection (agent/ota/floor.py): a device that confirmed a release of rollback index
N refuses a release below N, also after it moved on, while a pending release raises nothing;
the index is signed (a manifest whose index was changed does not verify) and checked on
decoding; a damaged floor file is said and the confirmed release's index still holds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.ota import bootcheck as bc
from agent.ota import floor
from agent.ota.install import MANIFEST_FILE
from agent.ota.release import ReleaseError, ReleaseManifest

pytestmark = pytest.mark.timeout(30)

KEY = Ed25519PrivateKey.generate()
BUNDLE = {"arch": "x86_64", "python": "3.11", "project": "a.whl", "pip": "pip.whl"}


def manifest(tmp_path: Path, version: str, index: int) -> ReleaseManifest:
    file = tmp_path / f"{version}.tar"
    file.write_bytes(version.encode())
    bundle = {**BUNDLE, "files": {"a.whl": "0" * 64, "pip.whl": "1" * 64}}
    return ReleaseManifest.sign(version, file, bundle, KEY, rollback_index=index)


def install(root: Path, m: ReleaseManifest) -> None:
    """``releases/V`` as the root helper leaves it: complete, with its verified manifest."""
    rel = root / bc.RELEASES / m.version
    rel.mkdir(parents=True)
    (rel / MANIFEST_FILE).write_bytes(m.to_cbor())
    bc.mark_complete(root, m.version)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A release root running 1.0 (index 0, the flashed release) and a data directory."""
    root, data = tmp_path / "opt", tmp_path / "data"
    root.mkdir()
    data.mkdir()
    install(root, manifest(tmp_path, "1.0", 0))
    bc.set_link(root, bc.CURRENT, "releases/1.0")
    return root, data


def test_a_release_below_the_confirmed_index_is_refused_also_after_moving_on(
    layout: tuple[Path, Path], tmp_path: Path
) -> None:
    root, data = layout
    old, fixed, newer = (manifest(tmp_path, v, i) for v, i in (("1.1", 1), ("2.0", 2), ("2.1", 2)))
    floor.check(old, root, data)  # nothing confirmed above 0 yet
    install(root, fixed)
    bc.switch(root, "2.0", data_dir=data)
    floor.check(old, root, data)  # 2.0 is pending: it may still roll back, it raises nothing
    assert bc.confirm(root, "2.0")
    with pytest.raises(ReleaseError, match=r"rollback index 1 is below this device's floor 2"):
        floor.check(old, root, data)
    floor.check(newer, root, data)  # the same index is taken
    assert json.loads((data / "ota" / floor.FLOOR_FILE).read_text()) == {
        "edge-agent": {"index": 2, "version": "2.0"}
    }
    install(root, newer)
    bc.switch(root, "2.1", data_dir=data)
    bc.rollback(root, "the operator's own test")  # back on 2.0, then say 1.0 were current again
    bc.set_link(root, bc.CURRENT, "releases/1.0")
    with pytest.raises(ReleaseError, match=r"set by release 2\.0"):
        floor.check(old, root, data)  # the floor is kept: the device moved on, it holds


def test_the_index_is_signed_and_checked_when_decoded(tmp_path: Path) -> None:
    m = manifest(tmp_path, "3.0", 5)
    assert ReleaseManifest.from_cbor(m.to_cbor()).rollback_index == 5
    doc = cbor2.loads(m.to_cbor())
    doc["bundle"]["rollback_index"] = 9  # raised by whoever serves it: the signature breaks
    forged = ReleaseManifest.from_cbor(cbor2.dumps(doc))
    with pytest.raises(ReleaseError, match="does not verify"):
        forged.verify(KEY.public_key())
    for bad in (-1, 2**31, 1.5, "2", True):
        doc["bundle"]["rollback_index"] = bad
        with pytest.raises(ReleaseError, match="rollback_index"):
            ReleaseManifest.from_cbor(cbor2.dumps(doc))
    with pytest.raises(ReleaseError, match="rollback index"):
        manifest(tmp_path, "3.1", -1)
    assert "rollback_index" not in manifest(tmp_path, "3.2", 0).bundle  # 0: reads as before


def test_a_damaged_floor_file_is_said_and_the_confirmed_index_still_holds(
    layout: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, data = layout
    install(root, manifest(tmp_path, "2.0", 2))
    bc.set_link(root, bc.CURRENT, "releases/2.0")  # confirmed: nothing pending
    (data / "ota").mkdir()
    junk_files = (b"[" * 10_000, b'{"edge-agent": {"index": 1e999}}', b"\xff\xfe", b"[1]")
    for junk in junk_files:
        (data / "ota" / floor.FLOOR_FILE).write_bytes(junk)
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(ReleaseError, match="floor 2"):
            floor.check(manifest(tmp_path, "1.5", 1), root, data)
        assert "event=floors_unreadable" in caplog.text

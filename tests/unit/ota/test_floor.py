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

from agent.errors import ModelError
from agent.modelstore.floors import Floors
from agent.ota import bootcheck as bc
from agent.ota import floor, updater
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


# -- the root helper's floor is the release root's own ------------------------------------------


def stage(data: Path, m: ReleaseManifest, file: bytes) -> None:
    """What the agent leaves in DATA/ota for the root helper (updater.stage's files)."""
    ota = data / "ota"
    ota.mkdir(parents=True, exist_ok=True)
    (ota / f"{m.version}.release").write_bytes(file)
    (ota / f"{m.version}.manifest").write_bytes(m.to_cbor())
    (ota / "staged.json").write_text(json.dumps({"version": m.version}))


def outcome(root: Path) -> dict:
    return json.loads((root / bc.STATE_FILE).read_text())["outcome"]


def test_attack_floors_json_deleted_while_pending_the_root_helper_still_refuses(
    layout: tuple[Path, Path], tmp_path: Path
) -> None:
    """Was: the root helper's floor was DATA/ota/floors.json (the agent's) and nothing else while
    a release was pending (confirmed_index() is 0 then): the agent deleted it and staged a signed
    release below the floor, and root's check passed it. Now root keeps its own floor in
    update.json: raised here by its run while 2.0 was the confirmed release."""
    root, data = layout
    fixed, newer, old = (manifest(tmp_path, v, i) for v, i in (("2.0", 2), ("2.1", 2), ("1.1", 1)))
    install(root, fixed)
    bc.set_link(root, bc.CURRENT, "releases/2.0")  # 2.0, the security fix, confirmed
    # a run of the root helper while 2.0 is the confirmed release (this one refused: its file
    # is not the signed one); every run holds the floor in the release root
    stage(data, newer, b"not the signed file")
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert "not the signed file" in outcome(root)["reason"]
    install(root, newer)
    bc.switch(root, "2.1", data_dir=data)  # 2.1 pending: it may still roll back
    stage(data, old, b"1.1")  # manifest() signs a file of the version's bytes
    (data / "ota" / floor.FLOOR_FILE).unlink(missing_ok=True)  # the agent owns DATA/ota
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    said = outcome(root)
    assert said["result"] == "refused"
    assert "rollback index 1 is below this device's floor 2 (set by release 2.0" in said["reason"]
    assert not (root / bc.RELEASES / "1.1").exists()
    assert not list((data / "ota").iterdir())  # the staged files removed


def test_the_boot_counter_raises_the_root_floor_when_it_confirms(
    layout: tuple[Path, Path], tmp_path: Path
) -> None:
    """The switch records the release's signed index; its confirmation (by the boot counter,
    as root) raises update.json's floor to it; a pending release, or one rolled back, raises
    nothing; the floor holds once the device runs an older release, whatever DATA/ota holds."""
    root, data = layout
    fixed, bad, old = (manifest(tmp_path, v, i) for v, i in (("2.0", 2), ("3.0", 5), ("1.1", 1)))
    install(root, fixed)
    bc.switch(root, "2.0", data_dir=data, rollback_index=2)
    assert floor.root_floor(root) == (0, None)  # pending
    floor.check_root(old, root)
    assert bc.confirm(root, "2.0")
    assert bc.floor_of(bc.load(root)) == (2, "2.0")
    install(root, bad)
    bc.switch(root, "3.0", data_dir=data, rollback_index=5)
    assert bc.start(root, data) == "3.0"
    assert bc.failed(root, data) == "2.0"  # rolled back: 3.0 was never confirmed
    assert floor.root_floor(root) == (2, "2.0")
    bc.set_link(root, bc.CURRENT, "releases/1.0")  # say 1.0 were current again (by hand)
    with pytest.raises(ReleaseError, match=r"floor 2 \(set by release 2\.0"):
        floor.check_root(old, root)
    assert not (data / "ota").exists()  # nothing of it is in the agent's data directory


def test_a_release_root_from_before_the_root_floor_takes_the_previous_index_while_pending(
    layout: tuple[Path, Path], tmp_path: Path
) -> None:
    """update.json without ``floor`` (an older helper switched): while the release it switched
    to is pending, the root helper takes the index of the one it ran before, and keeps it."""
    root, data = layout
    fixed, newer, old = (manifest(tmp_path, v, i) for v, i in (("2.0", 2), ("2.1", 2), ("1.1", 1)))
    for m in (fixed, newer):
        install(root, m)
    bc.set_link(root, bc.CURRENT, "releases/2.0")
    bc.switch(root, "2.1", data_dir=data)  # as an older helper did: no floor, no index
    doc = bc.load(root)
    del doc["pending_index"]
    bc.save(root, doc)
    with pytest.raises(ReleaseError, match="floor 2"):
        floor.check_root(old, root)
    assert bc.floor_of(bc.load(root)) == (2, "2.0")


# -- the floors file kept twice ------------------------------------------------------------------


def test_a_floor_holds_when_one_of_its_two_files_is_damaged_at_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: the floors were one file, and a damaged file (corruption at rest) read as no
    floors at all, so a model version below its floor was taken again. The floors are now
    written to two files, one after the other; either one damaged or missing, the other holds
    them, and the next raise writes both whole again. Both damaged read as none."""
    floors = Floors(tmp_path)
    floors.raise_to("skab-ae", "4.0.0", {"rollback_index": 2})
    floors.raise_to("skab-cls", "1.1.0", {"rollback_index": 1})
    want = {"skab-ae": (2, "4.0.0"), "skab-cls": (1, "1.1.0")}
    for index, (damaged, other) in enumerate(
        ((floors.path, floors.copy), (floors.copy, floors.path))
    ):
        damaged.write_bytes(b"\x00" * 37)  # a block of zeros
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert Floors(tmp_path).read() == want
            with pytest.raises(ModelError, match="below this device's floor"):
                Floors(tmp_path).check("skab-ae", "3.0.0", {"rollback_index": 0})
        assert "event=floors_unreadable" in caplog.text
        want["skab-ae"] = (3 + index, f"{5 + index}.0.0")
        floors.raise_to("skab-ae", want["skab-ae"][1], {"rollback_index": 3 + index})
        assert json.loads(damaged.read_bytes()) == json.loads(other.read_bytes())  # both whole
        damaged.unlink()  # missing: the other holds them
        assert Floors(tmp_path).read() == want
        damaged.write_bytes(other.read_bytes())
    # a raise cut between its two writes: the first file has it, the copy not yet
    floors.path.write_bytes(b'{"skab-ae": {"index": 9, "version": "9.0.0"}}')
    assert floors.read()["skab-ae"] == (9, "9.0.0")
    floors.path.write_bytes(b"[" * 50_000)
    floors.copy.write_bytes(b"{")
    assert floors.read() == {}

"""Signed releases (agent/ota/release.py): the manifest signs the packed bundle; a tampered
file, a wrongly signed manifest, a model key used as a release key, a bundle that smuggles a
member or a path, are each refused before anything is installed."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.modelstore.signing import SignedManifest
from agent.ota.release import ReleaseError, ReleaseManifest, check_file, pack, unpack

pytestmark = pytest.mark.timeout(30)


def make_bundle(directory: Path) -> Path:
    directory.mkdir()
    files = {}
    for name, data in (
        ("edge_agent-9.9-py3-none-any.whl", b"agent wheel"),
        ("pip-26.3-py3-none-any.whl", b"pip wheel"),
    ):
        (directory / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    meta = {
        "arch": "x86_64",
        "python": "3.11",
        "project": "edge_agent-9.9-py3-none-any.whl",
        "pip": "pip-26.3-py3-none-any.whl",
        "files": files,
    }
    (directory / "bundle.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture
def signed(tmp_path: Path) -> tuple[ReleaseManifest, Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    out = tmp_path / "release.tar"
    meta = pack(make_bundle(tmp_path / "bundle"), out)
    return ReleaseManifest.sign("9.9", out, meta, key), out, key


def test_round_trip_and_unpack(signed: tuple, tmp_path: Path) -> None:
    manifest, file, key = signed
    again = ReleaseManifest.from_cbor(manifest.to_cbor())
    assert again == manifest
    again.verify(key.public_key())
    unpack(again, file, tmp_path / "out")
    assert (tmp_path / "out" / "edge_agent-9.9-py3-none-any.whl").read_bytes() == b"agent wheel"


def test_packing_is_reproducible(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    pack(bundle, tmp_path / "1.tar")
    pack(bundle, tmp_path / "2.tar")
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()


def test_wrong_key_is_refused(signed: tuple) -> None:
    manifest, _, _ = signed
    with pytest.raises(ReleaseError, match="does not verify with the release public key"):
        manifest.verify(Ed25519PrivateKey.generate().public_key())


def test_altered_manifest_is_refused(signed: tuple) -> None:
    manifest, _, key = signed
    forged = ReleaseManifest(
        "9.9", manifest.size, "00" * 32, manifest.bundle, manifest.signature, manifest.key
    )
    with pytest.raises(ReleaseError, match="does not verify"):
        forged.verify(key.public_key())


def test_model_signature_cannot_pass_for_a_release(signed: tuple) -> None:
    """Key roles: a model manifest's signature over the same bytes is another context."""
    manifest, file, key = signed
    model = SignedManifest.sign("edge-agent", "9.9", file.read_bytes(), {}, key)
    as_release = ReleaseManifest(
        "9.9", manifest.size, manifest.sha256, manifest.bundle, model.signature, model.key
    )
    with pytest.raises(ReleaseError, match="does not verify"):
        as_release.verify(key.public_key())


def test_tampered_file_is_refused(signed: tuple, tmp_path: Path) -> None:
    manifest, file, _ = signed
    data = bytearray(file.read_bytes())
    data[600] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="is not the signed file"):
        check_file(manifest, file)
    with pytest.raises(ReleaseError, match="is not the signed file"):
        unpack(manifest, file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("member", ["../evil.whl", "sitecustomize.py", "dir/x.whl"])
def test_smuggled_member_is_refused(signed: tuple, tmp_path: Path, member: str) -> None:
    """A signer's bundle with a path or an unlisted file (signed, so only the listing guards)."""
    manifest, file, key = signed
    with tarfile.open(file, "a") as tar:
        info = tarfile.TarInfo(member)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    resigned = ReleaseManifest.sign("9.9", file, manifest.bundle, key)
    with pytest.raises(ReleaseError, match="unexpected member"):
        unpack(resigned, file, tmp_path / "out")
    assert not (tmp_path / "evil.whl").exists()


def test_malformed_manifest_is_refused() -> None:
    with pytest.raises(ReleaseError, match="malformed"):
        ReleaseManifest.from_cbor(b"\xa1\x01\x02")

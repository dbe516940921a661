"""Signed releases (agent/ota/release.py): the manifest signs the packed bundle; a tampered
file, a wrongly signed manifest, a model key used as a release key, a bundle that smuggles a
member or a path, are each refused before anything is installed."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import cbor2
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


@pytest.mark.parametrize(
    "staged",
    [
        {"version": "../../victim"},  # was: the root helper removed DATA/../victim.manifest
        {"version": "/etc/victim"},
        {"version": ["1.0"]},
        [],
        "[" * 5000 + "]" * 5000,
        '{"version": "2.',
    ],
)
def test_apply_staged_refuses_a_staged_file_that_names_no_release(
    tmp_path: Path, staged: object, caplog: pytest.LogCaptureFixture
) -> None:
    """staged.json is the unprivileged agent's file, read by the root helper: its version names
    the paths the helper reads and removes, so only a release name is taken. Anything else is
    said in one line and the file removed; nothing outside DATA/ota is touched."""
    from agent.ota.updater import OTA_DIR, STAGED_FILE, apply_staged

    data = tmp_path / "data"
    (data / OTA_DIR).mkdir(parents=True)
    victims = [tmp_path / "victim.manifest", tmp_path / "victim.release"]
    for v in victims:
        v.write_text("keep")
    text = staged if isinstance(staged, str) else json.dumps(staged)
    (data / OTA_DIR / STAGED_FILE).write_text(text)
    key = Ed25519PrivateKey.generate().public_key()
    assert apply_staged(tmp_path / "opt", data, key) is None
    assert all(v.read_text() == "keep" for v in victims)
    assert not (data / OTA_DIR / STAGED_FILE).exists()
    assert "event=release_staged_unreadable" in caplog.text
    assert not (tmp_path / "opt").exists()  # the release root untouched


def test_the_reported_update_takes_only_plain_known_fields_of_update_json(tmp_path: Path) -> None:
    """update.json's outcome goes into the reported state and is compared by time; a damaged
    one (a string time was a TypeError in every report) gives its plain known fields only."""
    from agent.ota.bootcheck import STATE_FILE
    from agent.ota.updater import report

    root = tmp_path / "opt"
    root.mkdir()
    outcome = {"version": "2.0", "result": "refused", "at": "x", "reason": {"a": [1]}, "z": 1}
    (root / STATE_FILE).write_text(json.dumps({"pending": ["2.0"], "outcome": outcome}))
    assert report(root) == {
        "version": None,
        "pending": None,
        "outcome": {"version": "2.0", "result": "refused"},
    }
    (root / STATE_FILE).write_text(json.dumps({"outcome": "x"}))
    assert report(root)["outcome"] is None


# -- a signed bundle cannot write outside its directory ----------------------------------------


def signed_tar(
    tmp_path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], listing: dict[str, str]
) -> tuple[ReleaseManifest, Path]:
    """A release file of ``members`` (name and bytes, or a TarInfo without data) and a signed
    manifest whose listing is ``listing``: the signer's word, so only unpack's checks guard."""
    file = tmp_path / "hostile.tar"
    with tarfile.open(file, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            info = tarfile.TarInfo(member[0])
            info.size = len(member[1])
            tar.addfile(info, io.BytesIO(member[1]))
    bundle = {"project": "a.whl", "pip": "pip-1.whl", "files": listing}
    return ReleaseManifest.sign("6.6", file, bundle, Ed25519PrivateKey.generate()), file


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


WHEELS = {"a.whl": b"a", "pip-1.whl": b"p"}


@pytest.mark.parametrize("where", ["../ESCAPED", "../../ESCAPED", "ABSOLUTE", "sub/../../E"])
def test_attack_a_signed_listing_with_a_path_writes_nothing(tmp_path: Path, where: str) -> None:
    """Was: each listed member was written to ``dest / name`` before the names were checked
    (as root, in the update helper): ``../x`` above the bundle, an absolute path anywhere."""
    outside = tmp_path / "outside" / "ABSOLUTE"
    outside.parent.mkdir()
    name = str(outside) if where == "ABSOLUTE" else where
    evil = b"written outside\n"
    listing = {**{n: sha(d) for n, d in WHEELS.items()}, name: sha(evil)}
    meta = json.dumps({"files": listing}).encode()
    manifest, file = signed_tar(
        tmp_path, [("bundle.json", meta), *WHEELS.items(), (name, evil)], listing
    )
    dest = tmp_path / "opt" / "releases" / "6.6" / "bundle"
    with pytest.raises(ReleaseError, match="bad file name"):
        unpack(manifest, file, dest)
    assert not (tmp_path / "opt").exists()  # refused before anything was made
    assert not outside.exists()
    assert not list(tmp_path.rglob("ESCAPED")) and not list(tmp_path.rglob("E"))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE])
def test_attack_a_listed_name_as_a_link_or_directory_is_refused(
    tmp_path: Path, kind: bytes
) -> None:
    """A member named as a listed wheel but a symlink (to /etc/shadow, say), a hard link or a
    directory: only regular files are written, and nothing before all are checked."""
    listing = {n: sha(d) for n, d in WHEELS.items()}
    link = tarfile.TarInfo("a.whl")
    link.type, link.linkname = kind, "/etc/shadow"
    members = [("bundle.json", json.dumps({"files": listing}).encode()), ("pip-1.whl", b"p"), link]
    manifest, file = signed_tar(tmp_path, members, listing)
    with pytest.raises(ReleaseError, match=r"unexpected member 'a\.whl'"):
        unpack(manifest, file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_attack_a_member_twice_is_refused(tmp_path: Path) -> None:
    """The second copy of a name would replace the first after its check."""
    listing = {n: sha(d) for n, d in WHEELS.items()}
    meta = json.dumps({"files": listing}).encode()
    members = [("bundle.json", meta), *WHEELS.items(), ("a.whl", b"other")]
    manifest, file = signed_tar(tmp_path, members, listing)
    with pytest.raises(ReleaseError, match="appears twice"):
        unpack(manifest, file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("role", ["project", "pip"])
@pytest.mark.parametrize("name", ["../../../usr/lib/pip-evil.whl", ["pip-26.3-py3-none-any.whl"]])
def test_attack_a_wheel_outside_the_listing_is_refused(
    signed: tuple, role: str, name: object
) -> None:
    """install() runs the pip wheel and installs the project wheel by these names."""
    manifest, file, key = signed
    bundle = {**manifest.bundle, role: name}
    resigned = ReleaseManifest.sign("9.9", file, bundle, key)
    with pytest.raises(ReleaseError, match=f"its {role} wheel is not in the signed listing"):
        unpack(resigned, file, file.parent / "out")
    assert not (file.parent / "out").exists()


# -- hostile manifests are refusals, whatever the decoder raises ---------------------------------


def manifest_bytes(bundle: object, value_sharing: bool = False, **fields: object) -> bytes:
    """An unsigned manifest of release 3.0 with ``bundle`` (and ``fields`` over the others)."""
    doc = {"version": "3.0", "size": 1, "sha256": "00" * 32, "bundle": bundle}
    doc.update(signature=b"\0" * 64, key="", **fields)
    return cbor2.dumps(doc, value_sharing=value_sharing)


def cyclic_bundle() -> dict:
    files: dict = {"a.whl": "00" * 32}
    bundle = {"files": files}
    files["loop"] = bundle
    return bundle


SHARED: dict = {"a.whl": "00" * 32}


@pytest.mark.parametrize(
    "data",
    [
        manifest_bytes(cyclic_bundle(), value_sharing=True),  # tags 28/29: contains itself
        manifest_bytes({"files": SHARED, "copy": SHARED}, value_sharing=True),  # shared
        manifest_bytes({"files": {}}, size=2**70),  # a bignum (tag 2)
        manifest_bytes({"files": {}, "x": cbor2.CBORTag(1234, [1])}),
        manifest_bytes({"files": {}, "x": cbor2.undefined}),
        manifest_bytes({"files": {}}) + b"\x00",  # trailing bytes
        b"\x81" * 1000 + b"\x00",  # nested deep
    ],
    ids=["cyclic", "shared", "bignum", "tag", "undefined", "trailing", "deep"],
)
def test_attack_a_hostile_manifest_is_a_refusal(data: bytes) -> None:
    """Was: the cyclic manifest decoded, and verify() re-encoding it raised
    CBOREncodeValueError (a ValueError, not a refusal): the agent's update stage died."""
    with pytest.raises(ReleaseError, match="malformed release manifest"):
        ReleaseManifest.from_cbor(data)


def test_attack_verify_of_an_unencodable_bundle_is_a_refusal() -> None:
    """Whatever the decoder lets through, the signature check refuses instead of raising
    another kind of error: a cyclic bundle, a value CBOR has no encoding for."""
    key = Ed25519PrivateKey.generate().public_key()
    files: dict = {"a.whl": "00" * 32}
    files["loop"] = files
    for bundle in ({"files": files}, {"files": {}, "x": object()}):
        manifest = ReleaseManifest("3.0", 1, "00" * 32, bundle, b"\0" * 64)
        with pytest.raises(ReleaseError, match="refused"):
            manifest.verify(key)
    with pytest.raises(ReleaseError, match="does not verify"):
        ReleaseManifest("3.0", 1, "00" * 32, {"files": {}}, b"short").verify(key)

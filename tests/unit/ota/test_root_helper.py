"""The root helper against the agent's data directory (agent/ota/updater.py apply_staged,
agent/ota/release.py, agent/ota/compat.py, agent/ota/bootcheck.py): the agent (edge-agent, which
may be compromised) owns DATA and DATA/ota, so every file root reads there may be a link, a FIFO,
a huge sparse file, or swapped between the check and the use. Each test plants one directly (the
tests run as root or as one user: no second user is needed to plant a file) and names the
attack. A FIFO must not park the helper: it is opened without blocking, and each test has a
timeout should it not be."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.ota import bootcheck, compat, release, updater
from agent.ota.release import ReleaseError, ReleaseManifest, pack, unpack

pytestmark = pytest.mark.timeout(20)

KEY = Ed25519PrivateKey.generate()
PROJECT = "edge_agent-9.9-py3-none-any.whl"
PIP = "pip-26.3-py3-none-any.whl"
REPO = Path(__file__).resolve().parents[3]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_bundle(directory: Path, pip: str = PIP) -> Path:
    directory.mkdir()
    wheels = {PROJECT: b"agent wheel", pip: b"pip wheel"}
    for name, data in wheels.items():
        (directory / name).write_bytes(data)
    meta = {"arch": "x86_64", "python": "3.11", "project": PROJECT, "pip": pip}
    meta["files"] = {name: sha(data) for name, data in wheels.items()}
    (directory / "bundle.json").write_text(json.dumps(meta))
    return directory


def signed_release(tmp_path: Path, pip: str = PIP) -> tuple[ReleaseManifest, bytes]:
    out = tmp_path / "release.tar"
    meta = pack(make_bundle(tmp_path / "bundle", pip), out)
    return ReleaseManifest.sign("9.9", out, meta, KEY), out.read_bytes()


def stage(data: Path, m: ReleaseManifest, file: bytes) -> Path:
    """What the agent leaves for the root helper (updater.stage's files); DATA/ota."""
    ota = data / updater.OTA_DIR
    ota.mkdir(parents=True, exist_ok=True)
    (ota / f"{m.version}.release").write_bytes(file)
    (ota / f"{m.version}.manifest").write_bytes(m.to_cbor())
    (ota / updater.STAGED_FILE).write_text(json.dumps({"version": m.version}))
    return ota


def outcome(root: Path) -> dict:
    return json.loads((root / bootcheck.STATE_FILE).read_text())["outcome"]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    root, data = tmp_path / "opt", tmp_path / "data"
    root.mkdir()
    data.mkdir()
    return root, data


# -- blocking and unbounded reads (finding 4) ---------------------------------------------------


@pytest.mark.timeout(10)
def test_attack_a_fifo_as_staged_json_does_not_park_the_root_helper(
    dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Was: a blocking open(): the helper waited for a writer until TimeoutStartSec."""
    root, data = dirs
    (data / "ota").mkdir()
    os.mkfifo(data / "ota" / "staged.json")
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert "event=release_staged_unreadable" in caplog.text and "not a regular file" in caplog.text
    assert not os.path.lexists(data / "ota" / "staged.json")


@pytest.mark.timeout(60)
def test_attack_a_huge_sparse_manifest_is_not_read_whole(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Was: the whole file read before the MAX_MANIFEST_BYTES check: 3 GiB of a sparse file
    (no disk for the agent) in root's memory, a MemoryError on a 1 GiB device. The helper runs
    as on such a device: its address space limited to 1 GiB."""
    root, data = dirs
    ota = data / "ota"
    ota.mkdir()
    (ota / "staged.json").write_text(json.dumps({"version": "9.9"}))
    with open(ota / "9.9.manifest", "wb") as f:
        f.truncate(3 << 30)
    pub = tmp_path / "release.pub"
    pub.write_bytes(KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    code = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from agent.ota import updater
        sys.exit(updater.main(["apply", "--root", {str(root)!r}, "--data-dir", {str(data)!r},
                               "--public-key", {str(pub)!r}]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == 0, proc.stderr[-500:]
    assert "more than 65536 bytes" in outcome(root)["reason"]
    assert not list(ota.iterdir())


# -- links in DATA ------------------------------------------------------------------------------


def test_attack_a_linked_ota_directory_is_neither_read_nor_cleaned_through(
    dirs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DATA/ota a link to a directory of root's: was read through, and root removed the files
    there named like the staged ones (``staged.json``, ``V.release``, ``V.manifest``)."""
    root, data = dirs
    m, file = signed_release(tmp_path)
    elsewhere = stage(tmp_path / "roots-own", m, file)
    (data / "ota").symlink_to(elsewhere)
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert "event=release_staged_unreadable" in caplog.text
    assert sorted(p.name for p in elsewhere.iterdir()) == [
        "9.9.manifest",
        "9.9.release",
        "staged.json",
    ]
    assert (data / "ota").is_symlink()
    assert not (root / bootcheck.RELEASES).exists()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("plant", "reason"),
    [("fifo", "not a regular file"), ("link", "Too many levels of symbolic links")],
)
def test_attack_a_manifest_that_is_a_fifo_or_a_link_is_refused_not_read(
    dirs: tuple[Path, Path], tmp_path: Path, plant: str, reason: str
) -> None:
    """Was: ``(ota / V.manifest).read_bytes()``: a FIFO parked the root helper until
    TimeoutStartSec; a link was followed (a root-only file read as the agent's manifest, here
    the genuine one). Refused, only the planted entry removed, nothing installed."""
    root, data = dirs
    m, file = signed_release(tmp_path)
    ota = stage(data, m, file)
    target = tmp_path / "roots-file"
    target.write_bytes(m.to_cbor())
    (ota / "9.9.manifest").unlink()
    if plant == "fifo":
        os.mkfifo(ota / "9.9.manifest")
    else:
        (ota / "9.9.manifest").symlink_to(target)
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert outcome(root)["result"] == "refused"
    assert reason in outcome(root)["reason"]  # ELOOP for the link: not followed
    assert not (root / bootcheck.RELEASES / "9.9").exists()  # nothing installed from it
    assert target.read_bytes() == m.to_cbor()
    assert not list(ota.iterdir())


def test_attack_a_hard_link_to_a_file_elsewhere_is_not_read(dirs: tuple[Path, Path]) -> None:
    """With fs.protected_hardlinks off the agent can link a file of root's into DATA: a file
    with a second name is not read as the agent's."""
    _root, data = dirs
    (data / "ota").mkdir()
    outside = data.parent / "roots-staged.json"
    outside.write_text(json.dumps({"version": "9.9"}))
    os.link(outside, data / "ota" / "staged.json")
    with pytest.raises(OSError, match="another name"):
        bootcheck.read_data(data, "ota/staged.json", 100)


def test_attack_a_linked_ota_directory_is_no_ready_marker_and_is_not_cleaned_through(
    tmp_path: Path,
) -> None:
    """bootcheck reads the READY marker and removes it at a switch, as root."""
    root, data = tmp_path / "opt", tmp_path / "data"
    for version in ("1.0", "2.0"):
        (root / bootcheck.RELEASES / version).mkdir(parents=True)
        bootcheck.mark_complete(root, version)
    bootcheck.set_link(root, bootcheck.CURRENT, "releases/1.0")
    elsewhere = tmp_path / "roots-own"
    elsewhere.mkdir()
    (elsewhere / "ready-2.0").write_text("2.0\n")
    data.mkdir()
    (data / "ota").symlink_to(elsewhere)
    with pytest.raises(OSError):
        bootcheck.switch(root, "2.0", data_dir=data)
    assert (elsewhere / "ready-2.0").exists()
    assert not bootcheck.is_ready(data, {}, "2.0")


# -- the data format check, run as root (compat.py) --------------------------------------------


def secret_db(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("PRAGMA user_version = 31337")
    conn.commit()
    conn.close()
    os.chmod(path, 0o600)
    return path


def record_queue(data: Path, queue: str) -> None:
    (data / compat.FORMATS_FILE).write_text(json.dumps({"formats": {}, "queue": queue}))


@pytest.mark.timeout(10)
def test_attack_formats_json_naming_a_fifo_as_the_queue_does_not_park_root(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "q.fifo")
    record_queue(tmp_path, str(tmp_path / "q.fifo"))
    assert compat.problems(tmp_path) == []
    (tmp_path / compat.FORMATS_FILE).unlink()
    os.mkfifo(tmp_path / compat.FORMATS_FILE)
    assert compat.problems(tmp_path) == []  # formats.json itself a FIFO
    assert compat.main(["--data-dir", str(tmp_path)]) == 0


@pytest.mark.parametrize("how", ["outside", "link", "relative"])
def test_attack_formats_json_naming_a_file_outside_data_leaks_nothing(
    tmp_path: Path, how: str
) -> None:
    """Was: root opened the path the agent wrote in formats.json, anywhere, and the schema
    version of a root-only SQLite file came back in the refusal's reason (reported upward)."""
    data = tmp_path / "data"
    data.mkdir()
    secret = secret_db(tmp_path / "root-only.db")
    if how == "link":
        (data / "q.db").symlink_to(secret)
        record_queue(data, str(data / "q.db"))
    else:
        record_queue(data, str(secret) if how == "outside" else "../root-only.db")
    said = compat.problems(data)
    assert said == [] and "31337" not in "".join(said)
    assert compat.main(["--data-dir", str(data)]) == 0


# -- the release file: swapped after the check, sparse members (finding 5) ---------------------


def sparse_tar(tmp_path: Path, fmt: str, name: str, size: int, extra: dict[str, bytes]) -> Path:
    """A tar (GNU tar's own sparse encoding, ``gnu`` or ``posix``) with ``name`` a sparse file of
    ``size`` bytes (a few kB in the tar) beside the ``extra`` files."""
    src = tmp_path / f"sparse-{fmt}"
    src.mkdir()
    with open(src / name, "wb") as f:
        f.truncate(size)
    for member, data in extra.items():
        (src / member).write_bytes(data)
    out = tmp_path / f"sparse-{fmt}.tar"
    names = sorted([name, *extra])
    cmd = ["tar", "-S", f"--format={fmt}", "-cf", str(out), "-C", str(src), *names]
    subprocess.run(cmd, check=True)
    return out


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_attack_a_signed_sparse_member_is_refused_and_nothing_is_left(
    tmp_path: Path, fmt: str
) -> None:
    """Was: a sparse member (4 MiB from a few kB) written whole; its listed SHA-256 (of the
    zeros) matched, so it was taken. A member holds no more than the signed file."""
    size = 4 << 20
    listing = {PROJECT: sha(bytes(size)), PIP: sha(b"pip wheel")}
    meta = json.dumps({"files": listing}).encode()
    out = sparse_tar(tmp_path, fmt, PROJECT, size, {"bundle.json": meta, PIP: b"pip wheel"})
    assert out.stat().st_size < size // 4
    bundle = {"project": PROJECT, "pip": PIP, "files": listing}
    m = ReleaseManifest.sign("6.6", out, bundle, KEY)
    dest = tmp_path / "opt" / "releases" / "6.6" / "bundle"
    with pytest.raises(ReleaseError, match="is a sparse file"):
        unpack(m, out, dest)
    assert not dest.exists()


def test_a_bundle_that_differs_after_extraction_leaves_nothing(tmp_path: Path) -> None:
    """Was: a refusal after the members were written left them in the release root."""
    listing = {PROJECT: sha(b"the signed agent wheel"), PIP: sha(b"pip wheel")}
    out = tmp_path / "r.tar"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("bundle.json", json.dumps({"files": listing}).encode()),
            (PROJECT, b"another agent wheel"),
            (PIP, b"pip wheel"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    m = ReleaseManifest.sign("6.6", out, {"project": PROJECT, "pip": PIP, "files": listing}, KEY)
    dest = tmp_path / "bundle"
    with pytest.raises(ReleaseError, match="does not match"):
        unpack(m, out, dest)
    assert not dest.exists()


@pytest.mark.timeout(60)
def test_attack_the_release_file_swapped_after_the_check_is_never_unpacked(
    dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the file was hashed by path, then opened again by path for the tar: the agent
    swapped in a tar of its own (here a 64 MiB sparse member of an allowed name) and root wrote
    it into the release root, where the refused partial stayed. Now root unpacks its own copy,
    checked as it was copied. The swap runs where it did (deterministically): as the tar is
    opened. The genuine release's pip wheel is misnamed so the install stops right after the
    unpack (no venv, no pip)."""
    root, data = dirs
    m, file = signed_release(tmp_path, pip="xpip-26.3-py3-none-any.whl")
    ota = stage(data, m, file)
    evil = sparse_tar(tmp_path, "gnu", PROJECT, 64 << 20, {})
    real_open = tarfile.open
    swapped = []

    def racing_open(*args: object, **kwargs: object) -> tarfile.TarFile:
        if evil.exists():
            os.replace(evil, ota / "9.9.release")  # the agent's move, in the window
            swapped.append(True)
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(release.tarfile, "open", racing_open)
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert swapped
    assert "the bundle has no pip wheel" in outcome(root)["reason"]  # the genuine one unpacked
    assert not (root / bootcheck.RELEASES / "9.9").exists()  # the refused install removed
    assert not (root / updater.TAKEN_FILE).exists()
    big = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size > len(file)]
    assert big == []


# -- no room on the device: waiting, not a refusal -----------------------------------------------


def test_pip_or_venv_saying_no_space_is_not_a_refusal() -> None:
    """pip and venv report a full disk in their output; any other failure is still refused."""
    from agent.errors import NotNow
    from agent.ota.install import _run

    full = "import sys; sys.stderr.write('OSError: [Errno 28] No space left on device\\n'); exit(1)"
    with pytest.raises(NotNow, match="No space left on device; tried again later"):
        _run([sys.executable, "-c", full], "9.9", "pip install")
    other = "import sys; sys.stderr.write('ERROR: No matching distribution found\\n'); exit(1)"
    with pytest.raises(ReleaseError, match="pip install failed: ERROR: No matching distribution"):
        _run([sys.executable, "-c", other], "9.9", "pip install")


def test_a_full_disk_that_cannot_take_the_outcome_either_is_said_not_raised(
    dirs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ENOSPC during the copy, then again writing update.json: logged, no traceback, nothing
    left in the release root; the agent sees no outcome and stages the release again from the
    file kept in DATA/ota (test_stage.py)."""
    import errno

    root, data = dirs
    m, file = signed_release(tmp_path)
    stage(data, m, file)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_room(*args: object) -> None:
        raise full

    monkeypatch.setattr(updater, "take", no_room)
    monkeypatch.setattr(bootcheck, "save", no_room)
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert "event=release_waiting version=9.9" in caplog.text
    assert "event=release_outcome_unsaved version=9.9" in caplog.text
    assert not (data / updater.OTA_DIR / updater.STAGED_FILE).exists()
    assert not (root / bootcheck.RELEASES / "9.9").exists()


@pytest.mark.parametrize("full_at", ["take", "install"])
def test_no_room_keeps_the_checked_file_and_manifest_for_the_next_try(
    dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full_at: str
) -> None:
    """Was: whatever the outcome, the staged file and its manifest were removed (the file right
    after root's copy of it): the agent then fetched the whole release again for every retry.
    Now a ``waiting`` (ENOSPC copying it or installing it) leaves them in DATA/ota as they were,
    takes staged.json (the helper is not started again until the agent stages it) and leaves
    nothing in the release root; a refusal still removes them (the tests above)."""
    import errno

    root, data = dirs
    m, file = signed_release(tmp_path)
    ota = stage(data, m, file)

    def no_room(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(updater, full_at, no_room)
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert outcome(root)["result"] == "waiting"
    assert sorted(p.name for p in ota.iterdir()) == ["9.9.manifest", "9.9.release"]
    assert (ota / "9.9.release").read_bytes() == file
    assert (ota / "9.9.manifest").read_bytes() == m.to_cbor()
    assert not (root / updater.TAKEN_FILE).exists()
    assert not (root / bootcheck.RELEASES / "9.9").exists()


def install_without_room(ota: Path, seen: list[bool]) -> object:
    """An install (updater.install) that runs out of room, noting whether the agent's file was
    still in DATA/ota meanwhile."""
    import errno

    def install(*args: object, **kwargs: object) -> None:
        seen.append(os.path.lexists(ota / "9.9.release"))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return install


@pytest.mark.parametrize("one", [True, False], ids=["one_filesystem", "two_filesystems"])
def test_no_room_on_one_filesystem_frees_the_file_during_the_install_and_gives_it_back(
    dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one: bool
) -> None:
    """Was (since the helper kept the file for ``waiting``): the agent's checked file stayed in
    DATA/ota during the whole install (unpack, venv, pip), on the usual device on the release
    root's filesystem: a release that just fitted before no longer did, and was ``waiting``
    for good. Now, on one filesystem, it is removed as soon as root's checked copy is made and
    that copy is renamed back (the agent's mode, the data directory's owner) when the install
    has no room; on two filesystems it stays during the install, untouched."""
    root, data = dirs
    m, file = signed_release(tmp_path)
    ota = stage(data, m, file)
    (ota / "9.9.release").chmod(0o640)
    before = (ota / "9.9.release").stat()
    owner = (4242, 4243) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    if os.geteuid() == 0:
        os.chown(data, *owner)  # the agent's data directory (edge-agent's on a device)
    if not one:
        monkeypatch.setattr(updater, "one_filesystem", lambda *args: False)
    seen: list[bool] = []
    monkeypatch.setattr(updater, "install", install_without_room(ota, seen))
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert seen == [not one]  # during the install: freed on one filesystem only
    assert outcome(root)["result"] == "waiting"
    assert sorted(p.name for p in ota.iterdir()) == ["9.9.manifest", "9.9.release"]
    kept = (ota / "9.9.release").stat()
    assert (ota / "9.9.release").read_bytes() == file
    assert kept.st_mode & 0o7777 == 0o640
    if one:
        assert (kept.st_uid, kept.st_gid) == owner
    else:
        assert (kept.st_ino, kept.st_uid) == (before.st_ino, before.st_uid)  # never moved
    assert not (root / updater.TAKEN_FILE).exists()
    assert not (root / bootcheck.RELEASES / "9.9").exists()


def test_attack_a_linked_ota_directory_planted_during_the_install_gets_no_file(
    dirs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent, while root installs, makes DATA/ota a link to a directory of its choosing,
    where root's copy given back would land (root writing where the agent says). It is not
    followed: the copy is not given back, that is said (no traceback), the outcome is
    ``waiting`` as before and the agent fetches the release again (test_stage.py)."""
    root, data = dirs
    m, file = signed_release(tmp_path)
    ota = stage(data, m, file)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    no_room = install_without_room(ota, [])

    def install(*args: object, **kwargs: object) -> None:
        ota.rename(data / "moved")
        ota.symlink_to(elsewhere)
        no_room()  # type: ignore[operator]

    monkeypatch.setattr(updater, "install", install)
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert outcome(root)["result"] == "waiting"
    assert "event=release_kept_lost version=9.9" in caplog.text
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in (data / "moved").iterdir()) == ["9.9.manifest", "staged.json"]
    assert not (root / updater.TAKEN_FILE).exists()


# -- a power cut during the install (one filesystem: the agent's file already freed) -------------


def cut_in_the_install(root: Path, data: Path) -> None:
    """The real root helper runs (in a child process) until its install has half built
    ``releases/9.9``, and the power goes: the process dies there, SIGKILLed, so no handler and
    no ``finally`` of the helper runs. What it wrote is left as the cut leaves it (the copy it
    made durable; tests/chaos/test_ota_powercut.py cuts a real filesystem)."""

    def run() -> None:
        def install(root: Path, manifest: ReleaseManifest, file: Path, **kwargs: object) -> None:
            (root / bootcheck.RELEASES / manifest.version / "bundle").mkdir(parents=True)
            os.kill(os.getpid(), signal.SIGKILL)  # unpacking, say: minutes in

        updater.install = install  # type: ignore[assignment]
        updater.apply_staged(root, data, KEY.public_key())

    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    child.join(15)
    assert child.exitcode == -signal.SIGKILL


def boot_install(seen: list[bytes]) -> object:
    """The install of the helper's next run: the real unpack (every member against its signed
    SHA-256) of the file it is given, COMPLETE, no venv or pip; notes the file's bytes."""

    def install(root: Path, manifest: ReleaseManifest, file: Path, **kwargs: object) -> Path:
        seen.append(file.read_bytes())
        rel = root / bootcheck.RELEASES / manifest.version
        assert not rel.exists() or not bootcheck.is_complete(root, manifest.version)
        if rel.exists():
            shutil.rmtree(rel)  # as install.install does with an interrupted one
        unpack(manifest, file, rel / "bundle")
        bootcheck.mark_complete(root, manifest.version)
        return rel

    return install


def next_boot_installs(
    root: Path, data: Path, file: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper's run at the next boot, after a cut during the install (``staged.json``
    and the manifest left, the agent's file gone, a half-built release): it installs root's
    copy, the signed file, and switches to it; nothing of the staging is left."""
    ota = data / updater.OTA_DIR
    assert sorted(p.name for p in ota.iterdir()) == ["9.9.manifest", "staged.json"]
    assert not bootcheck.is_complete(root, "9.9")  # half built, never switched to
    seen: list[bytes] = []
    monkeypatch.setattr(updater, "install", boot_install(seen))
    monkeypatch.setattr(updater, "_check_data", lambda *args: None)  # no venv to ask
    assert updater.apply_staged(root, data, KEY.public_key()) == "9.9"
    assert seen == [file]
    assert bootcheck.link_version(root, bootcheck.CURRENT) == "9.9"
    assert bootcheck.load(root)["pending"] == "9.9"
    assert "outcome" not in bootcheck.load(root)  # no refusal, no waiting
    assert list(ota.iterdir()) == []
    assert not (root / updater.TAKEN_FILE).exists()


def test_power_cut_during_the_install_resumes_from_roots_checked_copy(
    dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the helper had removed the agent's ``DATA/ota/9.9.release`` once its own copy was
    made (one filesystem); the cut came during the install; at the next boot the path unit
    started the helper again (``staged.json`` is removed only at the end), which could not
    open the agent's file and recorded ``refused``: a good release never tried again on this
    device. Now it goes on from root's copy, checked again against the signed manifest."""
    root, data = dirs
    m, file = signed_release(tmp_path)
    stage(data, m, file)
    cut_in_the_install(root, data)
    assert (root / updater.TAKEN_FILE).read_bytes() == file
    next_boot_installs(root, data, file, monkeypatch)


@pytest.mark.parametrize("copy", ["lost", "torn"])
def test_power_cut_that_lost_roots_copy_is_waiting_for_the_agent_not_refused(
    dirs: tuple[Path, Path], tmp_path: Path, copy: str
) -> None:
    """The same cut, root's copy lost with it or torn (its unsynced pages never reached the
    card): nothing is installed from it, the half-built release is removed, and the outcome is
    ``waiting`` saying the staged file is missing (the agent stages it again: test_stage.py),
    never ``refused``."""
    root, data = dirs
    m, file = signed_release(tmp_path)
    ota = stage(data, m, file)
    cut_in_the_install(root, data)
    taken = root / updater.TAKEN_FILE
    if copy == "lost":
        taken.unlink()
    else:
        taken.write_bytes(file[:512] + bytes(len(file) - 512))
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    said = outcome(root)
    assert said["result"] == "waiting", said
    assert said["cause"] == updater.STAGED_FILE_MISSING
    assert "9.9.release is missing" in said["reason"]
    assert not (root / bootcheck.RELEASES / "9.9").exists()
    assert not taken.exists()
    assert sorted(p.name for p in ota.iterdir()) == ["9.9.manifest"]  # staged.json taken


def test_attack_a_release_file_altered_in_data_after_the_cut_is_not_installed(
    dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the cut, while root's copy is good, the agent puts an altered ``9.9.release`` back
    in DATA/ota (the agent may be compromised): it is checked like any staged file and
    refused; neither it nor anything else is installed."""
    root, data = dirs
    m, file = signed_release(tmp_path)
    ota = stage(data, m, file)
    cut_in_the_install(root, data)
    altered = bytearray(file)
    altered[600] ^= 0x01
    (ota / "9.9.release").write_bytes(bytes(altered))
    seen: list[bytes] = []
    monkeypatch.setattr(updater, "install", boot_install(seen))
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert seen == []
    assert outcome(root)["result"] == "refused"
    assert "is not the signed file" in outcome(root)["reason"]
    assert not (root / bootcheck.RELEASES / "9.9").exists()
    assert not (root / updater.TAKEN_FILE).exists()
    assert list(ota.iterdir()) == []


def test_power_cut_with_a_bad_manifest_is_still_refused(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Root's good copy does not rescue a manifest that fails its signature: refused."""
    root, data = dirs
    m, file = signed_release(tmp_path)
    ota = stage(data, m, file)
    cut_in_the_install(root, data)
    other = Ed25519PrivateKey.generate()
    forged = ReleaseManifest.sign("9.9", tmp_path / "release.tar", m.bundle, other)
    (ota / "9.9.manifest").write_bytes(forged.to_cbor())
    assert updater.apply_staged(root, data, KEY.public_key()) is None
    assert outcome(root)["result"] == "refused"
    assert not (root / bootcheck.RELEASES / "9.9").exists()
    assert not (root / updater.TAKEN_FILE).exists()


# -- a power cut after the switch, before the helper's cleanup ------------------------------------


def cut_after_the_switch(root: Path, data: Path, at: str) -> None:
    """The real root helper runs (in a child process) through its install and the switch to
    9.9, and the power goes before its cleanup is done: at ``switched`` (nothing removed), or
    as it is about to remove ``at`` (root's copy and the files before ``at`` already gone)."""

    def run() -> None:
        real_switch, real_remove = bootcheck.switch, bootcheck.remove_data

        def switch(*args: object, **kwargs: object) -> None:
            real_switch(*args, **kwargs)  # type: ignore[arg-type]
            if at == "switched":
                os.kill(os.getpid(), signal.SIGKILL)

        def remove_data(data_dir: Path, relative: str) -> bool:
            if relative == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_remove(data_dir, relative)

        bootcheck.switch = switch  # type: ignore[assignment]
        bootcheck.remove_data = remove_data  # type: ignore[assignment]
        updater.install = boot_install([])  # type: ignore[assignment]
        updater._check_data = lambda *args: None  # type: ignore[assignment]  # no venv to ask
        updater.apply_staged(root, data, KEY.public_key())

    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    child.join(15)
    assert child.exitcode == -signal.SIGKILL


@pytest.mark.parametrize(
    ("at", "left"),
    [
        ("switched", ["9.9.manifest", "staged.json"]),  # and root's copy
        ("ota/9.9.manifest", ["9.9.manifest", "staged.json"]),
        ("ota/staged.json", ["staged.json"]),
    ],
)
def test_power_cut_after_the_switch_only_cleans_up_at_the_next_boot(
    dirs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    at: str,
    left: list[str],
) -> None:
    """Was: ``staged.json`` (removed last) survived a cut after the switch, so at the next boot
    the path unit started the helper again, and it recorded an outcome for 9.9, which is
    ``current`` and pending its health check: ``refused`` ("release 9.9 is already current",
    bootcheck.switch) while root's copy was there, or with the manifest gone; ``waiting``
    (staged_file_missing) with the copy gone. Hidden by ``pending`` until overwritten, but a
    wrong record, written into update.json beside the boot counter's own writes. Now that run
    only removes what is left of the staging; update.json is not written, no restart is asked
    for (None), and the boot counter goes on as before: here to a rollback."""
    caplog.set_level(logging.INFO, logger=updater.__name__)
    root, data = dirs
    (root / bootcheck.RELEASES / "1.0").mkdir(parents=True)
    bootcheck.mark_complete(root, "1.0")
    bootcheck.set_link(root, bootcheck.CURRENT, "releases/1.0")
    bootcheck.save(root, {"outcome": {"version": "1.0", "result": "updated", "at": 1.0}})
    m, file = signed_release(tmp_path)
    ota = stage(data, m, file)
    cut_after_the_switch(root, data, at)
    assert sorted(p.name for p in ota.iterdir()) == left
    assert (root / updater.TAKEN_FILE).exists() == (at == "switched")
    assert bootcheck.link_version(root, bootcheck.CURRENT) == "9.9"
    state = bootcheck.load(root)
    assert state["pending"] == "9.9" and state["outcome"]["version"] == "1.0"
    monkeypatch.setattr(updater, "_check_data", lambda *args: None)  # no venv to ask
    assert updater.apply_staged(root, data, KEY.public_key()) is None  # the next boot's run
    assert bootcheck.load(root) == state  # no outcome of its own, pending as it was
    assert "event=release_leftover_cleaned version=9.9" in caplog.text
    assert list(ota.iterdir()) == []
    assert not (root / updater.TAKEN_FILE).exists()
    assert bootcheck.is_complete(root, "9.9")
    for attempt in (1, 2, 3):  # the boot counter: 9.9 never reaches READY
        assert bootcheck.start(root, data) == "9.9"
        assert bootcheck.load(root)["attempts"] == attempt
    assert bootcheck.start(root, data) == "1.0"
    said = outcome(root)
    assert (said["version"], said["result"], said["restored"]) == ("9.9", "rolled_back", "1.0")

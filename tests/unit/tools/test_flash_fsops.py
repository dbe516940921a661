"""tools/flash_lib/fsops.py LocalFS on a root filesystem directory whose /var/lib/edge-agent belongs
to the agent's user, as on a live device re-flashed as root (``tools/flash dir /`` and the helper
of ``tools/flash ssh``, which is the same LocalFS). The agent's user may be compromised: it plants
links and swaps files in its own directory, and root must never follow them. The tests run as
root in CI (the directory then belongs to uid 4242); the agent's moves are made directly by this
process, what matters is that LocalFS does not follow them. Each checks the file outside (the
target's /etc/passwd) for owner, mode and content afterwards."""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[3] / "tools"
sys.path.insert(0, str(TOOLS))

from flash_lib import fsops  # noqa: E402
from flash_lib.fsops import FsError, LocalFS  # noqa: E402

pytestmark = pytest.mark.timeout(60)

IS_ROOT = os.geteuid() == 0
AGENT = (4242, 4343) if IS_ROOT else (os.getuid(), os.getgid())  # the agent's user and group
PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"
CREDENTIAL = "/var/lib/edge-agent/credential.json"
UNTOUCHED = (os.getuid(), os.getgid(), 0o644, PASSWD)  # the victim's owner, mode and content


@dataclass(frozen=True)
class Tree:
    root: Path
    home: Path  # /var/lib/edge-agent, the agent's
    victim: Path  # /etc/passwd, root's

    def victim_state(self) -> tuple[int, int, int, bytes]:
        st = os.lstat(self.victim)
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), self.victim.read_bytes()


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    root = tmp_path / "rootfs"
    home = root / "var/lib/edge-agent"
    home.mkdir(parents=True)
    os.chown(home, *AGENT)
    victim = root / "etc/passwd"
    victim.parent.mkdir()
    victim.write_bytes(PASSWD)
    victim.chmod(0o644)
    return Tree(root, home, victim)


def test_write_sets_owner_and_mode_on_its_file_not_on_a_symlink_swapped_for_it(
    tree: Tree,
) -> None:
    """Attack: between the temp file's creation and its chmod, the agent's user renames the temp
    file away and puts a symlink to /etc/passwd under its name (was: root chmod 0600 through it)."""

    def chunks() -> Iterator[bytes]:
        yield b'{"format": 1}'
        (tmp,) = [p for p in tree.home.iterdir() if p.name.endswith(".flash-tmp")]
        tmp.rename(tree.home / "moved-away")
        tmp.symlink_to(tree.victim)
        yield b"\n"

    LocalFS(str(tree.root)).write(CREDENTIAL, chunks(), 0o600, *AGENT)
    assert tree.victim_state() == UNTOUCHED
    moved = os.lstat(tree.home / "moved-away")  # the file written, set by its descriptor
    assert (moved.st_uid, moved.st_gid, stat.S_IMODE(moved.st_mode)) == (*AGENT, 0o600)


def test_write_does_not_truncate_a_hard_link_planted_at_the_temp_name(tree: Tree) -> None:
    """Attack (fs.protected_hardlinks=0): a hard link to /etc/passwd at the name the temp file
    had (was: truncated, written, chowned to the agent and renamed into its directory)."""
    os.link(tree.victim, tree.home / "credential.json.flash-tmp")
    LocalFS(str(tree.root)).write(CREDENTIAL, [b'{"format": 1}\n'], 0o600, *AGENT)
    assert tree.victim_state() == UNTOUCHED
    cred = tree.home / "credential.json"
    st = os.lstat(cred)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (*AGENT, 0o600, 1)
    assert cred.read_bytes() == b'{"format": 1}\n'


def test_chmeta_refuses_a_symlink_and_leaves_its_target_alone(tree: Tree) -> None:
    """Attack: credential.json a symlink to /etc/passwd when the flash only fixes its mode."""
    (tree.home / "credential.json").symlink_to(tree.victim)
    with pytest.raises(FsError, match=rf"^{CREDENTIAL}: is a symlink: owner/mode not set; "):
        LocalFS(str(tree.root)).chmeta(CREDENTIAL, 0o600, *AGENT)
    assert tree.victim_state() == UNTOUCHED


def test_chmeta_refuses_a_hard_link_and_a_fifo(tree: Tree) -> None:
    """Attack: credential.json a hard link to /etc/passwd (fs.protected_hardlinks=0), then a
    FIFO (whose open must not block)."""
    fs = LocalFS(str(tree.root))
    cred = tree.home / "credential.json"
    os.link(tree.victim, cred)
    with pytest.raises(FsError, match="has 2 hard links: owner/mode not set"):
        fs.chmeta(CREDENTIAL, 0o600, *AGENT)
    assert tree.victim_state() == UNTOUCHED
    cred.unlink()
    os.mkfifo(cred, 0o644)
    with pytest.raises(FsError, match="not a regular file or a directory: owner/mode not set"):
        fs.chmeta(CREDENTIAL, 0o600, *AGENT)
    assert stat.S_IMODE(os.lstat(cred).st_mode) == 0o644


def test_a_symlink_on_the_way_is_not_followed(tree: Tree) -> None:
    (tree.home / "etc").symlink_to(tree.victim.parent)
    with pytest.raises(OSError) as caught:
        fsops.open_dir_nofollow(str(tree.home / "etc"))
    assert caught.value.errno == errno.ELOOP
    fd = fsops.open_dir_nofollow(str(tree.victim.parent))
    os.close(fd)


def test_the_normal_changes_are_as_asked(tree: Tree) -> None:
    """No one interferes: new and replaced files, a directory, owners and modes (set-id bits kept
    after the chown), a symlink, a removal; nothing left beside them."""
    fs = LocalFS(str(tree.root))
    fs.mkdir("/var/lib/edge-agent/bench", 0o750, *AGENT)
    fs.write(CREDENTIAL, [b"one"], 0o600, *AGENT)
    fs.write(CREDENTIAL, [b"two", b"!"], 0o4750, *AGENT)
    fs.chmeta("/var/lib/edge-agent", 0o700, *AGENT)
    fs.symlink("/var/lib/edge-agent/latest", "credential.json")
    fs.symlink("/var/lib/edge-agent/latest", "bench")
    fs.write("/var/lib/edge-agent/gone", [b""], 0o644, *AGENT)
    fs.remove("/var/lib/edge-agent/gone")
    fs.remove("/var/lib/edge-agent/never-was")

    def meta(p: Path) -> tuple[int, int, int]:
        st = os.lstat(p)
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    cred = tree.home / "credential.json"
    assert cred.read_bytes() == b"two!" and meta(cred) == (*AGENT, 0o4750)
    assert meta(tree.home / "bench") == (*AGENT, 0o750)
    assert meta(tree.home) == (*AGENT, 0o700)
    assert os.readlink(tree.home / "latest") == "bench"
    assert sorted(p.name for p in tree.home.iterdir()) == ["bench", "credential.json", "latest"]
    with pytest.raises(FsError, match=r"^/var/lib/edge-agent/bench: is a directory$"):
        fs.write("/var/lib/edge-agent/bench", [b"x"], 0o644, *AGENT)
    with pytest.raises(FsError, match=r"^/var/lib/nowhere/x: cannot write: No such file"):
        fs.write("/var/lib/nowhere/x", [b"x"], 0o644, *AGENT)
    assert sorted(p.name for p in tree.home.iterdir()) == ["bench", "credential.json", "latest"]
    assert tree.victim_state() == UNTOUCHED

"""The three kinds of target: a root filesystem directory, a Pi OS disk image, a live SSH device.

Each gives the provisioning flow the same things: its root filesystem (a TargetFS), where its
config.txt is (if it is a Pi), what python it runs (architecture and version, for the bundle),
and whether the venv can be built now (``--chroot``, SSH) or waits for the first boot.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flash_lib import image as imagemod
from flash_lib.bundle import host_arch
from flash_lib.errors import FlashError
from flash_lib.fsops import FsError, LocalFS
from flash_lib.plan import TargetFS
from flash_lib.sshfs import Destination, SshFS

ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "armv7l", 0x03: "i686"}
CONFIG_TXT = ("/boot/firmware/config.txt", "/boot/config.txt")
PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class PythonFacts:
    arch: str
    version: str  # "3.11"
    where: str  # how it was found, for messages


class BootConfig(Protocol):
    where: str

    def read(self) -> bytes | None: ...
    def write(self, data: bytes) -> None: ...


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FsError as err:
            raise FlashError(str(err)) from None

    return call


class DirFS:
    """TargetFS for a directory on this machine (fsops.LocalFS)."""

    def __init__(self, root: Path) -> None:
        self.local = LocalFS(str(root))
        self.stat = _wrap(self.local.stat)
        self.read = _wrap(self.local.read)
        self.digest = _wrap(self.local.digest)
        self.listdir = _wrap(self.local.listdir)
        self._mkdir = _wrap(self.local.mkdir)
        self._chmeta = _wrap(self.local.chmeta)
        self._symlink = _wrap(self.local.symlink)
        self._remove = _wrap(self.local.remove)
        self._write = _wrap(self.local.write)

    def write(
        self,
        path: str,
        src: bytes | Path,
        mode: int,
        uid: int,
        gid: int,
        advance: Callable[[int], None],
    ) -> None:
        def chunks() -> Iterator[bytes]:
            if isinstance(src, bytes):
                yield src
                advance(len(src))
                return
            with open(src, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    yield block
                    advance(len(block))

        self._write(path, chunks(), mode, uid, gid)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        self._mkdir(path, mode, uid, gid)

    def chmeta(self, path: str, kind: str, mode: int, uid: int, gid: int) -> None:
        self._chmeta(path, mode, uid, gid)

    def symlink(self, path: str, target: str) -> None:
        self._symlink(path, target)

    def remove(self, path: str) -> None:
        self._remove(path)

    def commit(self) -> None:
        self.local.sync()


class FileInRoot:
    """config.txt as a file of the target's root filesystem (keeps its mode and owner)."""

    def __init__(self, fs: TargetFS, path: str, where: str) -> None:
        self.fs, self.path, self.where = fs, path, where

    def read(self) -> bytes | None:
        return self.fs.read(self.path) if self.fs.stat(self.path) is not None else None

    def write(self, data: bytes) -> None:
        st = self.fs.stat(self.path) or {"mode": 0o644, "uid": 0, "gid": 0}
        self.fs.write(self.path, data, st["mode"], st["uid"], st["gid"], lambda n: None)
        self.fs.commit()


class LocalFile:
    """config.txt in a directory of this machine (a mounted boot partition, ``--boot``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise FlashError(f"{self.path}: cannot read: {err.strerror}") from None

    def write(self, data: bytes) -> None:
        tmp = self.path.with_name(self.path.name + ".flash-tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        except OSError as err:
            raise FlashError(f"{self.path}: cannot write: {err.strerror}") from None


def elf_machine(header: bytes) -> str | None:
    """The architecture of an ELF executable from its first bytes."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    fmt = "<H" if header[5] == 1 else ">H"
    (machine,) = struct.unpack(fmt, header[18:20])
    return ELF_MACHINES.get(machine, f"elf-machine-{machine:#x}")


def resolve_link(fs: TargetFS, path: str) -> str | None:
    """Follow symlinks inside the target; None when the path does not exist."""
    for _ in range(16):
        st = fs.stat(path)
        if st is None:
            return None
        if st["kind"] != "link":
            return path
        target = st["target"]
        path = posixpath.normpath(
            target if target.startswith("/") else posixpath.join(posixpath.dirname(path), target)
        )
    return None


def python_in_root(fs: TargetFS) -> PythonFacts | None:
    """The target's /usr/bin/python3: architecture from its ELF header, version from its name."""
    real = resolve_link(fs, PYTHON)
    if real is None:
        return None
    name = posixpath.basename(real)
    if not name.startswith("python3."):
        return None
    version = name[len("python") :]
    arch = elf_machine(fs.read(real)[:64])
    if arch is None:
        return None
    return PythonFacts(arch, version, f"{real} in the target")


def looks_like_root(fs: TargetFS, label: str) -> None:
    missing = [d for d in ("/etc", "/usr") if (fs.stat(d) or {}).get("kind") != "dir"]
    if missing:
        raise FlashError(
            f"{label} does not look like a root filesystem (no {' or '.join(missing)}): "
            "give the mounted rootfs partition of the SD card, an image, or user@host"
        )


class Target:
    """What the provisioning flow needs from a target; subclasses fill it in."""

    label: str
    fs: TargetFS
    live: bool = False  # the target is the running system: systemctl applies
    needs_local_root: bool = False  # setting owners needs this process to be root

    def open(self) -> None:
        looks_like_root(self.fs, self.label)

    def boot_config(self) -> BootConfig | None:
        for path in CONFIG_TXT:
            st = self.fs.stat(path)
            if st is not None and st["kind"] == "file":
                return FileInRoot(self.fs, path, path)
        return None

    def python(self) -> PythonFacts | None:
        return python_in_root(self.fs)

    def venv_now(self) -> bool:
        """True: build the venv during flashing; False: edge-agent-install.service does it."""
        return False

    def can_run(self) -> bool:
        """True when :meth:`run` can run the installed agent (``--bench``): SSH, ``dir --chroot``
        and ``dir /``; not a disk image, nor a foreign root directory without ``--chroot``."""
        return self.venv_now()

    def free_bytes(self) -> int | None:
        """Free space of the root filesystem, where it is cheap to know."""
        return None

    def run(self, argv: list[str]) -> dict[str, Any]:
        raise FlashError(f"{self.label}: cannot run commands on this target")

    def on_target(self, path: str) -> str:
        """How a command run by :meth:`run` names ``path`` of the target."""
        return path

    def close(self) -> None:
        pass


class DirTarget(Target):
    def __init__(self, root: Path, *, boot: Path | None = None, chroot: bool = False) -> None:
        if not root.is_dir():
            raise FlashError(f"{root}: no such directory")
        self.root = root.resolve()
        self.label = str(self.root)
        self.fs = self.dirfs = DirFS(self.root)
        self.boot = boot
        self.chroot = chroot
        self.live = self.root == Path("/") and os.path.isdir("/run/systemd/system")
        self.needs_local_root = True

    def open(self) -> None:
        super().open()
        if self.boot is not None and not (self.boot / "config.txt").is_file():
            raise FlashError(
                f"--boot {self.boot}: no config.txt there (the Pi's FAT boot partition)"
            )
        if self.chroot:
            facts = self.python()
            if facts is None:
                raise FlashError(f"--chroot: no python3 in {self.label} (/usr/bin/python3)")
            if facts.arch != host_arch():
                raise FlashError(
                    f"--chroot: the target runs {facts.arch} but this host is {host_arch()}; "
                    "leave --chroot out and the venv is built at first boot"
                )

    def boot_config(self) -> BootConfig | None:
        if self.boot is not None:
            return LocalFile(self.boot / "config.txt")
        return super().boot_config()

    def venv_now(self) -> bool:
        return self.chroot or self.live

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.root).free

    def run(self, argv: list[str]) -> dict[str, Any]:
        return self.dirfs.local.run(argv, chroot=self.chroot and not self.live)


class ImageTarget(Target):
    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FlashError(f"{path}: no such image file")
        self.path = path.resolve()
        self.label = str(self.path)
        boot, root = imagemod.check_pi_image(self.path)
        self.fs = self.ext4 = imagemod.Ext4FS(self.path, root.start)
        self.fat = imagemod.FatBoot(self.path, boot.start)

    def open(self) -> None:
        try:
            looks_like_root(self.fs, f"{self.label} partition 2")
        except FlashError:
            self.ext4.close()
            raise
        if self.fat.read() is None:
            raise FlashError(
                f"{self.label}: no config.txt on partition 1: not a Raspberry Pi OS boot partition"
            )

    def boot_config(self) -> BootConfig | None:
        return self.fat

    def free_bytes(self) -> int | None:
        return self.ext4.free_bytes()

    def close(self) -> None:
        self.ext4.close()


class SshTarget(Target):
    def __init__(self, dest: Destination, *, prefix: str = "/", **ssh: Any) -> None:
        if not prefix.startswith("/"):
            raise FlashError(f"--prefix {prefix}: must be an absolute path on the device")
        self.dest = dest
        self.prefix = prefix
        self.label = f"{dest}" + ("" if prefix == "/" else f" (prefix {prefix})")
        self.ssh = SshFS(dest, prefix=prefix, **ssh)
        self.fs = self.ssh

    def open(self) -> None:
        info = self.ssh.open()
        self.info = info
        self.live = self.prefix == "/" and bool(info.get("systemd"))
        super().open()

    def python(self) -> PythonFacts | None:
        return PythonFacts(
            self.info["machine"], self.info["python"], f"python3 on {self.dest.host}"
        )

    def venv_now(self) -> bool:
        return True

    def run(self, argv: list[str]) -> dict[str, Any]:
        return self.ssh.run(argv)

    def on_target(self, path: str) -> str:
        return path if self.prefix == "/" else self.prefix.rstrip("/") + path

    def close(self) -> None:
        self.ssh.close()

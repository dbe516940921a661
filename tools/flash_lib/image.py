"""A Raspberry Pi OS disk image, changed in place without mounting it.

The image has an MBR with partition 1 FAT ("bootfs": config.txt, kernels) and partition 2 ext4
("rootfs"). Both are reached at their byte offsets in the image file, so no root, loop device or
mount is needed: the ext4 through e2fsprogs' ``debugfs`` (``IMAGE?offset=N`` opens the filesystem
inside the file; ``-w`` writes), the FAT through mtools (``-i IMAGE@@N``). Writes are queued and
run in a few debugfs sessions at commit; debugfs reports command errors on stderr only, so every
stderr line but its banner is treated as a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flash_lib.errors import FlashError

SECTOR = 512
FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E}
LINUX_TYPE = 0x83
EXT_MAGIC = 0xEF53
BIG_WRITE = 4 << 20  # files at least this big get their own debugfs session (progress)
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_.+@=,/-]*$")
_BANNER = re.compile(r"^debugfs \d")


@dataclass(frozen=True)
class Partition:
    number: int
    type: int
    start: int  # bytes
    size: int  # bytes


def read_partitions(image: Path) -> list[Partition]:
    """The primary partitions of an MBR disk image; FlashError if there is no MBR."""
    try:
        with open(image, "rb") as f:
            mbr = f.read(SECTOR)
    except OSError as err:
        raise FlashError(f"{image}: cannot read: {err.strerror}") from None
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise FlashError(f"{image}: no partition table (MBR): not a Raspberry Pi OS image")
    parts = []
    for i in range(4):
        entry = mbr[446 + 16 * i : 446 + 16 * (i + 1)]
        ptype = entry[4]
        start, count = struct.unpack("<II", entry[8:16])
        if ptype and count:
            parts.append(Partition(i + 1, ptype, start * SECTOR, count * SECTOR))
    if any(p.type == 0xEE for p in parts):
        raise FlashError(f"{image}: GPT disk, expected an MBR Raspberry Pi OS image")
    return parts


def check_pi_image(image: Path) -> tuple[Partition, Partition]:
    """Partition 1 (FAT boot) and 2 (ext4 root) of a Pi OS image, or a FlashError saying why not."""
    size = image.stat().st_size
    parts = {p.number: p for p in read_partitions(image)}
    boot, root = parts.get(1), parts.get(2)
    what = "expected partition 1 FAT (bootfs) and partition 2 ext4 (rootfs)"
    if boot is None or root is None:
        raise FlashError(f"{image}: has partitions {sorted(parts)}; {what}")
    for p in (boot, root):
        if p.start + p.size > size:
            raise FlashError(f"{image}: partition {p.number} runs past the end of the file")
    with open(image, "rb") as f:
        f.seek(boot.start)
        bs = f.read(SECTOR)
        f.seek(root.start + 1024 + 56)
        (magic,) = struct.unpack("<H", f.read(2))
    if boot.type not in FAT_TYPES or bs[510:512] != b"\x55\xaa" or b"FAT" not in bs[54:90]:
        raise FlashError(f"{image}: partition 1 (type 0x{boot.type:02x}) is not FAT; {what}")
    if root.type != LINUX_TYPE or magic != EXT_MAGIC:
        raise FlashError(f"{image}: partition 2 (type 0x{root.type:02x}) is not ext4; {what}")
    return boot, root


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise FlashError(f"{name} not found: install {package} (apt-get install {package})")
    return path


def _debugfs_path(path: str) -> str:
    if not _SAFE_PATH.match(path):
        raise FlashError(f"{path!r}: characters debugfs cannot take in a path")
    return path


class Ext4FS:
    """The ext4 root filesystem inside an image file, through debugfs (TargetFS)."""

    def __init__(self, image: Path, offset: int) -> None:
        self.debugfs = need_tool("debugfs", "e2fsprogs")
        self.device = f"{image}?offset={offset}"
        self._queue: list[tuple[list[str], int]] = []  # (commands, bytes) per debugfs session
        self._tmp = tempfile.TemporaryDirectory(prefix="flash-image-")
        self._ntmp = 0
        self._advance: Callable[[int], None] | None = None
        self._exists: dict[str, bool] = {}  # what the queued commands will have made of a path

    def _will_exist(self, path: str) -> bool:
        if path in self._exists:
            return self._exists[path]
        return self.stat(path) is not None

    def _run(self, args: list[str], *, write: bool = False) -> tuple[bytes, list[str]]:
        cmd = [self.debugfs, *(["-w"] if write else []), *args, self.device]
        proc = subprocess.run(cmd, capture_output=True, check=False)
        errors = [
            line
            for line in proc.stderr.decode("utf-8", "replace").splitlines()
            if line.strip() and not _BANNER.match(line)
        ]
        if proc.returncode != 0 and not errors:
            errors = [f"debugfs exited with status {proc.returncode}"]
        return proc.stdout, errors

    def _request(self, command: str) -> tuple[bytes, list[str]]:
        return self._run(["-R", command])

    # -- queries ---------------------------------------------------------------------------
    def stat(self, path: str) -> dict[str, Any] | None:
        out, errors = self._request(f"stat {_debugfs_path(path)}")
        if errors:
            if any("not found" in e for e in errors):
                return None
            raise FlashError(f"image: stat {path}: {errors[0]}")
        text = out.decode("utf-8", "replace")
        kind_m = re.search(r"Type:\s+(\S+)", text)
        mode_m = re.search(r"Mode:\s+([0-7]+)", text)
        own_m = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", text)
        size_m = re.search(r"Size:\s+(\d+)", text)
        if not (kind_m and mode_m and own_m and size_m):
            raise FlashError(f"image: cannot parse debugfs stat of {path}")
        kind = {"regular": "file", "directory": "dir", "symlink": "link"}.get(
            kind_m.group(1), "other"
        )
        target = None
        if kind == "link":
            link_m = re.search(r'Fast link dest: "(.*)"', text)
            target = link_m.group(1) if link_m else self.read(path).decode("utf-8", "replace")
        return {
            "kind": kind,
            "mode": int(mode_m.group(1), 8) & 0o7777,
            "uid": int(own_m.group(1)),
            "gid": int(own_m.group(2)),
            "size": int(size_m.group(1)),
            "target": target,
        }

    def read(self, path: str) -> bytes:
        out, errors = self._request(f"cat {_debugfs_path(path)}")
        if errors:
            raise FlashError(f"image: cannot read {path}: {errors[0]}")
        return out

    def digest(self, path: str) -> str:
        import hashlib

        return hashlib.sha256(self.read(path)).hexdigest()

    def listdir(self, path: str) -> list[str]:
        out, errors = self._request(f"ls -p {_debugfs_path(path)}")
        if errors:
            raise FlashError(f"image: cannot list {path}: {errors[0]}")
        names = []
        for line in out.decode("utf-8", "replace").splitlines():
            fields = line.split("/")
            if len(fields) >= 7 and fields[5] not in (".", ".."):
                names.append(fields[5])
        return names

    def free_bytes(self) -> int:
        """Free space of the filesystem (blocks free to root, times the block size)."""
        out, errors = self._request("stats")
        text = out.decode("utf-8", "replace")
        free = re.search(r"^Free blocks:\s+(\d+)", text, re.M)
        size = re.search(r"^Block size:\s+(\d+)", text, re.M)
        if errors or not free or not size:
            raise FlashError(f"image: cannot read the filesystem's free space: {errors[:1]}")
        return int(free.group(1)) * int(size.group(1))

    # -- changes (queued until commit) -----------------------------------------------------
    def _queue_cmds(self, cmds: list[str], nbytes: int = 0) -> None:
        if nbytes >= BIG_WRITE or not self._queue:
            self._queue.append((cmds, nbytes))
            if nbytes >= BIG_WRITE:
                self._queue.append(([], 0))  # what follows goes to a new session
        else:
            self._queue[-1][0].extend(cmds)
            self._queue[-1] = (self._queue[-1][0], self._queue[-1][1] + nbytes)

    def _meta_cmds(self, path: str, type_bits: int, mode: int, uid: int, gid: int) -> list[str]:
        return [
            f"sif {path} mode 0{type_bits | mode:o}",
            f"sif {path} uid {uid}",
            f"sif {path} gid {gid}",
        ]

    def write(
        self,
        path: str,
        src: bytes | Path,
        mode: int,
        uid: int,
        gid: int,
        advance: Callable[[int], None],
    ) -> None:
        path = _debugfs_path(path)
        self._advance = advance
        if isinstance(src, bytes):
            self._ntmp += 1
            local = Path(self._tmp.name, f"f{self._ntmp}")
            local.write_bytes(src)
            size = len(src)
        else:
            local, size = src, src.stat().st_size
        if any(c.isspace() or c == '"' for c in str(local)):
            raise FlashError(f"{local}: debugfs cannot take this path")
        cmds = [f"rm {path}"] if self._will_exist(path) else []
        cmds += [f"write {local} {path}", *self._meta_cmds(path, 0o100000, mode, uid, gid)]
        self._exists[path] = True
        self._queue_cmds(cmds, size)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        path = _debugfs_path(path)
        self._exists[path] = True
        self._queue_cmds([f"mkdir {path}", *self._meta_cmds(path, 0o040000, mode, uid, gid)])

    def chmeta(self, path: str, kind: str, mode: int, uid: int, gid: int) -> None:
        bits = 0o040000 if kind == "dir" else 0o100000
        self._queue_cmds(self._meta_cmds(_debugfs_path(path), bits, mode, uid, gid))

    def symlink(self, path: str, target: str) -> None:
        path = _debugfs_path(path)
        _debugfs_path(target if target.startswith("/") else "/" + target)
        cmds = [f"rm {path}"] if self._will_exist(path) else []
        self._exists[path] = True
        self._queue_cmds([*cmds, f"symlink {path} {target}"])

    def remove(self, path: str) -> None:
        path = _debugfs_path(path)
        if self._will_exist(path):
            self._exists[path] = False
            self._queue_cmds([f"rm {path}"])

    def commit(self) -> None:
        for cmds, nbytes in self._queue:
            if not cmds:
                continue
            script = Path(self._tmp.name, "commands")
            script.write_text("\n".join(cmds) + "\n")
            _, errors = self._run(["-f", str(script)], write=True)
            if errors:
                raise FlashError(f"image: debugfs failed: {errors[0]}")
            if self._advance is not None and nbytes:
                self._advance(nbytes)
        self._queue.clear()
        self._exists.clear()

    def close(self) -> None:
        self._tmp.cleanup()


class FatBoot:
    """config.txt on the image's FAT boot partition, through mtools."""

    def __init__(self, image: Path, offset: int) -> None:
        self.mtype = need_tool("mtype", "mtools")
        self.mcopy = need_tool("mcopy", "mtools")
        self.spec = f"{image}@@{offset}"
        self.where = f"{image.name} partition 1: /config.txt"
        self.env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLSRC="/dev/null")

    def read(self) -> bytes | None:
        proc = subprocess.run(
            [self.mtype, "-i", self.spec, "::/config.txt"],
            capture_output=True,
            env=self.env,
            check=False,
        )
        if proc.returncode != 0:
            if b"not found" in proc.stderr:
                return None
            raise FlashError(f"{self.where}: mtype failed: {proc.stderr.decode().strip()}")
        return proc.stdout

    def write(self, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(prefix="config-", suffix=".txt") as tmp:
            tmp.write(data)
            tmp.flush()
            proc = subprocess.run(
                [self.mcopy, "-o", "-i", self.spec, tmp.name, "::/config.txt"],
                capture_output=True,
                env=self.env,
                check=False,
            )
        if proc.returncode != 0:
            raise FlashError(f"{self.where}: mcopy failed: {proc.stderr.decode().strip()}")

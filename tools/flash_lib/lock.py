"""The device locks: the exact wheels a device gets, per target, pinned with their SHA-256.

``tools/lock/device-ARCH-pyX.Y.txt`` names every package a device of that CPU and Python runs
(the project's dependencies, resolved, and pip), each at one version with the SHA-256 of every
file PyPI has for that version (so a wheel of another manylinux tag of the same version passes,
and nothing else does). ``tools/flash bundle`` downloads exactly these (``pip download
--require-hashes``) and checks that the project's requirements resolve from them alone, so two
bundles built months apart give devices the same bytes, and a file replaced on the index is
refused. ``./tools/dev setup`` installs the development venv with the host's lock as constraints,
so the tests run on the versions devices get.

``./tools/dev lock`` (``tools/flash lock``) writes them again: pip's own resolver for each target
(``pip install --dry-run --report`` with the target's platform tags, so Requires-Python and the
target's wheels decide), then the hashes of each pinned version from the index's JSON API.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flash_lib.errors import FlashError

#: The Pythons a device may run: Debian 12 / Raspberry Pi OS Bookworm (3.11), Ubuntu 24.04
#: (3.12), Debian 13 / Raspberry Pi OS Trixie (3.13).
TARGET_PYTHONS = ("3.11", "3.12", "3.13")
INDEX_JSON = "https://pypi.org/simple/{name}/"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*\\?$")
_HASH = re.compile(r"^\s*--hash=sha256:([0-9a-f]{64})\s*\\?$")


@dataclass(frozen=True)
class Pin:
    name: str  # normalized (PEP 503)
    version: str
    hashes: tuple[str, ...]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_dir(project_root: Path) -> Path:
    return project_root / "tools" / "lock"


def lock_path(project_root: Path, arch: str, python: str) -> Path:
    return lock_dir(project_root) / f"device-{arch}-py{python}.txt"


def lock_for(project_root: Path, arch: str, python: str) -> Path:
    """The lock of this target; FlashError naming how to make one when there is none."""
    path = lock_path(project_root, arch, python)
    if not path.is_file():
        made = ", ".join(p.name for p in sorted(lock_dir(project_root).glob("device-*.txt")))
        raise FlashError(
            f"no device lock for {arch} Python {python} ({path} is missing; there are: "
            f"{made or 'none'}): add {python} to TARGET_PYTHONS in tools/flash_lib/lock.py and "
            "run ./tools/dev lock"
        )
    return path


def read(path: Path) -> list[Pin]:
    """The pins of a lock file; FlashError on a line that is not a pin with hashes."""
    pins: list[Pin] = []
    name = version = None
    hashes: list[str] = []

    def close() -> None:
        if name is not None:
            if not hashes:
                raise FlashError(f"{path}: {name}=={version} has no --hash")
            pins.append(Pin(normalize(name), str(version), tuple(hashes)))

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FlashError(f"{path}: cannot read the lock ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if (m := _HASH.match(line)) is not None and name is not None:
            hashes.append(m.group(1))
        elif (m := _PIN.match(line)) is not None:
            close()
            name, version, hashes = m.group(1), m.group(2), []
        else:
            raise FlashError(f"{path}:{number}: not a pinned requirement with hashes: {line!r}")
    close()
    names = [p.name for p in pins]
    if len(set(names)) != len(names):
        raise FlashError(f"{path}: a package is pinned twice")
    return pins


# -- writing the locks (./tools/dev lock) --------------------------------------------------------
def _resolve(pip_python: str, project_root: Path, platform: list[str]) -> dict[str, str]:
    """name -> version of everything a device of this target installs (the project excluded)."""
    with tempfile.TemporaryDirectory(prefix="edge-agent-lock-") as tmp:
        report = Path(tmp, "report.json")
        cmd = [
            pip_python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--only-binary=:all:", "--report", str(report), "--target", str(Path(tmp, "t")),
            *platform, str(project_root), "pip",
        ]  # fmt: skip
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise FlashError(f"pip could not resolve the target: {proc.stderr.strip()[-2000:]}")
        installs = json.loads(report.read_text())["install"]
    project = normalize("edge-agent")
    out = {}
    for item in installs:
        name = normalize(item["metadata"]["name"])
        if name != project:
            out[name] = item["metadata"]["version"]
    return out


def _version_of(filename: str, name: str) -> str | None:
    """The version in a wheel's or sdist's file name of package ``name``."""
    from packaging.utils import (
        InvalidSdistFilename,
        InvalidWheelFilename,
        parse_sdist_filename,
        parse_wheel_filename,
    )

    try:
        if filename.endswith(".whl"):
            parsed, version = parse_wheel_filename(filename)[:2]
        else:
            parsed, version = parse_sdist_filename(filename)
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    return str(version) if normalize(str(parsed)) == name else None


def _hashes(name: str, version: str) -> list[str]:
    """The SHA-256 of every file the index has for ``name`` ``version``."""
    from packaging.version import Version

    req = urllib.request.Request(
        INDEX_JSON.format(name=name), headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        files = json.load(resp)["files"]
    want = Version(version)
    out = sorted(
        {
            f["hashes"]["sha256"]
            for f in files
            if "sha256" in f.get("hashes", {})
            and (v := _version_of(f["filename"], name)) is not None
            and Version(v) == want
        }
    )
    if not out:
        raise FlashError(f"the index lists no file of {name} {version}")
    return out


def write(project_root: Path, pip_python: str, say=print) -> list[Path]:
    """Resolve and write the lock of every target (ARCHES x TARGET_PYTHONS)."""
    from flash_lib.bundle import ARCHES, DEFAULT_GLIBC, platform_args

    hashes: dict[tuple[str, str], list[str]] = {}
    written = []
    lock_dir(project_root).mkdir(parents=True, exist_ok=True)
    for arch in ARCHES:
        for python in TARGET_PYTHONS:
            glibc = DEFAULT_GLIBC[arch]
            pins = _resolve(pip_python, project_root, platform_args(arch, python, glibc))
            lines = [
                f"# The wheels of an edge-agent device: {arch}, Python {python} (glibc {glibc}).",
                "# Written by ./tools/dev lock (tools/flash_lib/lock.py); tools/flash bundle",
                "# downloads exactly these. Do not edit: change pyproject.toml and run it again.",
            ]
            for name in sorted(pins):
                key = (name, pins[name])
                if key not in hashes:
                    hashes[key] = _hashes(*key)
                lines.append(f"{name}=={pins[name]} \\")
                digests = hashes[key]
                lines += [
                    f"    --hash=sha256:{d}" + (" \\" if i < len(digests) - 1 else "")
                    for i, d in enumerate(digests)
                ]
            path = lock_path(project_root, arch, python)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
            tmp.replace(path)
            say(f"lock: {path.relative_to(project_root)} ({len(pins)} packages)")
            written.append(path)
    return written

"""tools/flash bundle downloads exactly the target's lock, checked against its hashes.

A small project stands in for edge-agent (its wheel builds in a second); its lock takes the real
pins of smbus2 and pip from tools/lock, so pip downloads real wheels from the index. A hash that
does not match, or a lock that misses what the project needs, stops the build with one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from flash_lib import bundle as bundlemod  # noqa: E402
from flash_lib import lock as lockmod  # noqa: E402
from flash_lib.errors import FlashError  # noqa: E402

# this host when a lock names it, else a locked target built as a foreign one (platform tags):
# smbus2 and pip are pure-Python wheels, so either way pip downloads the same files
HOST = (bundlemod.host_arch(), bundlemod.host_python())
ARCH, PYTHON = HOST if lockmod.lock_path(ROOT, *HOST).is_file() else ("x86_64", "3.11")


def pin_text(pin: lockmod.Pin) -> str:
    return f"{pin.name}=={pin.version} \\\n" + " \\\n".join(
        f"    --hash=sha256:{h}" for h in pin.hashes
    )


def project(tmp_path: Path, needs: list[str], locked: list[str], alter: str = "") -> Path:
    """A project needing ``needs`` whose lock pins ``locked`` (as tools/lock pins them)."""
    root = tmp_path / "project"
    (root / "mini").mkdir(parents=True)
    (root / "mini" / "__init__.py").write_text('"""A stand-in."""\n')
    deps = ", ".join(f'"{n}"' for n in needs)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "mini"\nversion = "1.0"\ndependencies = [{deps}]\n'
        '[tool.setuptools]\npackages = ["mini"]\n'
    )
    real = {p.name: p for p in lockmod.read(lockmod.lock_path(ROOT, ARCH, PYTHON))}
    pins = [real[n] for n in locked]
    if alter:
        pins = [
            lockmod.Pin(p.name, p.version, tuple("0" * 64 for _ in p.hashes))
            if p.name == alter
            else p
            for p in pins
        ]
    lock = lockmod.lock_path(root, ARCH, PYTHON)
    lock.parent.mkdir(parents=True)
    lock.write_text("\n".join(pin_text(p) for p in pins) + "\n")
    return root


def build(root: Path, out: Path) -> bundlemod.Bundle:
    return bundlemod.build(out, root, arch=ARCH, python=PYTHON, pip_python=sys.executable)


def test_the_bundle_holds_exactly_the_locked_wheels(tmp_path: Path) -> None:
    root = project(tmp_path, ["smbus2"], ["smbus2", "pip"])
    b = build(root, tmp_path / "bundle")
    pins = {p.name: p for p in lockmod.read(lockmod.lock_path(root, ARCH, PYTHON))}
    assert sorted(b.files) == sorted(
        [b.project, b.pip, *(n for n in b.files if n.startswith("smbus2-"))]
    )
    assert len(b.files) == 3 and b.project.startswith("mini-1.0-")
    for name, digest in b.files.items():
        if name != b.project:
            pkg = lockmod.normalize(name.split("-")[0])
            assert digest in pins[pkg].hashes  # the very file the lock names
    meta = json.loads((tmp_path / "bundle" / bundlemod.BUNDLE_JSON).read_text())
    assert meta["files"] == b.files


def test_a_wheel_that_does_not_match_its_locked_hash_stops_the_build(tmp_path: Path) -> None:
    root = project(tmp_path, ["smbus2"], ["smbus2", "pip"], alter="smbus2")
    with pytest.raises(FlashError, match=r"pip download failed[\s\S]*HASH") as err:
        build(root, tmp_path / "bundle")
    assert "Traceback" not in str(err.value)
    assert not (tmp_path / "bundle" / bundlemod.BUNDLE_JSON).exists()


def test_a_lock_missing_what_the_project_needs_stops_the_build(tmp_path: Path) -> None:
    root = project(tmp_path, ["smbus2", "pyserial"], ["smbus2", "pip"])
    with pytest.raises(FlashError, match=r"does not hold what the project needs: run "
                       r"\./tools/dev lock[\s\S]*pyserial"):  # fmt: skip
        build(root, tmp_path / "bundle")
    assert not (tmp_path / "bundle" / bundlemod.BUNDLE_JSON).exists()


def test_a_target_without_a_lock_stops_the_build_before_any_download(tmp_path: Path) -> None:
    root = project(tmp_path, ["smbus2"], ["smbus2", "pip"])
    with pytest.raises(FlashError, match=r"no device lock for aarch64 Python 3\.10"):
        bundlemod.build(tmp_path / "b", root, arch="aarch64", python="3.10")

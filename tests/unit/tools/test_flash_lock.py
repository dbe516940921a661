"""The device locks in tools/lock: one per target, each pin hashed, and current with pyproject.

A dependency added to or changed in pyproject.toml without ``./tools/dev lock`` fails here (the
bundle build would refuse it too: tests/e2e/test_flash_lock.py).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))

from flash_lib import lock as lockmod  # noqa: E402
from flash_lib.bundle import ARCHES  # noqa: E402
from flash_lib.errors import FlashError  # noqa: E402

TARGETS = [(arch, py) for arch in ARCHES for py in lockmod.TARGET_PYTHONS]


def target_env(arch: str, python: str) -> dict[str, str]:
    return {
        "platform_machine": arch,
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


@pytest.mark.parametrize(("arch", "python"), TARGETS)
def test_every_target_has_a_lock_with_each_pin_hashed(arch: str, python: str) -> None:
    pins = {p.name: p for p in lockmod.read(lockmod.lock_for(ROOT, arch, python))}
    assert "pip" in pins  # the bundle carries the pip that installs it
    for pin in pins.values():
        assert pin.hashes and all(len(h) == 64 for h in pin.hashes), pin


@pytest.mark.parametrize(("arch", "python"), TARGETS)
def test_each_lock_holds_a_version_of_every_dependency_pyproject_allows(
    arch: str, python: str
) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {p.name: p.version for p in lockmod.read(lockmod.lock_path(ROOT, arch, python))}
    for line in project["dependencies"]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(target_env(arch, python)):
            continue
        name = lockmod.normalize(req.name)
        assert name in pins, f"{name} is not in the {arch} {python} lock: ./tools/dev lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in the {arch} {python} lock is outside {req.specifier}: "
            "./tools/dev lock"
        )


def test_a_target_without_a_lock_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FlashError, match=r"no device lock for aarch64 Python 3\.10.*dev lock"):
        lockmod.lock_for(tmp_path, "aarch64", "3.10")


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("numpy>=2 \\\n    --hash=sha256:" + "a" * 64 + "\n", "not a pinned requirement"),
        ("numpy==2.4.6\n", "has no --hash"),
        ("numpy==2.4.6 \\\n    --hash=md5:abc\n", "not a pinned requirement"),
        (
            "numpy==2.4.6 --hash=sha256:" + "a" * 64 + "\n",
            "not a pinned requirement",  # a hash on the pin's line: one form only
        ),
        (("numpy==2.4.6 \\\n    --hash=sha256:" + "a" * 64 + "\n") * 2, "pinned twice"),
        ("NumPy==2.4.6 \\\n    --hash=sha256:" + "a" * 64 + "\nnumpy==2.4.7 \\\n    "
         "--hash=sha256:" + "b" * 64 + "\n", "pinned twice"),
    ],
)  # fmt: skip
def test_a_lock_line_that_is_not_a_hashed_pin_is_refused(
    tmp_path: Path, text: str, refusal: str
) -> None:
    path = tmp_path / "device-x86_64-py3.11.txt"
    path.write_text(text)
    with pytest.raises(FlashError, match=refusal):
        lockmod.read(path)


def test_a_lock_reads_its_pins_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "lock.txt"
    path.write_text(
        "# a comment\n\nbackports.strenum==1.2.8 \\\n    --hash=sha256:" + "a" * 64 + " \\\n"
        "    --hash=sha256:" + "b" * 64 + "\n"
    )
    assert lockmod.read(path) == [lockmod.Pin("backports-strenum", "1.2.8", ("a" * 64, "b" * 64))]

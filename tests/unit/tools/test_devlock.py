"""tools/devlock.py and the development locks it writes (tools/lock/dev-*.txt, tflite-*.txt):
``./tools/dev setup`` installs the development environments with them as constraints."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))

import devlock  # noqa: E402
from flash_lib import lock as lockmod  # noqa: E402


def test_pins_leave_out_the_device_lock_and_what_is_not_a_pin() -> None:
    freeze = [
        "ruff==0.17.6",
        "ml_dtypes==0.7.0",  # the device lock spells it ml-dtypes
        "Pygments==2.21.0",
        "-e git+https://example.invalid/x.git@abc#egg=x",
        "foo @ file:///tmp/foo.whl",
        "",
        "attrs==26.1.0",
    ]
    assert devlock.pins(freeze, {"ml-dtypes"}) == [
        "attrs==26.1.0",
        "Pygments==2.21.0",
        "ruff==0.17.6",
    ]


def test_a_written_lock_reads_as_constraints(tmp_path: Path) -> None:
    path = tmp_path / "dev-x86_64-py3.11.txt"
    devlock.write(path, "The tools", ["attrs==26.1.0", "ruff==0.17.6"])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# The tools: x86_64, Python 3.11."
    assert [ln for ln in lines if not ln.startswith("#")] == ["attrs==26.1.0", "ruff==0.17.6"]


def test_each_development_lock_pins_every_development_requirement() -> None:
    """A tool added to the dev or dtls extra without ``./tools/dev freeze`` fails here: a clean
    clone would install it at whatever version the index holds that day. Each development lock
    (one per host the suite runs on) is read with the device lock of its host."""
    locks = sorted((ROOT / "tools" / "lock").glob("dev-*.txt"))
    assert locks, "no development lock: run ./tools/dev freeze"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    wanted = {
        lockmod.normalize(Requirement(r).name) for extra in ("dev", "dtls") for r in extras[extra]
    }
    for dev in locks:
        pinned = {
            lockmod.normalize(line.partition("==")[0])
            for line in dev.read_text(encoding="utf-8").splitlines()
            if "==" in line and not line.startswith("#")
        }
        pinned |= {p.name for p in lockmod.read(dev.with_name("device" + dev.name[3:]))}
        assert wanted - pinned == set(), dev.name

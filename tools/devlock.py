"""The development locks: the versions of the tools the suite was last run with, per host.

``tools/lock/dev-ARCH-pyX.Y.txt`` pins what the development environment (``.venv``: the
``dev`` and ``dtls`` extras) holds beyond the device lock (pytest, pytest-asyncio, hypothesis,
ruff, selenium, psycopg, matplotlib and what they pull in); ``tools/lock/tflite-ARCH-pyX.Y.txt``
pins the whole ``.venv-tflite`` (tflite-runtime 2.14 with numpy < 2). ``./tools/dev setup``
installs each environment with its lock as constraints, so a clean clone tests with the versions
the suite passed with, not whatever the index holds that day (a new major release of a test
plugin would otherwise change the suite's behaviour on a fresh machine and nowhere else).

``./tools/dev freeze`` writes both from the environments as they are (``pip freeze``): run it
after moving a tool forward (delete the lock, ``./tools/dev setup``, ``./tools/dev test``).
No hashes: these never reach a device.

    python tools/devlock.py DEVICE_LOCK DEV_LOCK DEV_PYTHON TFLITE_LOCK TFLITE_PYTHON
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from flash_lib.lock import normalize, read

HEADER = (
    "# {what}: {arch}, Python {python}.\n"
    "# Written by ./tools/dev freeze (tools/devlock.py) from the environment the suite passed\n"
    "# in; ./tools/dev setup installs with these as constraints. Never on a device.\n"
)


def pins(freeze: Iterable[str], leave_out: set[str]) -> list[str]:
    """The ``name==version`` lines of ``pip freeze`` output, sorted by name, without the packages
    named in ``leave_out`` (normalized names) and without anything that is not a plain pin (an
    editable install, a direct URL)."""
    out = []
    for line in freeze:
        name, sep, version = line.strip().partition("==")
        if sep and name and version and normalize(name) not in leave_out:
            out.append((normalize(name), f"{name}=={version}"))
    return [pin for _, pin in sorted(out)]


def frozen(python: str) -> list[str]:
    return subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()


def write(path: Path, what: str, lines: list[str]) -> None:
    arch, python = path.stem.split("-")[1], path.stem.split("-py")[-1]
    text = HEADER.format(what=what, arch=arch, python=python) + "".join(f"{p}\n" for p in lines)
    path.write_text(text, encoding="utf-8")
    print(f"{path}: {len(lines)} pins")


def main(argv: list[str]) -> int:
    device_lock, dev_lock, dev_python, tflite_lock, tflite_python = argv
    device = Path(device_lock)
    on_device = {p.name for p in read(device)} if device.is_file() else set()
    write(
        Path(dev_lock),
        "The development tools beyond the device lock",
        pins(frozen(dev_python), on_device),
    )
    if Path(tflite_python).exists():
        write(
            Path(tflite_lock),
            "The tflite-runtime environment (.venv-tflite)",
            pins(frozen(tflite_python), set()),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

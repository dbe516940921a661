"""Installing a verified release beside the running one: ``releases/<version>/`` under the root.

The release file is checked against its verified manifest and unpacked into
``releases/<version>/bundle``; the venv is made in ``releases/<version>`` itself (its scripts name
that path, so it is built where it stays) with ``python -m venv --without-pip``, and the agent
goes in with the bundle's own pip, run from its wheel, offline::

    releases/V/bin/python BUNDLE/pip-X.whl/pip install --isolated --no-index \
        --find-links BUNDLE BUNDLE/edge_agent-X.whl

(the first-boot installer's command: tools/flash_lib/provision.py ``installer_script``).
The manifest is kept as ``releases/V/release.cbor`` and ``COMPLETE`` is written last
(agent/ota/bootcheck.py): a release without it is never switched to, and is built again from
scratch by the next attempt.

``site``: directories a new venv also sees (a ``.pth`` file written before pip runs). The tests
use it to give a test release the running venv's dependencies, so that its bundle holds only the
agent's wheel and pip; a real release leaves it empty.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.errors import NotNow, no_room, says_no_room
from agent.ota import bootcheck
from agent.ota.release import ReleaseError, ReleaseManifest, unpack

log = logging.getLogger(__name__)

INSTALL_TIMEOUT = 1800.0  # seconds for pip (numpy and LiteRT on a Pi Zero 2 take minutes)
MANIFEST_FILE = "release.cbor"


def release_dir(root: Path, version: str) -> Path:
    return root / bootcheck.RELEASES / version


def install(
    root: Path,
    manifest: ReleaseManifest,
    file: Path,
    *,
    python: str | None = None,
    site: Sequence[Path] = (),
) -> Path:
    """Build ``releases/<version>`` from the verified ``manifest`` and its downloaded ``file``.
    Raises ReleaseError (refused: nothing is switched) or OSError."""
    version = manifest.version
    rel = release_dir(root, version)
    if bootcheck.is_complete(root, version):
        return rel
    if rel.exists():
        shutil.rmtree(rel)  # a leftover of an interrupted install
    rel.mkdir(parents=True)
    bundle = rel / "bundle"
    unpack(manifest, file, bundle)
    pip_wheel = bundle / str(manifest.bundle.get("pip", ""))
    project = bundle / str(manifest.bundle.get("project", ""))
    if not pip_wheel.name.startswith("pip-") or not pip_wheel.is_file():
        raise ReleaseError(f"release {version}: the bundle has no pip wheel")
    if not project.name.endswith(".whl") or not project.is_file():
        raise ReleaseError(f"release {version}: the bundle has no agent wheel")
    base = python or getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", "--without-pip", str(rel)], version, "venv")
    if site:
        (rel / "lib").mkdir(exist_ok=True)
        for sp in (rel / "lib").glob("python*/site-packages"):
            (sp / "zz-edge-agent-site.pth").write_text("".join(f"{p}\n" for p in site))
    cmd = [str(rel / "bin" / "python"), f"{pip_wheel}/pip", "install", "--isolated"]
    cmd += ["--no-index", "--find-links", str(bundle), "--no-cache-dir", "--quiet"]
    cmd += ["--disable-pip-version-check", "--no-warn-script-location", str(project)]
    _run(cmd, version, "pip install")
    (rel / MANIFEST_FILE).write_bytes(manifest.to_cbor())
    _fsync_tree(rel)
    bootcheck.mark_complete(root, version)
    log.info("event=release_installed version=%s path=%s", version, rel)
    return rel


def _run(cmd: list[str], version: str, what: str) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_CONFIG_FILE=os.devnull)
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        if no_room(err):
            raise NotNow(f"release {version}: {what}: {err}; tried again later") from err
        raise ReleaseError(f"release {version}: {what} failed ({err})") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        said = " | ".join(tail)
        if says_no_room((proc.stderr or "") + (proc.stdout or "")):
            raise NotNow(f"release {version}: {what}: {said}; tried again later")
        raise ReleaseError(f"release {version}: {what} failed: {said}")


def _fsync_tree(top: Path) -> None:
    """Every file and directory of the new release on disk before COMPLETE says it is whole."""
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        bootcheck.fsync_dir(Path(dirpath))

"""The over-the-air update pieces tools/flash installs beside the agent (docs/ota.md).

- /opt/edge-agent/ota-bootcheck.py (0755 root): agent/ota/bootcheck.py, standard library only,
  outside the releases; the boot counter, the rollback and the health check run it with the
  system's ``/usr/bin/python3 -I`` (systemd/edge-agent.service.d/ota.conf and the OTA units).
- /etc/edge-agent/release.pub (0644 root): the release key's public half (``--release-key``, the
  KEYFILE.pub of ``edge-agent-cloud releases keygen``), which edge-agent-update.service passes
  to the root helper, and the ``[update]`` table of agent.toml naming it (``public_key``,
  relative to the config file) for the agent. Without ``--release-key`` neither is written: the
  agent then refuses every release (the units and the bootcheck are harmless without one).

The units themselves are installed with the others (flash_lib.units).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from flash_lib.errors import FlashError
from flash_lib.keys import raw_public_key, read_public_key
from flash_lib.plan import Entry, File

# The paths the units name: the drop-in's ExecStartPre (and the rollback and health units'
# ExecStart), edge-agent-update.service's --public-key.
BOOTCHECK = "/opt/edge-agent/ota-bootcheck.py"
RELEASE_KEY = "/etc/edge-agent/release.pub"
BOOTCHECK_SOURCE = Path("agent", "ota", "bootcheck.py")  # in the project
KEYGEN = "edge-agent-cloud releases keygen"
NO_KEY_NOTE = (
    "no --release-key: the device refuses every agent release until [update] public_key names "
    f"the KEYFILE.pub of `{KEYGEN}` (installed as {RELEASE_KEY})"
)


def read_release_key(path: Path | None, model_key: bytes | None = None) -> bytes | None:
    """The release public key's bytes, checked (flash_lib.keys); refused when it is the model
    key: releases have their own key, and a device given the model key refuses every release."""
    if path is None:
        return None
    data = read_public_key(path, "--release-key", KEYGEN)
    if model_key is not None and raw_public_key(data) == raw_public_key(model_key):
        raise FlashError(
            f"--release-key {path}: the same key as --model-key; releases are signed with their "
            f"own key: give the KEYFILE.pub of `{KEYGEN}`"
        )
    return data


def update_table(flashed: bool) -> str:
    """What replaces @UPDATE@ in the config template: the ``[update]`` table naming the release
    key, or (not ``flashed``) a commented one that says how to get it."""
    name = posixpath.basename(RELEASE_KEY)
    if not flashed:
        return (
            f'# [update]\n# public_key = "{name}"   # not flashed: tools/flash --release-key '
            "KEYFILE.pub\n"
        )
    return f'[update]\npublic_key = "{name}"    # {RELEASE_KEY}\n'


def entries(project_root: Path, release_key: bytes | None) -> list[Entry]:
    """The bootcheck and (with ``--release-key``) the release key, for /opt/edge-agent and
    /etc/edge-agent (which the caller's entries make first)."""
    out: list[Entry] = [
        File(
            BOOTCHECK,
            (project_root / BOOTCHECK_SOURCE).read_bytes(),
            mode=0o755,
            note="OTA boot counter and rollback",
        )
    ]
    if release_key is not None:
        out.append(File(RELEASE_KEY, release_key, note="release public key"))
    return out

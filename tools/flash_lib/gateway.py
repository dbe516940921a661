"""What ``tools/flash --role gateway`` puts on a machine beside the pieces both roles share (the
bundle, the venv and its first-boot installer; flash_lib.provision): the gateway's account
(edge-agent-gateway, no supplementary groups), /etc/edge-agent/gateway.toml from
systemd/gateway.toml.in, the gateway's own credential (``edge-agent-cloud gateways add``) in
/var/lib/edge-agent-gateway/credential.json, its devices' credentials (``--devices DIR``: every
``*.json`` there, each a device's file from ``edge-agent-cloud devices add``) in
/var/lib/edge-agent-gateway/devices/ (0700; each file 0600, named for its device; a file already
there and not in DIR stays), and edge-agent-gateway.service, enabled. No sensors, no model or
release key (the devices check those), no I2C.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flash_lib.errors import FlashError
from flash_lib.plan import Dir, Entry, File
from flash_lib.roles import DEVICES_DIR, GATEWAY

#: The device-only options, refused with --role gateway (option, why).
DEVICE_ONLY = (
    ("model_key", "--model-key", "the devices check model signatures, not the gateway"),
    ("release_key", "--release-key", "the devices check agent releases, not the gateway"),
    ("sensors", "--sensors", "a gateway reads no sensors"),
    ("bench", "--bench", "the quick bench measures a device's inference"),
)
NO_DEVICES_NOTE = (
    f"no --devices: the gateway refuses to start until {GATEWAY.home}/{DEVICES_DIR}/ holds the "
    "credential files of its devices (`edge-agent-cloud devices add --credential-out FILE`)"
)


def check_options(given: Callable[[str], object]) -> None:
    """Refuse, one line, a device-only option given with --role gateway."""
    for attr, option, why in DEVICE_ONLY:
        if given(attr):
            raise FlashError(f"{option}: not with --role gateway: {why}")


def device_credentials(
    folder: Path, read: Callable[[Path, str], tuple[bytes, str]]
) -> dict[str, bytes]:
    """The device credentials in ``folder`` by device name (``read(path, "device")``: a
    credential file's bytes and principal, checked to be of that role)."""
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix == ".json")  # each read refuses
        # what is not a regular file of the folder (a link, a FIFO, a directory), never skips it
    except OSError as err:
        raise FlashError(f"--devices {folder}: {err.strerror}") from None
    if not files:
        raise FlashError(
            f"--devices {folder}: no credential files (*.json) in it: `edge-agent-cloud devices "
            "add --data DIR ID --credential-out FILE` makes one per device"
        )
    out: dict[str, bytes] = {}
    for path in files:
        data, principal = read(path, "device")
        if principal in out:
            raise FlashError(f"--devices {folder}: two credential files of {principal!r}")
        out[principal] = data
    return out


def device_entries(credentials: dict[str, bytes], uid: int, gid: int) -> list[Entry]:
    """``credentials`` in the gateway's devices/ (its [gateway] credentials), its own files."""
    where = f"{GATEWAY.home}/{DEVICES_DIR}"
    out: list[Entry] = [Dir(where, mode=0o700, uid=uid, gid=gid)]
    for name, data in sorted(credentials.items()):
        path = f"{where}/{name}.json"
        out.append(File(path, data, mode=0o600, uid=uid, gid=gid, note="device credential"))
    return out

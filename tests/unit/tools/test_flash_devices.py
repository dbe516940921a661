"""``tools/flash --role gateway --devices DIR``: the operator's folder of device credentials is
read as hostile input (flash runs as root and writes each file into the gateway's data directory
under the name of the device it holds)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[3] / "tools"
sys.path.insert(0, str(TOOLS))

from flash_lib.errors import FlashError  # noqa: E402
from flash_lib.gateway import device_credentials, device_entries  # noqa: E402
from flash_lib.provision import _device_credential  # noqa: E402
from flash_lib.roles import DEVICES_DIR, GATEWAY  # noqa: E402


def credential(principal: str) -> bytes:
    """A device credential file's bytes, as `edge-agent-cloud devices add` writes them."""
    doc = {
        "format": 1,
        "principal": principal,
        "role": "device",
        "generation": 1,
        "oscore": {"master_secret": "11" * 32, "master_salt": "22" * 8, "sender_id": "0a"},
        "psk": "33" * 16,
    }
    return json.dumps(doc).encode()


def folder_with(tmp_path: Path, **files: bytes) -> Path:
    folder = tmp_path / "devices"
    folder.mkdir()
    for name, data in files.items():
        (folder / f"{name}.json").write_bytes(data)
    return folder


def test_device_credentials_are_named_for_their_device(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, a=credential("pump-01"), b=credential("pump-02"))
    creds = device_credentials(folder, _device_credential)
    assert sorted(creds) == ["pump-01", "pump-02"]
    paths = [e.path for e in device_entries(creds, 1000, 1000)]
    assert paths[1:] == [f"{GATEWAY.home}/{DEVICES_DIR}/pump-0{i}.json" for i in (1, 2)]


@pytest.mark.parametrize(
    "principal",
    ["../../../../etc/cron.d/evil", "../credential", "a/b", "pump-01\n", ".hidden", ""],
)
def test_attack_a_device_credential_whose_name_leaves_the_devices_directory(
    tmp_path: Path, principal: str
) -> None:
    """The principal names the file flash (root) writes: a name with '/' or '..' would write
    outside /var/lib/edge-agent-gateway/devices (a cron job, the gateway's own credential)."""
    folder = folder_with(tmp_path, evil=credential(principal))
    with pytest.raises(FlashError, match="not a device name"):
        device_credentials(folder, _device_credential)


@pytest.mark.parametrize("kind", ["fifo", "directory", "link"])
def test_attack_a_devices_entry_that_is_not_a_credential_file_of_the_folder(
    tmp_path: Path, kind: str
) -> None:
    """A ``*.json`` that is a FIFO or a directory was skipped without a word (the gateway then
    starts without that device), and a link was followed (root reads what it names: another
    role's secret). Each is refused, naming it, and nothing blocks on the FIFO."""
    folder = folder_with(tmp_path, a=credential("pump-01"))
    odd = folder / "pump-02.json"
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "directory":
        odd.mkdir()
    else:
        elsewhere = tmp_path / "secret.json"
        elsewhere.write_bytes(credential("pump-02"))
        odd.symlink_to(elsewhere)
    with pytest.raises(FlashError, match=r"pump-02\.json: not a regular file"):
        device_credentials(folder, _device_credential)

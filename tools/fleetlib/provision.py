"""Registering a fleet with the endpoint's storage, fast, and the fleet's credentials file.

:func:`provision` registers N devices and makes each a credential through the storage's own
calls (``add_device``, ``put_credential``), without
:func:`cloud.security.issue_credential`, which reads every credential for each one it makes
(quadratic: minutes for 10,000). Each call is still its own transaction (one fsync each on
SQLite), which is what bounds it: about 0.4 ms per device on this machine's disk.

The endpoint learns of new credentials when it starts, or within a second when it runs (its
poller reloads the principals when the database changes: cloud/desired.py).

The credentials file is what ``tools/fleet.py run --creds FILE`` reads: one JSON document
``{"format": 1, "credentials": [<credential file documents>]}``, mode 0600 (it holds every
device's master secret).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.files import write_atomic
from agent.wire.credentials import KID_BYTES, Credential, CredentialError
from cloud.storage import DuplicateKeyId

FORMAT = 1
MAX_KID_TRIES = 16


def device_name(prefix: str, number: int, count: int) -> str:
    """``fleet-00001``: numbered from 1, at least 5 digits (more for larger fleets)."""
    return f"{prefix}-{number:0{max(5, len(str(count)))}d}"


def device_names(prefix: str, count: int) -> list[str]:
    return [device_name(prefix, i, count) for i in range(1, count + 1)]


def provision(
    storage: Any, count: int, prefix: str = "fleet", now: float | None = None
) -> list[Credential]:
    """Register ``count`` devices named ``prefix-00001``... with ``storage`` (a
    :class:`cloud.storage.Storage`) and give each a new credential (a device that had one is
    re-keyed: a new key id, the next generation). Returns the devices' sides of the
    credentials, in name order."""
    when = time.time() if now is None else now
    existing = {c.principal: c for c, _ in storage.credentials()}
    kids = {c.sender_id for c in existing.values()}
    out = []
    for name in device_names(prefix, count):
        storage.add_device(name, when)
        old = existing.get(name)
        generation = old.generation + 1 if old is not None else 1
        for _ in range(MAX_KID_TRIES):
            kid = secrets.token_bytes(KID_BYTES)
            if kid in kids:
                continue
            cred = Credential.generate(name, "device", kid, generation=generation)
            try:
                storage.put_credential(cred, when, replaces=generation - 1)
            except DuplicateKeyId:  # another writer took it meanwhile
                kids.add(kid)
                continue
            kids.add(kid)
            out.append(cred)
            break
        else:
            raise RuntimeError(f"{name}: no free OSCORE key id after {MAX_KID_TRIES} tries")
    return out


def write_credentials(path: Path, credentials: Sequence[Credential]) -> None:
    """The credentials file (0600, written atomically)."""
    doc = {"format": FORMAT, "credentials": [c.to_json() for c in credentials]}
    write_atomic(path, (json.dumps(doc) + "\n").encode(), mode=0o600)


def read_credentials(path: Path) -> list[Credential]:
    """The credentials in ``path``; CredentialError (one line, with the fix) otherwise."""
    fix = "make it with: python tools/fleet.py provision --data DIR --devices N --creds FILE"
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CredentialError(f"{path}: no such credentials file; {fix}") from None
    except (OSError, ValueError) as err:
        raise CredentialError(f"{path}: cannot read the credentials: {err}; {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CredentialError(f"{path}: not a fleet credentials file of format {FORMAT}; {fix}")
    items = doc.get("credentials")
    if not isinstance(items, list):
        raise CredentialError(f"{path}: no 'credentials' list; {fix}")
    try:
        return [Credential.from_json(item) for item in items]
    except CredentialError as err:
        raise CredentialError(f"{path}: {err}") from None

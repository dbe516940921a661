"""Agent releases through a gateway (docs/gateway.md "Models and releases", docs/ota.md).

A device behind a gateway stages a release from its current endpoint, the gateway: so when a
desired document the gateway mirrors assigns ``agent/version`` = {version, sha256}, the gateway
first fetches that release from the cloud, once, into its own storage (the files its endpoint
serves under ``/releases/V/...``, block-wise and resumable like the cloud's), before its devices
see the assignment; twenty devices behind it then cost the uplink one download.

The gateway checks what it keeps but trusts nothing it relays: the manifest must be the
version asked for and name the SHA-256 the operator set (else it is not fetched: the devices
would refuse it anyway), the file must be the manifest's (size and SHA-256), and every device
verifies the manifest's signature with its own release key before it installs anything. The
download goes to a scratch file in the gateway's data directory (a bundle is tens of MB: never
in memory, never on a tmpfs) and is resumed after a cut or a restart of the gateway. One release
is fetched at a time (the relay reads desired documents one by one): the partials of the others,
left when an assignment moved on in the middle of a download, are removed before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from agent.errors import ModelError
from agent.ota.release import ReleaseManifest, check_file
from agent.ota.updater import MIRROR_PREFIX, ReleaseFetcher, drop_unwanted
from agent.wire.statedoc import DesiredDoc, agent_version

log = logging.getLogger(__name__)

KEY = "agent/version"


class ReleaseMirror:
    """Fetches the releases desired documents assign into the gateway's storage (module
    docstring). ``db`` runs a callable on the gateway's storage (CloudServer.db)."""

    def __init__(self, fetcher: ReleaseFetcher, db: Any, scratch: Path) -> None:
        self.fetcher = fetcher
        self.db = db
        self.scratch = Path(scratch)
        self.fetches: dict[str, int] = {}  # version -> downloads from the cloud
        self._refused: set[tuple[str, str]] = set()

    async def of(self, doc: DesiredDoc) -> None:
        """Have the release ``doc`` assigns (if any). SyncError/ModelError on a link failure:
        the caller tries the document again later, and its devices do not see it meanwhile."""
        entry = doc.entries.get(KEY)
        value = entry.value if entry is not None else None
        if value is None or agent_version(value) is not None:
            return  # nothing assigned, or a value the devices refuse themselves
        version, sha256 = value["version"], value["sha256"].lower()
        if (version, sha256) in self._refused:
            return
        if await self.db(lambda s: s.release(version)) is not None:
            return
        manifest = await self.fetcher.release_manifest(version)
        if manifest.sha256 != sha256:  # not a link failure: this one will not be relayed
            self._refused.add((version, sha256))
            log.error(
                "event=gateway_release_refused version=%s error=%s",
                version,
                f"the cloud serves SHA-256 {manifest.sha256[:16]}..., the desired agent/version "
                f"says {sha256[:16]}...",
            )
            return
        await self.fetch(manifest)

    async def fetch(self, manifest: ReleaseManifest) -> None:
        """Download ``manifest``'s file (resuming a partial one), check it, store it."""
        version = manifest.version
        self.scratch.mkdir(parents=True, exist_ok=True)
        part = self.scratch / f"{MIRROR_PREFIX}{version}.part"
        drop_unwanted(self.scratch, f"{MIRROR_PREFIX}{version}", MIRROR_PREFIX)
        try:
            await self.fetcher.download(manifest, part)  # type: ignore[arg-type]
            await asyncio.to_thread(check_file, manifest, part)
        except ModelError:  # a file that is not the manifest's: from the start next time
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        now = time.time()
        body = manifest.to_cbor()
        try:
            await self.db(lambda s: s.put_release(version, body, part, now))
        finally:
            with contextlib.suppress(OSError):
                part.unlink()
        self.fetches[version] = self.fetches.get(version, 0) + 1
        log.info("event=gateway_release_cached version=%s bytes=%d", version, manifest.size)

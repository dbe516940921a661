"""The partial downloads of the model versions a gateway fetches for its devices (docs/gateway.md
"Models"; agent/gateway/relay.py ``StateRelay.fetch_model``): each in a file of its own in the
gateway's data directory, so a download the uplink cuts resumes at the next poll from the whole
blocks it holds (agent/modelstore/fetch.py), after a restart of the gateway too, instead of
starting again from the first block. The file is named for a hash of the name, the version and
the file's SHA-256 (whatever text they are, one file name). The partials of other versions (an
assignment that moved on in the middle of a download) are removed when a download starts: one
at a time, as the relay reads the documents one by one; a refused file (ModelError: not the
manifest's) and a version kept in the registry leave none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

from agent.errors import ModelError
from agent.modelstore.fetch import ModelFetcher
from agent.modelstore.signing import SignedManifest

PREFIX = "model-"
SUFFIX = ".part"


def partial(scratch: Path, manifest: SignedManifest) -> Path:
    """Where the partial download of ``manifest``'s file is kept (its blocks are not checked
    again: named for the file's SHA-256 too, it never resumes another file's)."""
    what = f"{manifest.name}\0{manifest.version}\0{manifest.sha256}"
    return scratch / f"{PREFIX}{hashlib.sha256(what.encode()).hexdigest()[:32]}{SUFFIX}"


def _others_removed(scratch: Path, keep: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    for path in scratch.glob(f"{PREFIX}*{SUFFIX}"):
        if path != keep:
            with contextlib.suppress(OSError):
                path.unlink()


async def download(
    fetcher: ModelFetcher, manifest: SignedManifest, scratch: Path
) -> tuple[Path, bytes]:
    """The file of ``manifest``, resumed from its partial in ``scratch``: the partial's path
    (remove it with :func:`done` once the version is kept) and its bytes. SyncError (the
    partial stays), ModelError (it is removed), NotNow."""
    part = partial(scratch, manifest)
    await asyncio.to_thread(_others_removed, scratch, part)
    try:
        await fetcher.download(manifest, part)
    except ModelError:  # a file that is not the manifest's: from the start next time
        done(part)
        raise
    return part, await asyncio.to_thread(part.read_bytes)


def done(part: Path) -> None:
    """Remove a partial once its version is kept (or refused)."""
    with contextlib.suppress(OSError):
        part.unlink()

"""The model download: signed manifests and model files fetched from the endpoint's registry.

Every exchange goes through the agent's one CoAP transport
(:class:`~agent.sync.transport.CoapTransport`), which owns the deadlines, the retransmission tuning
and the lane reset after a confirmable request missed its deadline.

The manifest is ``GET /models/NAME/VERSION/manifest`` (block-wise by aiocoap when large). The file
is ``GET /models/NAME/VERSION/file`` block by block (Block2 by number, RFC 7959): a window of
blocks in flight, one per lane of the transport, written in order into the partial file (fsynced
every :data:`SYNC_EVERY` bytes). After an interruption (or a restart) the download resumes from
the last whole block the partial file holds.

Link failures raise :class:`~agent.errors.SyncError` (try again later; the partial file stays);
refusals raise :class:`~agent.errors.ModelError` (do not retry that version); a partial file that
cannot be written (a full disk, an I/O error) raises :class:`~agent.errors.NotNow` (the device's
condition: try again later, the blocks written stay).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.errors import ModelError, NotNow, SyncError
from agent.modelstore.signing import MAX_MANIFEST_BYTES, SignedManifest
from agent.sync.transport import CoapTransport, Response

log = logging.getLogger(__name__)

# Timing and sizes; tests may shorten them.
BLOCK_SZX = 6  # Block2 size exponent: 2 ** (6 + 4) = 1024-byte blocks
BLOCK_WINDOW = 2  # blocks in flight at once: the lanes of the fetcher's transport
BLOCK_DEADLINE = 60.0  # seconds for one block exchange (covers CoAP retransmissions)
MANIFEST_DEADLINE = 60.0  # seconds for the manifest (block-wise too)
SYNC_EVERY = 64 * 1024  # bytes written to the partial file between two fsyncs (power cuts)


@dataclass
class FetchStats:
    """What one download did."""

    resumed_from: int = 0  # bytes already in the partial file
    blocks: int = 0  # blocks fetched now
    bytes: int = 0  # payload bytes fetched now
    seconds: float = 0.0


class ModelFetcher:
    """Fetches signed manifests and model files from the endpoint's registry over CoAP.

    ``transport``: a transport of the fetcher's own (:meth:`close` closes it); its lanes are the
    block window: that many blocks are in flight at once, each on its own lane (CoAP allows one
    confirmable exchange in flight per endpoint pair, NSTART = 1), so a long thin link stays busy
    while a block crosses it; they are written in order. ``base_uri``: ``coap://host:port`` or a
    callable giving the current endpoint (the runtime's :class:`~agent.sync.transport.Endpoints`).
    Blocks are requested by number, so a download resumes where it stopped.
    """

    def __init__(
        self,
        transport: CoapTransport,
        base_uri: str | Callable[[], str],
        *,
        endpoint_path: str = "models",
        szx: int = BLOCK_SZX,
        block_deadline: float | None = None,
        manifest_deadline: float | None = None,
        ack_timeout: float | None = None,
    ) -> None:
        self.transport = transport
        self._base = base_uri
        self.endpoint_path = endpoint_path.strip("/")
        self.szx = szx
        self.block_deadline = block_deadline or BLOCK_DEADLINE
        self.manifest_deadline = manifest_deadline or MANIFEST_DEADLINE
        self.ack_timeout = ack_timeout

    @property
    def window(self) -> int:
        """Blocks in flight at once: the transport's lanes."""
        return self.transport.lanes

    def uri(self, name: str, version: str, what: str) -> str:
        base = self._base() if callable(self._base) else self._base
        return f"{base.rstrip('/')}/{self.endpoint_path}/{name}/{version}/{what}"

    async def close(self) -> None:
        await self.transport.close()

    async def _get(
        self, uri: str, deadline: float, block: int | None = None, lane: int = 0
    ) -> Response:
        return await self.transport.request(
            "GET",
            uri,
            deadline=deadline,
            lane=lane,
            ack_timeout=self.ack_timeout,
            block2=None if block is None else (block, self.szx),
        )

    @staticmethod
    def _check_code(resp: Response, uri: str, what: str) -> None:
        if resp.success:
            return
        text = resp.payload[:200].decode("utf-8", "replace")
        if resp.code >> 5 == 4:  # the registry does not have it, or refuses: not worth retrying
            raise ModelError(
                f"GET {uri}: {resp.dotted} {text}; the registry does not serve this {what}"
            )
        raise SyncError(f"GET {uri}: {resp.dotted} {text}")

    async def manifest(self, name: str, version: str) -> SignedManifest:
        uri = self.uri(name, version, "manifest")
        resp = await self._get(uri, self.manifest_deadline)
        self._check_code(resp, uri, "model version")
        if len(resp.payload) > MAX_MANIFEST_BYTES:
            raise ModelError(f"GET {uri}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        m = SignedManifest.from_cbor(resp.payload, label=f"GET {uri}")
        if (m.name, m.version) != (name, version):
            raise ModelError(f"GET {uri}: the manifest is for {m.name} {m.version}; refused")
        return m

    async def download(
        self,
        manifest: SignedManifest,
        part: Path,
        on_block: Callable[[int, int], None] | None = None,
    ) -> FetchStats:
        """Fetch the file into ``part``, resuming from the whole blocks it already holds.
        Raises SyncError (link; ``part`` keeps the blocks written in order), NotNow (``part``
        cannot be written) or ModelError (refused). ``on_block(num, bytes_written)`` is called
        after each block is written."""
        uri = self.uri(manifest.name, manifest.version, "file")
        bsize = 2 ** (self.szx + 4)
        last = max(0, -(-manifest.size // bsize) - 1)
        try:
            out, have = _open_part(part, bsize, last)
        except OSError as err:
            raise NotNow(f"{part.name}: cannot open the partial download ({err})") from err
        stats = FetchStats(resumed_from=have)
        started = time.perf_counter()
        next_write = next_ask = have // bsize
        if have:
            log.info(
                "model download resumed name=%s version=%s from_block=%d bytes=%d",
                manifest.name,
                manifest.version,
                next_write,
                have,
            )
        pending: dict[asyncio.Task[Response], tuple[int, int]] = {}  # task -> (block, lane)
        window = self.window
        lanes = list(range(window))
        arrived: dict[int, bytes] = {}
        unsynced = 0
        try:
            with out:
                while next_write <= last:
                    while lanes and next_ask <= last and next_ask - next_write < 4 * window:
                        lane = lanes.pop(0)
                        task = asyncio.create_task(
                            self._get(uri, self.block_deadline, next_ask, lane)
                        )
                        pending[task] = (next_ask, lane)
                        next_ask += 1
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in sorted(done, key=lambda t: pending[t][0]):
                        num, lane = pending.pop(task)
                        lanes.append(lane)
                        arrived[num] = self._check_block(task.result(), uri, manifest, num, last)
                    while next_write in arrived:
                        payload = arrived.pop(next_write)
                        out.write(payload)
                        have += len(payload)
                        stats.blocks += 1
                        stats.bytes += len(payload)
                        log.debug(
                            "model block name=%s num=%d bytes=%d", manifest.name, next_write, have
                        )
                        if on_block is not None:
                            out.flush()
                            on_block(next_write, have)
                        next_write += 1
                        unsynced += len(payload)
                    if unsynced >= SYNC_EVERY:  # what a power cut may lose stays small
                        out.flush()
                        await asyncio.to_thread(os.fsync, out.fileno())
                        unsynced = 0
                out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())  # a slow card: off the loop
        except OSError as err:  # the file, not the link (the transport raises SyncError)
            raise NotNow(f"{part.name}: cannot write the partial download ({err})") from err
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        stats.seconds = time.perf_counter() - started
        if have != manifest.size:
            raise ModelError(
                f"GET {uri}: truncated: the transfer ended at {have} bytes, the signed manifest "
                f"says {manifest.size}; refused"
            )
        return stats

    def _check_block(
        self, resp: Response, uri: str, manifest: SignedManifest, num: int, last: int
    ) -> bytes:
        """The payload of block ``num``, or SyncError/ModelError."""
        self._check_code(resp, uri, "model file")
        payload = resp.payload
        etag = bytes.fromhex(manifest.sha256)[:8]
        if resp.etag is not None and resp.etag != etag:
            raise ModelError(
                f"GET {uri}: the endpoint serves another file (ETag {resp.etag.hex()}, "
                f"manifest {etag.hex()}); refused"
            )
        size2 = resp.size2
        if size2 is not None and size2 != manifest.size:
            what = "truncated" if size2 < manifest.size else "size mismatch"
            raise ModelError(
                f"GET {uri}: {what}: the endpoint serves {size2} bytes, the signed "
                f"manifest says {manifest.size}; refused"
            )
        bsize = 2 ** (self.szx + 4)
        if resp.block2 is None:
            if num != 0:
                raise SyncError(f"GET {uri}: block {num} answered without Block2")
            more = False
        else:
            got, more, szx = resp.block2
            if got != num or szx != self.szx:
                raise SyncError(
                    f"GET {uri}: asked for block {num}/{bsize}, got {got}/{2 ** (szx + 4)}"
                )
        expected = bsize if num < last else manifest.size - last * bsize
        if len(payload) > expected or (num < last and len(payload) < bsize):
            if num * bsize + len(payload) > manifest.size:
                raise ModelError(
                    f"GET {uri}: size mismatch: the file is longer than the {manifest.size} "
                    "bytes the signed manifest says; refused"
                )
            raise SyncError(f"GET {uri}: block {num} is {len(payload)} bytes")
        if num < last and not more:
            raise ModelError(
                f"GET {uri}: truncated: the file ends at block {num}, the signed manifest "
                f"says {manifest.size} bytes; refused"
            )
        if num == last and (more or len(payload) != expected):
            raise ModelError(
                f"GET {uri}: size mismatch: the last block does not end at the "
                f"{manifest.size} bytes the signed manifest says; refused"
            )
        return payload


def _open_part(part: Path, bsize: int, last: int) -> tuple[IO[bytes], int]:
    """The partial file, cut to the whole blocks it holds (at most up to block ``last``, which is
    always fetched again), positioned at its end."""
    have = part.stat().st_size if part.exists() else 0
    have -= have % bsize
    have = min(have, last * bsize)
    out = open(part, "r+b" if part.exists() else "w+b")  # noqa: SIM115 - closed by the caller
    out.truncate(have)
    out.seek(have)
    return out, have

"""``edge-agent models``: one row per cached (and shipped) model of a
:class:`~agent.modelstore.cache.ModelCache`, with each file's signature checked again."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.detect.inference import check_model_file
from agent.errors import ModelError
from agent.modelstore.indexfile import Record
from agent.modelstore.signing import SignedManifest

if TYPE_CHECKING:
    from agent.modelstore.cache import ModelCache


def cache_listing(cache: ModelCache, verify: bool) -> list[dict[str, Any]]:
    """One row per cached (and shipped) model; ``verify`` checks signatures and digests."""
    rows: list[dict[str, Any]] = []
    for rec in sorted(cache._records.values(), key=lambda r: -r.seq):
        status = "verified at install"
        if verify:
            status = _signature_status(cache, rec)
        rows.append(
            {
                "name": rec.name,
                "version": rec.version,
                "source": "cache",
                "size": rec.size,
                "sha256": rec.sha256,
                "installed": rec.installed,
                "last_used": rec.last_used,
                "pinned": rec.ref in cache._pins,
                "loaded": rec.ref in cache._loaded,
                "in_use": cache._in_use.get(rec.ref, 0) > 0,
                "signature": status,
            }
        )
    if cache.shipped is not None:
        for name, entry in sorted(cache.shipped.models.items()):
            ref = (name, str(entry.raw.get("version", "shipped")))
            rows.append(
                {
                    "name": name,
                    "version": ref[1],
                    "source": "shipped",
                    "size": entry.size,
                    "sha256": entry.sha256,
                    "installed": None,
                    "last_used": None,
                    "pinned": ref in cache._pins,
                    "loaded": ref in cache._loaded,
                    "in_use": cache._in_use.get(ref, 0) > 0,
                    "signature": "shipped (trusted with the agent)",
                }
            )
    return rows


def _signature_status(cache: ModelCache, rec: Record) -> str:
    try:
        manifest = SignedManifest.read(cache._manifest_path(rec.ref))
    except (OSError, ModelError):
        return "BAD: manifest unreadable"
    if cache.public_key is None:
        return f"unchecked (no public key; signed by {manifest.key or '?'})"
    try:
        manifest.verify(cache.public_key)
        check_model_file(cache._file(rec.ref), manifest.model_entry())
    except ModelError as err:
        return f"BAD: {err}"
    return f"ok (key {manifest.key})"

"""What binds a validation verdict to the window it judged (docs/protocol.md, "Cloud inference"):
the window digest, computed alike by the device (:mod:`agent.sync.routing`) and the endpoint
(:mod:`cloud.inference`).

A verdict is stored and answered per ``(device, seq, digest)``, and the device accepts only the
verdict whose digest is the one of the window it sent: a window posted for the same ``seq`` by
someone else gets its own verdict and can never stand in for the device's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from agent.wire import records

DIGEST_KEY = "digest"  # the verdict's field that names the window it judged


def window_digest(window: Iterable[float]) -> str:
    """SHA-256, 64 lower-case hex digits, of the window's canonical encoding: a CBOR array of
    floats, each in the shortest form that holds its value exactly (RFC 8949 section 4.2.1, as
    :func:`agent.wire.records.dumps` writes it). Integers count as the floats they equal, so the
    digest depends on the values alone, not on how a sender chose to encode them."""
    return hashlib.sha256(records.dumps([float(v) for v in window])).hexdigest()

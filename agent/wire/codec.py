"""The batch codec: encodings of record batches, chosen by CoAP Content-Format.

The uplink sends batches of store records to the cloud endpoint; the codec turns a batch into bytes
and back, losslessly: ``decode_batch(encode_batch(device, records))`` gives the same records, with
the same body bytes. Each encoding is registered under its CoAP Content-Format number
(:func:`register`, :func:`encoding_for`): SenML-CBOR (RFC 8428, content format 112,
:mod:`agent.wire.senml`) and the compact encodings (65000+, :mod:`agent.wire.compact`).
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.wire import features
from agent.wire.batch import CF_SENML_CBOR, Encoding, Resolution, UnsupportedFormat, WireRecord
from agent.wire.compact import COMPACT, COMPACT_DEFLATE, COMPACT_DICT
from agent.wire.senml import SenMLCBOR

_REGISTRY: dict[int, Encoding] = {}


def register(encoding: Encoding) -> Encoding:
    """Register ``encoding`` under its content format (replacing any earlier one)."""
    _REGISTRY[encoding.content_format] = encoding
    return encoding


def encoding_for(content_format: int) -> Encoding:
    """The encoding of ``content_format``; :class:`UnsupportedFormat` if there is none."""
    try:
        return _REGISTRY[content_format]
    except KeyError:
        raise UnsupportedFormat(f"no encoding for content format {content_format}") from None


def content_formats() -> tuple[int, ...]:
    """The registered content formats, in ascending order."""
    return tuple(sorted(_REGISTRY))


def encode_batch(
    device: str | None,
    records: Sequence[WireRecord],
    content_format: int = CF_SENML_CBOR,
    *,
    resolution: Resolution | None = None,
) -> bytes:
    """Encode ``records`` of ``device`` (None: leave the device out) in ``content_format``;
    ``resolution(sensor, channel)`` gives each channel's step to encodings that quantize."""
    encoding = encoding_for(content_format)
    if resolution is None:
        return encoding.encode(device, records)
    return encoding.encode(device, records, resolution=resolution)


def decode_batch(
    data: bytes, content_format: int = CF_SENML_CBOR
) -> tuple[str | None, list[WireRecord]]:
    """Decode a batch: (the device it names or None, its records). Features records are
    checked too (:func:`agent.wire.features.check_batch`): a batch with a bad one does not
    decode."""
    device, records = encoding_for(content_format).decode(data)
    features.check_batch(records)
    return device, records


for _encoding in (SenMLCBOR(), COMPACT, COMPACT_DEFLATE, COMPACT_DICT):
    register(_encoding)

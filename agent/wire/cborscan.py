"""A CBOR scanner: where an item (RFC 8949) ends and how deeply it nests, found without decoding
it, in one pass over its bytes and without recursion.

It lets a document be split into its parts before anything is decoded, so that each part is
judged on its own: a desired value nested 10,000 deep, one that declares 2**64 bytes, or an
indefinite-length string of a thousand chunks is refused by itself (its key is refused), instead
of failing the whole document in the decoder. The work is linear in the bytes whatever they say:
every declared length and count is checked against the bytes left before it is believed.

Only well-formedness is checked here (RFC 8949 section 3 and appendix C), not validity (UTF-8
of text, duplicate map keys, tag contents): the decoder that reads a part checks those.
"""

from __future__ import annotations

from dataclasses import dataclass

BREAK = 0xFF


class ScanError(ValueError):
    """The bytes are not a well-formed CBOR item."""


@dataclass(frozen=True)
class Span:
    """Bytes ``start:end`` of the data hold one item, whose containers nest ``depth`` deep
    (0 for a scalar, 1 for ``[1]`` or ``{"a": 1}``)."""

    start: int
    end: int
    depth: int

    def of(self, data: bytes) -> bytes:
        return bytes(data[self.start : self.end])

    def __len__(self) -> int:
        return self.end - self.start


def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head); the argument is -1 for an
    indefinite-length string, array or map."""
    n = len(data)
    if pos >= n:
        raise ScanError("the item ends early")
    initial = data[pos]
    major, info = initial >> 5, initial & 31
    pos += 1
    if info < 24:
        return major, info, pos
    if info <= 27:
        size = 1 << (info - 24)
        if pos + size > n:
            raise ScanError("the item ends early (in a head)")
        return major, int.from_bytes(data[pos : pos + size], "big"), pos + size
    if info == 31 and major in (2, 3, 4, 5):
        return major, -1, pos
    raise ScanError(f"reserved or invalid initial byte 0x{initial:02x} at {pos - 1}")


def _is_chunk(initial: int, major: int) -> bool:
    """A chunk of an indefinite-length string is a definite string of the same major type."""
    return initial >> 5 == major and initial & 31 != 31


def scan(data: bytes, pos: int = 0) -> Span:
    """The span of the item that starts at ``pos``; :class:`ScanError` if it is not well formed
    (or ends early)."""
    n = len(data)
    start = pos
    # open items: [items left (-1: until a break), major of an indefinite string's chunks or -1]
    stack: list[list[int]] = []
    depth = deepest = 0
    while True:
        if pos < n and data[pos] == BREAK:
            if not stack or stack[-1][0] != -1:
                raise ScanError(f"a break outside an indefinite-length item at {pos}")
            pos += 1
            if stack.pop()[1] == -1:
                depth -= 1
        else:
            chunks_of = stack[-1][1] if stack else -1
            if chunks_of != -1 and pos < n and not _is_chunk(data[pos], chunks_of):
                raise ScanError(f"a chunk of an indefinite-length string is not one at {pos}")
            major, arg, pos = _head(data, pos)
            if major in (2, 3):
                if arg == -1:
                    stack.append([-1, major])
                    continue
                if arg > n - pos:
                    raise ScanError(f"a string of {arg} bytes with {n - pos} bytes left")
                pos += arg
            elif major in (4, 5):
                if arg == -1:
                    stack.append([-1, -1])
                    depth += 1
                    deepest = max(deepest, depth)
                    continue
                items = arg * 2 if major == 5 else arg
                if items > n - pos:  # every item takes at least one byte
                    raise ScanError(f"a container of {arg} items with {n - pos} bytes left")
                if items:
                    stack.append([items, -1])
                    depth += 1
                    deepest = max(deepest, depth)
                    continue
                deepest = max(deepest, depth + 1)
            elif major == 6:
                continue  # a tag: its content follows
        # an item is complete: so is every definite container it completes
        while stack:
            top = stack[-1]
            if top[0] == -1:
                break
            top[0] -= 1
            if top[0]:
                break
            stack.pop()
            depth -= 1
        if not stack:
            return Span(start, pos, deepest)


def _container(data: bytes, span: Span, major: int, what: str) -> tuple[int, int]:
    """(count or -1, position of the first item) of the array or map at ``span``."""
    got, count, pos = _head(data, span.start)
    if got != major:
        raise ScanError(f"expected {what}")
    return count, pos


def items(data: bytes, span: Span) -> list[Span]:
    """The spans of the items of the array at ``span`` (a span :func:`scan` returned)."""
    count, pos = _container(data, span, 4, "an array")
    out: list[Span] = []
    while (count == -1 and data[pos] != BREAK) or len(out) < count:
        item = scan(data, pos)
        out.append(item)
        pos = item.end
    return out


def entries(data: bytes, span: Span) -> list[tuple[Span, Span]]:
    """The (key, value) spans of the map at ``span`` (a span :func:`scan` returned), in the
    order they come; :class:`ScanError` for an indefinite-length map of an odd number of items
    (which :func:`scan` spans without counting)."""
    count, pos = _container(data, span, 5, "a map")
    out: list[tuple[Span, Span]] = []
    while (count == -1 and data[pos] != BREAK) or len(out) < count:
        key = scan(data, pos)
        if count == -1 and data[key.end] == BREAK:
            raise ScanError(f"an indefinite-length map of an odd number of items at {span.start}")
        value = scan(data, key.end)
        out.append((key, value))
        pos = value.end
    return out

"""AMP's framing without Twisted, for the worker child, the blocking client and the listeners."""

from __future__ import annotations

import contextlib

# Below AMP's 65,535-byte limit for one value.
CHUNK = 65_000
_MAX_VALUE = 0xFFFF
_MAX_KEY = 255


def encode_box(box: dict[bytes, bytes]) -> bytes:
    """@return: the AMP serialisation of C{box}."""
    parts = []
    for key, value in box.items():
        if len(value) > _MAX_VALUE:
            raise ValueError(f"AMP value for {key!r} too long: {len(value)} bytes")
        parts += [len(key).to_bytes(2, "big"), key, len(value).to_bytes(2, "big"), value]
    parts.append(b"\x00\x00")
    return b"".join(parts)


def put_big(box: dict[bytes, bytes], name: bytes, value: bytes) -> None:
    """Add C{value} to C{box}: the count of pieces under C{name}, C{name.0}, ... the pieces."""
    pieces = [value[i : i + CHUNK] for i in range(0, len(value), CHUNK)] or [b""]
    box[name] = str(len(pieces)).encode()
    for i, piece in enumerate(pieces):
        box[name + b".%d" % i] = piece


def get_big(box: dict[bytes, bytes], name: bytes, max_pieces: int | None = None) -> bytes:
    """
    @return: the value L{put_big} put under C{name}. @raise KeyError: C{name} is not in C{box}.
    @raise ValueError: a count of pieces not from 1 to C{max_pieces}, or a piece missing.
    """
    raw = box[name]
    count = 0
    with contextlib.suppress(ValueError):
        count = int(raw) if len(raw) <= 10 else 0
    if not 0 < count <= (max_pieces or count):
        bound = f"from 1 to {max_pieces}" if max_pieces else "of at least 1"
        raise ValueError(f"expected a count of pieces {bound}, got {raw[:20]!r}")
    pieces = [box.get(name + b".%d" % i) for i in range(count)]
    if None in pieces:
        raise ValueError(f"piece {pieces.index(None)} of {count} is missing")
    return b"".join(pieces)


class BoxTooLarge(ValueError):
    """The box being read is over the limit it is read with (L{BoxReader.next_box})."""


class BoxReader:
    """
    Splits a byte stream into AMP boxes, one at a time when it must keep a
    limit. C{box}: what is complete of the box being read, C{size} bytes so
    far; C{consumed}: the stream's bytes read into boxes.
    """

    def __init__(self, box_type=dict):
        self._buffer = bytearray()
        self._offset = 0
        self._skip = 0  # bytes of a dropped value still to come
        self._box_type = box_type
        self.box = box_type()
        self.size = 0
        self.consumed = 0

    @property
    def buffered(self) -> int:
        """@return: the bytes received and not read into a box yet."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes) -> list[dict[bytes, bytes]]:
        """@return: the boxes C{data} completes."""
        self.add(data)
        return list(iter(self.next_box, None))

    def add(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_box(self, limit: int | None = None, keep: bool = True):
        """
        @param keep: C{False}: drop its keys and values as they arrive (a refused box's rest).
        @return: the next complete box, or C{None}. @raise BoxTooLarge: over C{limit} bytes.
        """
        buffer, offset, size = self._buffer, self._offset, len(self._buffer)
        try:
            while not self._skip and size - offset >= 2:
                key_length = int.from_bytes(buffer[offset : offset + 2], "big")
                if key_length == 0:
                    offset += 2
                    self.consumed += 2
                    box, self.box, self.size = self.box, self._box_type(), 0
                    return box
                if key_length > _MAX_KEY:
                    raise ValueError(f"an AMP key of {key_length} bytes (at most {_MAX_KEY})")
                value_at = offset + 2 + key_length
                if size < value_at + 2:
                    break
                end = value_at + 2 + int.from_bytes(buffer[value_at : value_at + 2], "big")
                if limit is not None and self.size + end - offset > limit:
                    raise BoxTooLarge(self.size + end - offset)
                if size < end:
                    if keep:
                        break
                    self._skip = end - size
                    end = size
                elif keep:
                    self.box[bytes(buffer[offset + 2 : value_at])] = bytes(
                        buffer[value_at + 2 : end]
                    )
                self.size += end - offset
                self.consumed += end - offset
                offset = end
            if limit is not None and self.size + size - offset > limit:
                raise BoxTooLarge(self.size + size - offset)
            return None
        finally:
            self._offset = offset

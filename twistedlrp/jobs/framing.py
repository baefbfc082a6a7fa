"""
AMP's framing without Twisted, for processes that run no reactor: the
worker child (L{twistedlrp.jobs.child}) and the blocking job client
(L{twistedlrp.jobs.blocking}).

The other end speaks AMP (twisted.protocols.amp, L{twistedlrp.jobs.wire});
these need only its framing: a box is pairs of 16-bit length-prefixed keys
and values, ended by an empty key. Payloads and outcomes travel as
L{wire.BigBytes} does it: C{name} holds the count of pieces, C{name.0},
C{name.1}, ... the pieces. Leaving Twisted's reactor and AMP out of the
worker saves about 16 MB of memory per worker and two thread hops per job.
"""

from __future__ import annotations

_CHUNK = 65_000  # wire.CHUNK
_MAX_VALUE = 0xFFFF


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
    """Add C{value} to C{box} under C{name}, in pieces (L{wire.BigBytes})."""
    pieces = [value[i : i + _CHUNK] for i in range(0, len(value), _CHUNK)] or [b""]
    box[name] = str(len(pieces)).encode()
    for i, piece in enumerate(pieces):
        box[name + b".%d" % i] = piece


def get_big(box: dict[bytes, bytes], name: bytes) -> bytes:
    """@return: the value L{put_big} put under C{name}."""
    return b"".join(box[name + b".%d" % i] for i in range(int(box[name])))


class BoxReader:
    """Splits a byte stream into AMP boxes (dicts of bytes)."""

    def __init__(self):
        self._buffer = bytearray()
        self._box: dict[bytes, bytes] = {}

    def feed(self, data: bytes) -> list[dict[bytes, bytes]]:
        buffer = self._buffer
        buffer += data
        boxes = []
        offset = 0
        while True:
            if len(buffer) - offset < 2:
                break
            key_length = int.from_bytes(buffer[offset : offset + 2], "big")
            if key_length == 0:
                boxes.append(self._box)
                self._box = {}
                offset += 2
                continue
            value_at = offset + 2 + key_length
            if len(buffer) < value_at + 2:
                break
            value_length = int.from_bytes(buffer[value_at : value_at + 2], "big")
            end = value_at + 2 + value_length
            if len(buffer) < end:
                break
            key = bytes(buffer[offset + 2 : value_at])
            self._box[key] = bytes(buffer[value_at + 2 : end])
            offset = end
        del buffer[:offset]
        return boxes

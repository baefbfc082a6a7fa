"""
The one control channel between a process and its parent: JSON objects, one
a line, over a UNIX stream socket. L{Channel} is a running reactor's end,
L{BlockingChannel} the end of a process that runs none (it imports no Twisted).

A message sent with descriptors says how many in its C{"fds"} key, which the
receiving end replaces with them (Twisted sends each with one byte of the
line: all have come by its end). A line that is not a JSON object is skipped.
"""

from __future__ import annotations

import json
import os
import socket
import sys

# A line longer than this is a broken peer: the channel is closed.
MAX_LENGTH = 4 * 1024 * 1024
_MAX_FDS = 16


def encode(message: dict) -> bytes:
    return (json.dumps(message) + "\n").encode("utf-8")


class Decoder:
    """Bytes in, messages out (the partial last line is kept for the next bytes)."""

    def __init__(self):
        self._buffer = b""
        self.fds: list[int] = []  # received, not handed out yet

    def feed(self, data: bytes) -> list[dict]:
        """@raise ValueError: a line is longer than L{MAX_LENGTH}."""
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if len(self._buffer) > MAX_LENGTH:
            raise ValueError(f"a control line longer than {MAX_LENGTH} bytes")
        messages = []
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if "fds" in message:
                count = message["fds"]
                message["fds"], self.fds = self.fds[:count], self.fds[count:]
            messages.append(message)
        return messages


class Channel:
    """
    The reactor's end (a protocol, its own factory): messages go to C{on_message}, the reason
    it is gone to C{on_lost}; C{decoder} is the L{BlockingChannel}'s that read this socket first.
    """

    def __init__(self, on_message, on_lost=None, decoder: Decoder | None = None):
        self.on_message, self.on_lost = on_message, on_lost
        self.transport = None
        self._decoder = decoder or Decoder()

    @property
    def open(self) -> bool:
        return self.transport is not None

    def buildProtocol(self, addr):
        return self

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ValueError:
            self.transport.loseConnection()
            return
        for message in messages:
            self.on_message(message)

    def fileDescriptorReceived(self, fd: int) -> None:
        self._decoder.fds.append(fd)

    def connectionLost(self, reason=None) -> None:
        self.transport = None
        for fd in self._decoder.fds:
            os.close(fd)
        self._decoder.fds = []
        if self.on_lost is not None:
            self.on_lost(reason)

    def send(self, message: dict, fds=()) -> bool:
        """@return: whether C{message} went, with C{fds} (close them once the other end answers)."""
        if self.transport is None:
            return False
        if fds:
            message = {**message, "fds": len(fds)}
            for fd in fds:
                self.transport.sendFileDescriptor(fd)
        self.transport.write(encode(message))
        return True

    def close(self) -> None:
        """Close it once what was sent is written (C{on_lost} follows)."""
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


def adopt(reactor, sock: socket.socket, channel: Channel) -> Channel:
    """Run C{channel} on the connected UNIX socket C{sock} (C{sock} itself is closed)."""
    sock.setblocking(False)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, channel)
    sock.close()
    return channel


def spawn(reactor, protocol, channel: Channel, args, env, child_fds, control_fd, path=None):
    """@return: C{channel}, to C{sys.executable} C{args} at its C{control_fd}; @raise OSError."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child_fds = {**child_fds, control_fd: theirs.fileno()}
    try:
        reactor.spawnProcess(protocol, sys.executable, args, env=env, path=path, childFDs=child_fds)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return adopt(reactor, ours, channel)


class BlockingChannel:
    """The end of a process that runs no reactor: it blocks, or polls with L{fileno}."""

    def __init__(self, sock: socket.socket):
        self.socket = sock
        self.decoder = Decoder()
        self.pending: list[dict] = []  # read, not asked for yet

    def fileno(self) -> int:
        return self.socket.fileno()

    def send(self, message: dict, fds=()) -> bool:
        """@return: whether C{message} (with the descriptors C{fds}) was sent."""
        data = encode({**message, "fds": len(fds)} if fds else message)
        try:
            if fds:
                sent = socket.send_fds(self.socket, [data], list(fds))
                data = data[sent:]
            self.socket.sendall(data)
        except OSError:
            return False  # The other process is gone; end of file says so.
        return True

    def receive(self) -> bool:
        """Read once (blocking, if the socket is) into L{pending}; @return: C{False} at end of file."""
        try:
            data, fds, _, _ = socket.recv_fds(self.socket, 65536, _MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        self.decoder.fds += fds
        try:
            self.pending += self.decoder.feed(data)
        except ValueError:
            return False
        return bool(data)

    def wait(self) -> dict | None:
        """@return: the next message (blocking), or C{None} at end of file."""
        while not self.pending:
            if not self.receive():
                return None
        return self.pending.pop(0)

    def close(self) -> None:
        """Close the socket, and the descriptors received with messages not taken yet."""
        self.socket.close()
        for fd in [*self.decoder.fds, *(fd for m in self.pending for fd in m.get("fds", ()))]:
            os.close(fd)
        self.decoder.fds, self.pending = [], []

"""
The Twisted internals that twistedlrp.compat leans on for its listening
ports and their connections: each test fails, naming the
internal, when a Twisted release changes it.
"""

import os
import socket
import stat

from twisted.internet import abstract, protocol, tcp
from twisted.internet.testing import MemoryReactor

from twistedlrp import compat
from twistedlrp.web.ports import AdoptedUNIXPort


def _changed(internal: str) -> str:
    return f"Twisted changed {internal}; twistedlrp.compat must follow"


class _Null(protocol.Protocol):
    pass


def test_an_adopted_unix_port_keeps_mode_path_and_listening_state(bound_unix_socket):
    path, sock = bound_unix_socket
    port = AdoptedUNIXPort.adopt(
        MemoryReactor(), sock.fileno(), protocol.Factory.forProtocol(_Null)
    )
    assert port._bindPath == os.fsencode(path), _changed("unix.Port._bindPath")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, _changed("unix.Port.startListening")
    port.connectionLost(None)
    assert os.path.exists(path), _changed("unix.Port.connectionLost")
    # Not shut down (tcp.Port._shouldShutdown): the owner's socket still takes connections.
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError as e:
        raise AssertionError(_changed("tcp.Port._shouldShutdown")) from e
    finally:
        client.close()


def _connect_many(address, count: int, family=socket.AF_INET) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        client = socket.socket(family, socket.SOCK_STREAM)
        client.connect(address)
        clients.append(client)
    return clients


class _Marked(tcp.Server):
    pass


def test_a_shared_port_accepts_one_connection_per_read_with_the_class_it_is_given():
    class Shared(compat.OneAcceptPerTurn, tcp.Port):
        pass

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(10)
    server.setblocking(False)
    built = []

    class Factory(protocol.Factory):
        def buildProtocol(self, addr):
            built.append(addr)
            return _Null()

    port = compat.adopt_port(Shared, MemoryReactor(), server.fileno(), socket.AF_INET, Factory())
    assert port.transport is tcp.Server, _changed("tcp.Port.transport")
    compat.set_connection_class(port, _Marked)
    clients = _connect_many(server.getsockname(), 3)
    try:
        port.doRead()
        assert len(built) == 1, _changed("tcp.Port.numberAccepts")
        port.doRead()
        assert len(built) == 2, _changed("tcp.Port.numberAccepts")
        connection = next(c for c in port.reactor.readers if isinstance(c, tcp.Server))
        assert isinstance(connection, _Marked), _changed("tcp.Port.transport")
    finally:
        for client in clients:
            client.close()
        port.connectionLost(None)
        server.close()


def test_the_buffered_bytes_and_the_closed_write_side_of_a_transport_are_seen():
    class Descriptor(abstract.FileDescriptor):
        connected = True

        def writeSomeData(self, data):
            return min(2, len(data))

    transport = Descriptor(MemoryReactor())
    assert compat.buffered(transport) == 0
    transport.write(b"abc")
    transport.write(b"de")
    assert compat.buffered(transport) == 5, _changed("FileDescriptor._tempDataLen")
    transport.doWrite()  # takes 2
    assert compat.buffered(transport) == 3, _changed("FileDescriptor.dataBuffer/offset")
    assert not compat.write_shut(transport)
    transport.loseWriteConnection()
    for _ in range(3):
        transport.doWrite()
    assert compat.buffered(transport) == 0
    assert compat.write_shut(transport), _changed("FileDescriptor._writeDisconnected")


def test_importing_compat_imports_no_web_or_port_module():
    # A job node (--jobs-only) imports no web module (test_jobs_worker_imports).
    import subprocess
    import sys

    heavy = ("twisted.web", "twisted.spread", "twisted.internet.tcp", "twisted.internet.unix")
    program = (
        "import sys, twistedlrp.compat\n"
        f"print(sorted(m for m in sys.modules if m.startswith({heavy!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_no_other_module_touches_the_internals_compat_names():
    """The internals named in compat's ports, transports and Django sections appear nowhere else."""
    import pathlib
    import re

    internals = re.compile(
        r"\b(_fromListeningDescriptor|_shouldShutdown|_bindPath|numberAccepts|_tempDataLen"
        r"|_writeDisconnected|_busyReceiving|_receivedHeaderCount|_abortingCall|_transferDecoder"
        r"|_respondToBadRequestAndDisconnect|_send100Continue|_parsePOSTFormSubmission"
        r"|_openLogFile|_logDateTime|_installSignalHandlers|errors_occurred|_populate)\b"
    )
    package = pathlib.Path(compat.__file__).parent
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if internals.search(line)
    ]
    assert found == []

"""
The Twisted internals that twistedlrp.compat leans on for its listening
ports and their connections: each test fails, naming the
internal, when a Twisted release changes it.
"""

import os
import socket
import stat

from twisted.internet import protocol, tcp
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


def test_a_shared_port_accepts_one_connection_per_read():
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
    clients = _connect_many(server.getsockname(), 3)
    try:
        port.doRead()
        assert len(built) == 1, _changed("tcp.Port.numberAccepts")
        port.doRead()
        assert len(built) == 2, _changed("tcp.Port.numberAccepts")
    finally:
        for client in clients:
            client.close()
        port.connectionLost(None)
        server.close()


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

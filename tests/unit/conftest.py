import os
import socket

import pytest


@pytest.fixture
def bound_unix_socket(tmp_path):
    """A listening, non-blocking UNIX socket with mode 0600, as its owner made it: (path, socket)."""
    path = str(tmp_path / "http.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(50)
    sock.setblocking(False)
    os.chmod(path, 0o600)
    yield path, sock
    sock.close()

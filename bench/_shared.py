"""What the benchmark scripts in this folder share."""

import json
import socket
import sys
from pathlib import Path


def free_port() -> int:
    """@return: a TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(lines: list[str], results: dict, json_path: str | None) -> int:
    """
    Write the report's C{lines} to standard output and, when C{json_path}
    is given, C{results} as JSON to that file.

    @return: the script's exit code.
    """
    sys.stdout.write("\n".join(lines) + "\n")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return 0

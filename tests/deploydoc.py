"""
docs/deploying.md's "Several machines" section, read by the tests that run
it as written (tests/test_docs_several_machines.py, tests/test_topology.py).
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploying.md"


def section() -> str:
    """@return: the section's text, up to the next level-2 heading."""
    text = DOC.read_text()
    start = text.index("## Several machines")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def block(language: str, title: str) -> str:
    """@return: the one C{language} code block whose first line is the comment C{title}."""
    found = [
        b
        for b in re.findall(rf"```{language}\n(.*?)```", section(), re.S)
        if b.splitlines()[0] == f"# {title}"
    ]
    assert len(found) == 1, f"one ```{language} block '# {title}' in {DOC}, found {len(found)}"
    return found[0]


def commands(*starts: str) -> list[str]:
    """@return: the section's indented command lines beginning with C{starts}, one each."""
    lines = [line.strip() for line in section().splitlines() if line.startswith("    ")]
    found = [line.split("  #")[0].strip() for line in lines if line.startswith(starts)]
    assert len(found) == len(starts), (starts, found)
    return found

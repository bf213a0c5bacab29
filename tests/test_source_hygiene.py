"""
Rules about relayd's own source text that a reviewer would otherwise have to
check by eye: comments point only inside the repository, and importing the
modules twistd and the command-line tools load installs no reactor.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("relayd", "tests", "bench")
# Built from parts so that this file does not match its own check.
OUTSIDE_REFERENCES = re.compile("|".join(("TWISTED" + "-NOTES", r"\.\./" + "shared")))


def sourceFiles() -> list[Path]:
    return sorted(
        path
        for directory in SOURCE_DIRS
        for path in (ROOT / directory).rglob("*.py")
    )


def test_source_files_are_found() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in sourceFiles()}
    assert "relayd/server.py" in names
    assert "tests/test_source_hygiene.py" in names
    assert any(name.startswith("bench/") for name in names)


@pytest.mark.parametrize("path", sourceFiles(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_reference_to_files_outside_the_repository(path: Path) -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE_REFERENCES.search(line)
    ]
    assert not found, "cite docs/twisted-traps.rst instead:\n" + "\n".join(found)


@pytest.mark.parametrize("module", ["relayd.tap", "relayd.cli.main", "relayd.cli.relayctl", "relayd.control"])
def test_importing_installs_no_reactor(module: str) -> None:
    # twistd imports relayd.tap to parse its command line, before it installs
    # the reactor the admin chose; the command-line tools use none.
    code = f"import sys, {module}; print('twisted.internet.reactor' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, check=True)
    assert result.stdout.strip() == "False"

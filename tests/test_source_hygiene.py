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


# Private names of Twisted that relayd reads, each with why no public API does.
ALLOWED_TWISTED_PRIVATE_NAMES = {
    # RelayService.stopService: a stop begun by the reactor's own SIGTERM
    # handler exits 0 (tests/test_twisted_internals.py pins it).
    "_exitSignal",
    # relayd.tcp: STARTTLS's raw writes go through the class given to
    # twisted.internet._newtls.startTLS (the public startTLS hard-codes
    # FileDescriptor's), and a connection relayd makes gets its transport
    # class from tcp.Connector._makeTransport; no public API chooses
    # either (tests/test_twisted_internals.py pins both).
    "_newtls",
    "_makeTransport",
}
# Private-looking names that are public API outside Twisted.
PUBLIC_ELSEWHERE = {"_exit", "_domainkey"}  # os._exit; DKIM key records (SELECTOR._domainkey.DOMAIN)

_PRIVATE_ACCESS = re.compile(
    r"(?P<owner>[A-Za-z_]\w*|\))\.(?P<attribute>_[a-zA-Z]\w*)"
    r"|(?:getattr|hasattr|setattr)\((?P<object>[^,()]+),\s*[\"'](?P<name>_[a-zA-Z]\w*)[\"']")
_DEFINITIONS = (
    re.compile(r"(?<![\w.])(?:self|cls)\.(_\w+)\s*(?::[^=\n]*)?=(?!=)"),
    re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+(_\w+)", re.M),
    re.compile(r"^\s*(_\w+)\s*(?::[^=\n]*)?=", re.M),
)


def _twistedPrivateNames() -> set[str]:
    """Every underscore attribute or function name Twisted's own modules define."""
    import twisted

    names = set()
    for path in Path(twisted.__file__).parent.rglob("*.py"):
        if "test" in path.relative_to(Path(twisted.__file__).parent).parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        names.update(re.findall(r"self\.(_[a-zA-Z]\w*)\s*=", text))
        names.update(re.findall(r"^\s*(?:def|class)\s+(_[a-zA-Z]\w*)", text, re.M))
        names.update(re.findall(r"^\s+(_[a-zA-Z]\w*)\s*=", text, re.M))
    return names


def twistedPrivateNamesUsed(root: Path = ROOT) -> list[str]:
    """
    relayd's uses of a private name it does not define itself (inherited
    from a Twisted base class or read on a Twisted object), or of an
    attribute Twisted defines read on an object other than self.
    """
    files = sorted((root / "relayd").rglob("*.py"))
    texts = {path: path.read_text(encoding="utf-8") for path in files}
    ours = {name for text in texts.values() for pattern in _DEFINITIONS
            for name in pattern.findall(text)}
    # relayd's own private methods called on its own objects (spool._path).
    ourMethods = {name for text in texts.values() for name in _DEFINITIONS[1].findall(text)}
    twisted = _twistedPrivateNames()
    found = []
    for path, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            for m in _PRIVATE_ACCESS.finditer(line):
                name = m.group("attribute") or m.group("name")
                owner = (m.group("owner") or m.group("object") or "").strip()
                if name in ALLOWED_TWISTED_PRIVATE_NAMES or name in PUBLIC_ELSEWHERE:
                    continue
                onSelf = owner in ("self", "cls")
                if name not in ours or (not onSelf and name in twisted and name not in ourMethods):
                    found.append(f"{path.relative_to(root)}:{number}: {name}")
    return found


def test_relayd_uses_no_private_name_of_twisted() -> None:
    found = twistedPrivateNamesUsed()
    assert not found, "use Twisted's public API:\n" + "\n".join(found)


def test_the_private_name_check_finds_a_twisted_private_name(tmp_path: Path) -> None:
    (tmp_path / "relayd").mkdir()
    (tmp_path / "relayd" / "x.py").write_text(
        "class Session:\n"
        "    def __init__(self):\n"
        "        self._count = 0\n"
        "    def unsent(self, transport):\n"
        "        self._count += 1\n"
        "        return getattr(transport, '_tempDataLen', 0) + len(transport._appSendBuffer)\n")
    assert twistedPrivateNamesUsed(tmp_path) == [
        "relayd/x.py:6: _tempDataLen", "relayd/x.py:6: _appSendBuffer"]


# One docstring style: reStructuredText (``name``), not Twisted's epytext.
_EPYTEXT = re.compile(r"\b[CLIB]\{[^}\n]+\}|^\s*@(?:param|type|return|rtype|ivar|raise)\b", re.M)


@pytest.mark.parametrize("path", sourceFiles(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docstrings_use_restructuredtext_not_epytext(path: Path) -> None:
    found = [m.group(0).strip() for m in _EPYTEXT.finditer(path.read_text(encoding="utf-8"))]
    assert not found, f"{path.relative_to(ROOT)}: write ``name``, not {found[:3]}"


# A class or constant defined in two modules of relayd reads as one thing
# and is two; each program's own name is the one exception.
SHARED_NAMES = {"PROG"}
_MODULE_LEVEL_NAME = re.compile(r"^(?:class ([A-Za-z_]\w*)|([A-Z_][A-Z0-9_]*)\s*[:=])", re.M)


def test_no_class_or_constant_is_defined_in_two_modules() -> None:
    where: dict[str, set[str]] = {}
    for path in sorted((ROOT / "relayd").rglob("*.py")):
        for m in _MODULE_LEVEL_NAME.finditer(path.read_text(encoding="utf-8")):
            where.setdefault(m.group(1) or m.group(2), set()).add(path.relative_to(ROOT).as_posix())
    twice = {name: sorted(paths) for name, paths in where.items()
             if len(paths) > 1 and name not in SHARED_NAMES}
    assert not twice, twice
    # Nor does relayd reuse the name of Twisted's Failure for an exception of its own.
    assert "Failure" not in where

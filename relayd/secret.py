"""
Delivery secrets: the passwords relayd logs in to next hops with, read from
their ``password_file`` (by tap.py, at start and on reload) and kept in a
``Secret`` that never shows its value in a repr, a str or a log line.
"""

from __future__ import annotations

from relayd.config import Config
from relayd.tls import loadTrustRoot


class Secret:
    """A password: kept out of every repr, str and log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def readPassword(path: str) -> Secret:
    """
    The password in ``path``: its first line without the line ending (so
    ``echo secret > file`` works). Raises ``ValueError`` naming only the
    file when it is empty, ``OSError`` when it cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise ValueError(f"{path}: the password file is empty")
    return Secret(line.decode("utf-8"))


def deliverySecrets(config: Config) -> tuple[dict[str, Secret], set[str], list[str]]:
    """
    Every delivery password_file read (path -> Secret), the ca_files that
    cannot be loaded, and the problems as "key path: reason" (the reason
    names the file, never its content).
    """
    passwords, brokenCaFiles, problems = {}, set(), []
    for keyPath, path in config.delivery.passwordFiles():
        try:
            passwords[path] = readPassword(path)
        except OSError as e:
            problems.append(f"{keyPath}: cannot read {path}: {e.strerror or e}")
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{keyPath}: {path}: {'not UTF-8' if isinstance(e, UnicodeDecodeError) else 'the file is empty'}")
    hops = list(config.delivery.smarthosts) + [
        h for hops in config.delivery.routes.values() for h in hops]
    for caFile in sorted({h.caFile for h in hops if h.caFile}):
        try:
            loadTrustRoot(caFile)
        except Exception as e:  # OSError, or any complaint about the PEM content
            brokenCaFiles.add(caFile)
            reason = e.strerror if isinstance(e, OSError) else None
            problems.append(f"ca_file {caFile}: {reason or e}")
    return passwords, brokenCaFiles, problems

"""
Delivery secrets: the passwords relayd logs in to next hops with, read from
their ``password_file`` (by tap.py, at start and on reload) and kept in a
``Secret`` that never shows its value in a repr, a str or a log line.
"""

from __future__ import annotations


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


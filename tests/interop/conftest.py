"""
Fixtures of the interop suite: the integration suite's (the real daemon,
the recording sink, teardown of everything started) plus private Postfix
instances, which need root (Postfix's daemons drop to its mail_owner) and
Debian's postfix and sasl2-bin packages (.ci/run installs them).
"""

from __future__ import annotations

import os

import pytest

from tests.integration.conftest import processes, sink, twistd  # noqa: F401 (fixtures)
from tests.interop.peers import POSTFIX, POSTFIX_MASTER, Postfix, missing


@pytest.fixture
def startPostfix(processes):  # noqa: F811
    """Factory: a Postfix instance (not started); stopped and removed at teardown."""
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root (its daemons drop to mail_owner)")
    absent = missing(POSTFIX, POSTFIX_MASTER)
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed (Debian package postfix; .ci/run installs it)")
    made: list[Postfix] = []

    def make(name: str, settings: dict[str, str]) -> Postfix:
        instance = Postfix(name, settings)
        made.append(instance)
        return instance

    yield make
    for instance in reversed(made):
        print(instance.describe())
        instance.cleanup()

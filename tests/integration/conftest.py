"""Fixtures that start and always stop the real processes of a test."""

from __future__ import annotations

import os

import pytest

from tests.integration import harness
from tests.integration.harness import SMTP_SINK, PostfixSink, Relayd, Sink, twistdPath


def pytest_terminal_summary(terminalreporter):
    """How the daemons the tests started ran: with intake workers (counted as children) or not."""
    if harness.DAEMON_STARTS:
        counts = ", ".join(f"{n} with {kind}" for kind, n in sorted(harness.DAEMON_STARTS.items()))
        terminalreporter.write_line(
            f"relayd starts: {counts} (RELAYD_TEST_PROCESSES={harness.TEST_PROCESSES or 'unset'})")


@pytest.fixture
def processes():
    """
    Everything a test starts is registered here and stopped at teardown
    (SIGTERM, then SIGKILL after a bound), whatever the test's outcome; the
    tail of each daemon log is printed, so pytest shows it for a failure.
    """
    started: list = []
    yield started
    # Each one is stopped even when stopping another failed (a sink whose
    # port stays open, a daemon that had to be killed): no process outlives
    # its test. The first such failure is reported once all are stopped.
    failures: list[BaseException] = []
    for thing in reversed(started):
        try:
            if isinstance(thing, Relayd):
                print(thing.describe())
                thing.kill()
            else:
                thing.stop()
        except Exception as e:
            failures.append(e)
    if failures:
        raise failures[0]


@pytest.fixture
def twistd():
    path = twistdPath()
    if not path.exists():
        pytest.fail(f"{path} does not exist: install relayd into the venv running pytest "
                    f"(make test does), or set RELAYD_TWISTD")
    return path


@pytest.fixture
def sink(tmp_path, processes):
    """A running recording sink (tests/integration/sink.py)."""
    s = Sink(tmp_path / "sink")
    processes.append(s)
    return s.start()


@pytest.fixture
def startRelayd(tmp_path, processes, twistd):
    """Factory: a started relayd whose smarthost is the given port."""
    def start(smarthostPort: int, trustedNetworks: list[str] | None = None,
              name: str = "relayd") -> Relayd:
        daemon = Relayd(tmp_path / name, smarthostPort, trustedNetworks)
        processes.append(daemon)
        return daemon.start()
    return start


@pytest.fixture
def postfixSink(processes):
    """A running Postfix smtp-sink; skipped where Postfix is not installed."""
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.skip(f"{SMTP_SINK} is not installed (Debian package postfix; .ci/run installs it)")
    s = PostfixSink()
    processes.append(s)
    return s.start()

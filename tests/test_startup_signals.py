"""
tap.StopSignals: SIGINT and SIGTERM during start-up. The real daemon is
signalled at several points of its start-up in
tests/integration/test_signals.py; here, the two ways a recorded signal is
acted on, without sending one.
"""

from __future__ import annotations

import signal

import pytest
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from relayd import config, tap
from tests.test_tap import write


@pytest.fixture
def handlers():
    """Whatever StopSignals.install() puts in place is undone after the test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def logged(action):
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        action()
    finally:
        globalLogPublisher.removeObserver(observer)
    return lines


def test_a_signal_before_the_start_ends_it_there_with_exit_0(tmp_path, handlers):
    path = tmp_path / "relayd.yaml"
    write(path, spool=str(tmp_path / "spool"))
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    relay.stopSignals = signals = tap.StopSignals()
    signals(signal.SIGINT, None)  # arrived while the config was loaded or the service made

    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        with pytest.raises(SystemExit) as exit:
            relay.startService()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert exit.value.code == 0
    assert lines == ["received SIGINT during start-up, not started"]
    assert not relay.pool.started, "a started pool's threads would keep the process alive"
    assert not (tmp_path / "spool").exists(), "nothing is touched"
    assert signal.getsignal(signal.SIGINT) is signals and signal.getsignal(signal.SIGTERM) is signals


def test_a_signal_once_started_stops_the_reactor_once(tmp_path, handlers):
    path = tmp_path / "relayd.yaml"
    write(path, spool=str(tmp_path / "spool"))
    stops = []

    class Reactor:
        def callFromThread(self, f, *args):
            stops.append(f)

        def stop(self):
            pass

    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    relay.reactor = Reactor()
    signals = tap.StopSignals()
    signals.relay = relay
    lines = logged(lambda: (signals(signal.SIGTERM, None), signals(signal.SIGINT, None)))
    assert stops == [relay.reactor.stop]
    assert [l for l in lines if "shutting down" in l] == ["received SIGTERM, shutting down"]

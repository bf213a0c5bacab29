"""
relayd.notify: systemd's notifications, on a task.Clock and a real datagram
socket the test binds: READY=1 at the first reactor turn after the start,
WATCHDOG=1 at half of WATCHDOG_USEC while every heartbeat is recent,
STATUS= when it changes, RELOADING/READY and STOPPING.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
from twisted.internet import defer, task

from relayd import notify


class Listener:
    """systemd's end: a bound datagram socket."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="relayd-notify-")
        self.path = os.path.join(self.directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    def messages(self) -> list[list[str]]:
        found = []
        while True:
            try:
                found.append(self.sock.recv(4096).decode().split("\n"))
            except BlockingIOError:
                return found

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.directory)


@pytest.fixture
def systemd():
    listener = Listener()
    yield listener
    listener.close()


def service(systemd, watchdog=None, status=lambda: "0 messages in queue, 0 connections"):
    clock = task.Clock()
    made = notify.NotifyService(notify.Notifier(systemd.path), clock, status, watchdog=watchdog,
                                monotonic=lambda: 12.5)
    made.startService()
    return clock, made


@pytest.mark.parametrize("environ, address", [
    ({}, None),
    ({"NOTIFY_SOCKET": ""}, None),
    ({"NOTIFY_SOCKET": "/run/systemd/notify"}, "/run/systemd/notify"),
    ({"NOTIFY_SOCKET": "@abstract"}, b"\0abstract"),
    ({"NOTIFY_SOCKET": "vsock:2:1234"}, None),
])
def test_notify_address_table(environ, address):
    assert notify.notifyAddress(environ) == address


@pytest.mark.parametrize("environ, interval", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval_table(environ, interval):
    assert notify.watchdogInterval(environ, pid=42) == interval


def test_ready_waits_for_the_reactor_and_carries_the_status(systemd):
    clock, made = service(systemd)
    assert systemd.messages() == []  # started, but the reactor has not turned yet
    clock.advance(0)
    assert systemd.messages() == [["READY=1", "STATUS=0 messages in queue, 0 connections"]]


def test_watchdog_pings_at_half_the_interval_only_while_every_reactor_beats(systemd):
    clock, made = service(systemd, watchdog=4.0)
    clock.advance(0)
    systemd.messages()
    clock.advance(2.0)
    clock.advance(2.0)
    assert systemd.messages() == [["WATCHDOG=1"], ["WATCHDOG=1"]]

    # Another process's reactor: pings while its last beat is at most
    # WatchdogSec old, none once it is older.
    made.heartbeats.beat("intake-1")
    clock.advance(2.0)
    clock.advance(2.0)
    assert systemd.messages() == [["WATCHDOG=1"], ["WATCHDOG=1"]]
    clock.advance(2.0)
    clock.advance(2.0)
    assert systemd.messages() == []
    made.heartbeats.beat("intake-1")
    clock.advance(2.0)
    assert systemd.messages() == [["WATCHDOG=1"]]
    made.heartbeats.forget("intake-1")


def test_no_ping_while_an_intake_worker_is_not_alive(systemd):
    workersAlive = [True]
    asked = []
    clock = task.Clock()
    made = notify.NotifyService(notify.Notifier(systemd.path), clock, lambda: "", watchdog=4.0,
                                alive=lambda within: asked.append(within) or workersAlive[0])
    made.startService()
    clock.advance(0)
    systemd.messages()
    clock.advance(2.0)
    workersAlive[0] = False
    clock.advance(2.0)
    workersAlive[0] = True
    clock.advance(2.0)
    assert systemd.messages() == [["WATCHDOG=1"], ["WATCHDOG=1"]]
    # Alive means: answered within WatchdogSec=.
    assert set(asked) == {4.0}


def test_with_intake_workers_ready_waits_until_every_one_accepts(systemd):
    accepting = defer.Deferred()
    clock = task.Clock()
    made = notify.NotifyService(notify.Notifier(systemd.path), clock, lambda: "0 messages",
                                watchdog=4.0, accepting=lambda: accepting)
    made.startService()
    clock.advance(5)
    assert systemd.messages() == []
    accepting.callback(None)
    assert systemd.messages() == [["READY=1", "STATUS=0 messages"]]
    clock.advance(2.0)
    assert systemd.messages() == [["WATCHDOG=1"]]


def test_no_ping_while_the_reactor_does_not_turn(systemd):
    """The ping runs on the reactor: a reactor that does not run its timers sends none."""
    clock, made = service(systemd, watchdog=4.0)
    clock.advance(0)
    systemd.messages()
    # Time passes without the reactor running a timer (blocked): Clock runs
    # the overdue call once when it turns again, as a real reactor does.
    clock.rightNow += 10.0
    assert systemd.messages() == []
    clock.advance(0)
    assert systemd.messages() == [["WATCHDOG=1"]]


def test_status_is_sent_when_it_changes(systemd):
    text = ["1 messages in queue, 0 connections"]
    clock, made = service(systemd, status=lambda: text[0])
    clock.advance(0)
    systemd.messages()
    clock.advance(notify.STATUS_INTERVAL)
    assert systemd.messages() == []
    text[0] = "0 messages in queue, 2 connections"
    clock.advance(notify.STATUS_INTERVAL)
    assert systemd.messages() == [["STATUS=0 messages in queue, 2 connections"]]


def test_reload_and_stop(systemd):
    clock, made = service(systemd, watchdog=4.0)
    clock.advance(0)
    systemd.messages()
    made.reloading()
    made.reloaded()
    made.stopping()
    assert systemd.messages() == [
        ["RELOADING=1", "MONOTONIC_USEC=12500000", "STATUS=reloading the configuration"],
        ["READY=1", "STATUS=0 messages in queue, 0 connections"],
        ["STOPPING=1", "STATUS=stopping: finishing sessions and deliveries"],
    ]
    # The watchdog goes on while sessions finish; STATUS= stays "stopping".
    clock.advance(2.0)
    assert systemd.messages() == [["WATCHDOG=1"]]
    made.stopService()
    clock.advance(10.0)
    assert systemd.messages() == []
    assert clock.getDelayedCalls() == []


def test_without_systemd_nothing_is_sent_and_nothing_ticks():
    clock = task.Clock()
    made = notify.fromEnvironment(clock, lambda: "", environ={}, pid=1)
    made.startService()
    clock.advance(0)
    assert not made.notifier.enabled
    assert clock.getDelayedCalls() == []
    made.stopService()


def test_a_full_socket_drops_the_message_instead_of_waiting(systemd):
    clock, made = service(systemd, watchdog=0.002)
    clock.advance(0)
    # Never read: the socket's queue fills; every send still returns at once.
    for _ in range(5000):
        clock.advance(0.001)
    assert made.notifier.send("WATCHDOG=1") is False
    made.stopService()


def test_the_environment_is_read_once_and_not_passed_on():
    """Processes relayd starts must not speak for the service: the variables are gone."""
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000",
               "WATCHDOG_PID": "7", "PATH": "/bin"}
    made = notify.fromEnvironment(task.Clock(), lambda: "", environ=environ, pid=7)
    assert made.notifier.address == "/run/systemd/notify" and made.watchdog == 30.0
    assert environ == {"PATH": "/bin"}


@pytest.mark.parametrize("messages, connections, line", [
    (0, 0, "0 messages in queue, 0 connections"),
    (1, 1, "1 message in queue, 1 connection"),
    (3, 2, "3 messages in queue, 2 connections"),
])
def test_status_line(messages, connections, line):
    assert notify.statusLine(messages, connections) == line
